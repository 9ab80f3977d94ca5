"""Synthetic CMBs: the forward model of one sphere, and "synthetic" training windows at plausible sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cmb import WINDOW
from cmb.data.patches import PatchDataset, TrainingVolume
from cmb.data.physics_phantom import dipole_field
from cmb.data.synthetic_cmb import SyntheticCMBConfig, simulate_cmb, sphere_field_ppm

REPO = Path(__file__).resolve().parents[1]


def test_the_closed_form_sphere_field_is_the_physics_phantoms_kspace_dipole_field() -> None:
    n, spacing, radius = 96, (0.25, 0.25, 0.25), 2.0
    axes = [(np.arange(n) - n / 2) * s for s in spacing]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    b0 = np.array([0.1, 0.2, 1.0]) / np.linalg.norm([0.1, 0.2, 1.0])  # a tilted head
    chi = ((x**2 + y**2 + z**2) <= radius**2).astype(np.float32)
    kspace = dipole_field(chi, spacing, b0)
    closed = sphere_field_ppm(x, y, z, radius, 1.0, b0)
    r = np.sqrt(x**2 + y**2 + z**2)
    near = (r > 1.5 * radius) & (r < 3 * radius)
    assert np.abs(kspace[near] - closed[near]).max() < 0.1 * np.abs(closed[near]).max()
    assert np.abs(kspace[r < 0.7 * radius]).max() < 0.03  # ~0 inside, as the closed form
    along = np.argmax(np.abs(np.einsum("i,ijkl->jkl", b0, np.stack([x, y, z]))) * (np.abs(r - 2 * radius) < 0.2))
    assert closed.ravel()[along] > 0  # paramagnetic: the field rises along B0 ...
    across = (np.abs(r - 2 * radius) < 0.2) & (np.abs(np.einsum("i,ijkl->jkl", b0, np.stack([x, y, z]))) < 0.2)
    assert np.all(closed[across] < 0)  # ... and falls across it


def test_a_simulated_cmb_darkens_the_voxels_the_physics_phantoms_forward_model_darkens() -> None:
    """One sphere through the phantom's own pipeline (k-space dipole field, signal on a 2x grid, block mean,
    homodyne SWI) against `simulate_cmb` on tissue of uniform signal."""
    import math

    from cmb.data.physics_phantom import GAMMA_HZ_PER_T, block_mean, swi_from_complex

    spacing, shape, centre, diameter, dchi, field_t, te_s = (0.5, 0.5, 1.0), (64, 64, 32), np.array([32.0, 32.0, 16.0]), 2.6, 2.5, 3.0, 0.02
    axes = [((np.arange(2 * n) + 0.5) / 2 - 0.5 - c) * s for n, c, s in zip(shape, centre, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    core = x**2 + y**2 + z**2 <= (diameter / 2) ** 2
    field = dipole_field(np.where(core, dchi, 0.0).astype(np.float32), tuple(s / 2 for s in spacing), np.array([0.0, 0.0, 1.0]))
    r2s = np.where(core, 300.0, 21.0) * (0.5 + 0.5 * field_t / 3.0)
    signal = np.where(core, 0.4, 0.72) * np.exp(-te_s * r2s) * np.exp(-1j * 2 * math.pi * GAMMA_HZ_PER_T * field_t * 1e-6 * te_s * field)
    swi = swi_from_complex(block_mean(signal.astype(np.complex64), 2))
    phantom = swi / np.median(swi)
    simulated = simulate_cmb(shape, spacing, centre, diameter, dchi, field_t, te_s, np.array([0.0, 0.0, 1.0])).ratio
    assert abs(int((simulated < 0.5).sum()) - int((phantom < 0.5).sum())) < 0.25 * (phantom < 0.5).sum()
    assert np.abs(simulated[24:41, 32, 16] - phantom[24:41, 32, 16]).max() < 0.05  # the in-plane profile through the centre


def _dark_volume_mm3(field_t: float, te_s: float, spacing=(0.5, 0.5, 1.0), diameter=2.0) -> float:
    cmb = simulate_cmb((41, 41, 25), spacing, np.array([20.0, 20.0, 12.0]), diameter, 2.0, field_t, te_s, np.array([0.0, 0.0, 1.0]))
    return float((cmb.ratio < 0.5).sum() * np.prod(spacing))


def test_a_simulated_cmb_is_a_dark_core_that_blooms_with_field_strength_and_echo_time() -> None:
    cmb = simulate_cmb((41, 41, 25), (0.5, 0.5, 1.0), np.array([20.0, 20.0, 12.0]), 2.0, 2.0, 3.0, 0.02, np.array([0.0, 0.0, 1.0]))
    assert cmb.ratio.max() <= 1.0 and cmb.ratio[20, 20, 12] < 0.05 and cmb.ratio[0, 0, 0] > 0.97
    assert cmb.core[20, 20, 12] and cmb.ratio[cmb.core].max() < 0.6 and np.median(cmb.ratio[cmb.core]) < 0.05
    core_mm3 = 4 / 3 * np.pi * 1.0**3
    bloom_3t = _dark_volume_mm3(3.0, 0.025)
    assert bloom_3t > 2 * core_mm3  # blooming: dark well beyond the core
    assert bloom_3t > 1.3 * _dark_volume_mm3(1.5, 0.025) and bloom_3t > 1.3 * _dark_volume_mm3(3.0, 0.012)
    tiny = simulate_cmb((21, 21, 17), (1.0, 1.0, 2.0), np.array([10.3, 9.8, 8.2]), 0.6, 1.0, 1.5, 0.02, np.array([0.0, 0.0, 1.0]))
    assert tiny.core.sum() >= 1 and tiny.core[10, 10, 8]  # a core smaller than a voxel keeps its voxel


def _volume_with_csf_and_nucleus(shape=(64, 64, 40)) -> TrainingVolume:
    """Tissue 0.5 with noise, bright CSF (1.0) in the left half of i < 16, an iron-dark nucleus (0.2), no CMB."""
    rng = np.random.default_rng(0)
    image = (0.5 + rng.normal(0, 0.02, shape)).astype(np.float32)
    image[:16] = 1.0
    grid = np.indices(shape)
    nucleus = sum((g - c) ** 2 for g, c in zip(grid, (44, 44, 20))) <= 6**2
    image[nucleus] = 0.2
    brain = np.argwhere(np.ones(shape, bool))[::37]
    dark = np.argwhere(nucleus)
    return TrainingVolume("v", image, np.zeros(shape, np.uint8), np.zeros((0, 3), int), brain, dark, spacing_mm=(0.5, 0.5, 1.0))


def test_synthetic_windows_are_labelled_cmbs_at_plausible_sites_and_repeat_by_seed() -> None:
    vol = _volume_with_csf_and_nucleus()
    ds = PatchDataset([vol], n_samples=30, mix={"synthetic": 1.0}, seed=0, synthetic=SyntheticCMBConfig(), flip=False, rotate=False)
    rng = np.random.default_rng(1)
    sites = [ds.draw(rng) for _ in range(60)]
    assert all(kind == "synthetic" and c[0] >= 16 for kind, _, c in sites)  # never in the bright CSF
    nucleus_centre = np.array([44, 44, 20])
    beside = [c for _, _, c in sites if np.linalg.norm((c - nucleus_centre) * [0.5, 0.5, 1.0]) < 3 + 5]
    assert beside and all(vol.image[tuple(c)] > 0.3 for c in beside)  # next to the nucleus, not inside it
    for i in range(30):
        item = ds[i]
        image, target = item["image"][0].numpy(), item["target"][0].numpy()
        assert item["label"] == 1 and image.shape == WINDOW
        centre = tuple(np.array(WINDOW) // 2)
        assert target[centre[0] - 1:centre[0] + 2, centre[1] - 1:centre[1] + 2, centre[2] - 1:centre[2] + 2].any()
        assert image[target > 0].mean() < 0.25  # a dark CMB where there was tissue (>= 0.3)
    again = PatchDataset([vol], n_samples=30, mix={"synthetic": 1.0}, seed=0, synthetic=SyntheticCMBConfig(), flip=False, rotate=False)
    assert torch.equal(again[7]["image"], ds[7]["image"])
    other = PatchDataset([vol], n_samples=30, mix={"synthetic": 1.0}, seed=1, synthetic=SyntheticCMBConfig(), flip=False, rotate=False)
    assert not torch.equal(other[7]["image"], ds[7]["image"])
    with pytest.raises(ValueError, match="mimic"):
        PatchDataset([vol], n_samples=8, mix={"synthetic": 1.0}, synthetic=SyntheticCMBConfig(sites=("mimic",)))
    plain = PatchDataset([vol], n_samples=8, mix={"synthetic": 0.5, "random": 0.5})  # no settings given: no synthetic windows
    assert plain.kinds == ["random"]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_configured_synthetic_cmbs_reach_the_batches_and_the_settings_hash_only_when_drawn() -> None:
    from omegaconf import OmegaConf

    from cmb.errors import ConfigError
    from cmb.models.lightning import PatchDataModule
    from cmb.protocol.settings import member_settings, settings_hash
    from cmb.validate import check_train

    off = _compose([])
    on = _compose(["+unet.sampling.synthetic=0.15"])
    split = {"fold": 0, "train": ["a", "b"], "test": ["c"]}
    assert "synthetic" not in member_settings(off, "unet", split, 20)["stage"]
    assert settings_hash(member_settings(off, "unet", split, 20)) != settings_hash(member_settings(on, "unet", split, 20))
    assert settings_hash(member_settings(off, "cnn", split, 20)) == settings_hash(member_settings(on, "cnn", split, 20))
    check_train(on)
    with pytest.raises(ConfigError, match="unet.synthetic: synthetic CMBs need 0 < diameter_mm lo <= hi"):
        check_train(_compose(["+unet.sampling.synthetic=0.15", "unet.synthetic.diameter_mm=[5,1]"]))
    with pytest.raises(ConfigError, match="cnn.synthetic: unknown synthetic CMB setting"):
        check_train(_compose(["+cnn.sampling.synthetic=0.15", "+cnn.synthetic.radius=2"]))
    with pytest.raises(ConfigError, match=r"unet.synthetic: synthetic CMB sites must be among \['random', 'dark', 'vessel'\], got \['mimic'\]"):
        check_train(_compose(["+unet.sampling.synthetic=0.15", "unet.synthetic.sites=[random,mimic]"]))
    with pytest.raises(ConfigError, match="protocol.train_scans=0 is not allowed: a whole number >= 1"):
        check_train(_compose(["protocol.train_scans=0"]))
    data = PatchDataModule([_volume_with_csf_and_nucleus()], batch_size=6, steps_per_epoch=2, mix={"synthetic": 1.0}, seed=0,
                           synthetic=OmegaConf.to_container(on.unet.synthetic, resolve=True))
    for batch in data.train_dataloader():
        assert torch.all(batch["label"] == 1) and torch.all(batch["target"].amax(dim=(1, 2, 3, 4)) == 1)


def test_train_scans_trains_each_fold_on_a_seeded_subset_and_keeps_its_heldout_scans(tmp_path: Path, tiny_synthetic: Path) -> None:
    from cmb.protocol.run import Protocol

    base = ["debug=smoke", "data.preset=tiny", f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=subset"]
    every = Protocol(_compose(base))
    fewer = Protocol(_compose([*base, "protocol.train_scans=1"]))
    for fold in (0, 1, "final"):
        full, subset = every.fold_split(fold), fewer.fold_split(fold)
        assert subset["test"] == full["test"] and len(subset["train"]) == 1 and set(subset["train"]) <= set(full["train"])
        assert Protocol(_compose([*base, "protocol.train_scans=1"])).fold_split(fold) == subset  # the same draw every time
    assert every.member_settings_hash("unet", 0, 20) != fewer.member_settings_hash("unet", 0, 20)
    assert Protocol(_compose([*base, "protocol.train_scans=9"])).fold_split(0) == every.fold_split(0)  # more than there are: all
