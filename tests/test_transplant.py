"""CMB transplants: cutting a CMB out as a darkening ratio and laying it onto another site."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cmb import WINDOW
from cmb.data.augment import region_size
from cmb.data.patches import PatchDataset, TrainingVolume
from cmb.data.transplant import cut_stamp, paste_stamp


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _scan_with_cmb_and_nucleus(shape=(64, 64, 40)) -> TrainingVolume:
    """White matter 0.5, a CMB at 40% of it (radius 2.5 voxels), an iron-dark nucleus at 0.2."""
    rng = np.random.default_rng(0)
    image = np.full(shape, 0.5, np.float32) + rng.normal(0, 0.005, shape).astype(np.float32)
    cmb = _ball(shape, (16, 16, 20), 2.5)
    image[cmb] *= 0.4
    nucleus = _ball(shape, (44, 44, 20), 8)
    image[nucleus] = 0.2
    target = cmb.astype(np.uint8)
    dark = np.argwhere(_ball(shape, (44, 44, 20), 3))  # well inside the nucleus
    return TrainingVolume("v", image, target, np.array([[16, 16, 20]]), np.argwhere(~nucleus & ~cmb)[::50], dark)


def test_stamp_is_the_cmb_over_its_background_and_lands_on_the_centre() -> None:
    vol = _scan_with_cmb_and_nucleus()
    stamp = cut_stamp(vol.image, vol.target, vol.cmb_centres[0], region_size(1))
    assert stamp is not None
    assert all(s % 2 == 1 for s in stamp.ratio.shape) and stamp.label.shape == stamp.ratio.shape
    assert stamp.label.sum() == vol.target.sum()  # the whole CMB, nothing else
    np.testing.assert_allclose(stamp.ratio[stamp.label > 0], 0.4, atol=0.03)
    assert stamp.ratio[stamp.label == 0].min() > 0.95  # background around it is left alone
    assert np.all(stamp.ratio <= 1.0)

    region = np.full((23, 23, 19), 0.2, np.float32)  # inside the nucleus
    target = np.zeros_like(region)
    paste_stamp(region, target, stamp, gamma=1.0)
    centre = tuple(np.array(region.shape) // 2)
    assert target[centre] == 1 and target.sum() == stamp.label.sum()
    np.testing.assert_allclose(region[target > 0], 0.2 * 0.4, atol=0.01)  # as dark against the nucleus as against white matter
    assert region[target == 0].min() > 0.19
    darker = paste_stamp(np.full((23, 23, 19), 0.2, np.float32), np.zeros((23, 23, 19), np.float32), stamp, gamma=1.25)[0]
    assert darker[centre] < region[centre]


def test_cmbs_that_cannot_be_cut_cleanly_are_left_out() -> None:
    vol = _scan_with_cmb_and_nucleus()
    assert cut_stamp(vol.image, vol.target, np.array([30, 30, 20]), region_size(1)) is None  # centre off the label
    big = _ball(vol.image.shape, (16, 16, 20), 9).astype(np.uint8)  # wider than a window with its ring
    assert cut_stamp(vol.image, big, vol.cmb_centres[0], region_size(1)) is None
    with pytest.raises(ValueError, match="larger than region"):
        stamp = cut_stamp(vol.image, vol.target, vol.cmb_centres[0], region_size(1))
        paste_stamp(np.ones((5, 5, 5), np.float32), np.zeros((5, 5, 5), np.float32), stamp)


def test_transplant_windows_put_a_labelled_cmb_on_the_chosen_sites() -> None:
    vol = _scan_with_cmb_and_nucleus()
    ds = PatchDataset([vol], n_samples=40, mix={"transplant": 1.0}, seed=0, transplant_sites=("dark",))
    assert len(ds.stamps) == 1
    dark_sites = {tuple(c) for c in vol.dark}
    rng = np.random.default_rng(3)
    assert all(tuple(ds.draw(rng)[2]) in dark_sites for _ in range(20))
    for i in range(40):
        item = ds[i]
        image, target = item["image"][0].numpy(), item["target"][0].numpy()
        assert item["label"] == 1 and image.shape == WINDOW
        where = np.argwhere(target > 0)
        offset = where.mean(axis=0) - np.array(WINDOW) // 2
        assert np.all(np.abs(offset) <= 1.01)  # centred +-1 voxel, like a real positive
        assert image[target > 0].max() < 0.2 * 0.4**0.75 + 0.02  # a CMB, darker than the nucleus it sits in
    plain = PatchDataset([vol], n_samples=8, mix={"dark": 1.0}, seed=0)
    assert all(plain[i]["target"].sum() == 0 for i in range(8))


def test_transplant_share_is_dropped_without_stamps_or_sites_and_bad_kinds_are_named() -> None:
    vol = _scan_with_cmb_and_nucleus()
    ds = PatchDataset([vol], n_samples=8, mix={"transplant": 0.5, "random": 0.5}, seed=0, transplant_sites=("mimic",))  # no mimics
    assert ds.kinds == ["random"]
    with pytest.raises(ValueError, match="transplnt"):
        PatchDataset([vol], n_samples=8, mix={"transplnt": 1.0})
    with pytest.raises(ValueError, match="veins"):
        PatchDataset([vol], n_samples=8, mix={"transplant": 1.0}, transplant_sites=("veins",))


def test_configured_transplant_reaches_the_training_batches() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cmb.models.lightning import PatchDataModule

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["unet.transplant.sites=[dark]", "unet.transplant.gamma=[3.0,3.0]"])
    vol = _scan_with_cmb_and_nucleus()
    data = PatchDataModule([vol], batch_size=8, steps_per_epoch=2, mix={"transplant": 1.0}, seed=0,
                           transplant=OmegaConf.to_container(cfg.unet.transplant, resolve=True))
    batches = list(data.train_dataloader())
    assert len(batches) == 2
    for batch in batches:
        assert torch.all(batch["label"] == 1)
        centre = batch["target"][:, 0, 9:12, 9:12, 7:10].amax(dim=(1, 2, 3))
        assert torch.all(centre == 1)  # a CMB within +-1 voxel of every window's centre
        # pasted inside the nucleus (0.2) with the configured gamma: 0.2 * 0.4**3 = 0.013 (default gammas: >= 0.063)
        assert torch.all(batch["image"][batch["target"] > 0] < 0.025)
