from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cmb import WINDOW
from cmb.data.augment import AugmentParams, augment_region, crop_centred, region_size, sample_params
from cmb.data.patches import PatchDataset, TrainingVolume, build_training_volume
from cmb.data.preprocess import Preprocessed
from cmb.data.scan import Scan
from cmb.data.splits import lotcv_folds, make_or_load_splits, select_fold
from cmb.errors import ConfigError, DataError


def _volume_with_dot(centre=(30, 30, 20), shape=(60, 60, 40)) -> TrainingVolume:
    image = np.ones(shape, np.float32)
    target = np.zeros(shape, np.uint8)
    image[centre] = 0.0
    target[centre] = 1
    return TrainingVolume("v", image, target, np.array([centre]), np.argwhere(image > 0)[:1000], np.zeros((0, 3), int))


@pytest.mark.parametrize("flips", [(False, False, False), (True, False, False), (False, True, True), (True, True, True)])
@pytest.mark.parametrize("rot", [0, 1, 2, 3])
@pytest.mark.parametrize("shift", [(0, 0, 0), (1, -1, 1), (-1, -1, -1)])
def test_augmentation_keeps_cmb_at_centre_plus_minus_one(flips, rot, shift) -> None:
    vol = _volume_with_dot()
    region = crop_centred(vol.target, vol.cmb_centres[0], region_size(1))[None]
    window = augment_region(region, AugmentParams(flips, rot, shift), max_shift=1)
    assert window.shape == (1, *WINDOW)
    where = np.argwhere(window[0] > 0)
    assert len(where) == 1
    np.testing.assert_array_equal(where[0], np.array(WINDOW) // 2 + np.array(shift))


def test_patch_dataset_positives_are_centred_and_varied() -> None:
    ds = PatchDataset([_volume_with_dot()], n_samples=64, mix={"positive": 1.0}, seed=0)
    offsets = set()
    for i in range(64):
        item = ds[i]
        assert item["image"].shape == (1, *WINDOW) and item["label"] == 1
        where = np.argwhere(item["target"][0].numpy() > 0)[0]
        offset = where - np.array(WINDOW) // 2
        assert np.all(np.abs(offset) <= 1)
        assert item["image"][0][tuple(where)] == 0.0  # image and target moved together
        offsets.add(tuple(offset))
    assert len(offsets) > 5
    again = PatchDataset([_volume_with_dot()], n_samples=64, mix={"positive": 1.0}, seed=0)
    assert all(np.array_equal(ds[i]["target"], again[i]["target"]) for i in range(8))


def test_sample_params_covers_both_rotation_directions() -> None:
    rng = np.random.default_rng(0)
    rots = {sample_params(rng).rot90 for _ in range(200)}
    assert {1, 3} <= rots


def test_lotcv_folds_15_scans() -> None:
    ids = [f"s{i:02d}" for i in range(15)]
    folds = lotcv_folds(ids, seed=0)
    assert len(folds) == 8 and [len(f["test"]) for f in folds] == [2] * 7 + [1]
    held = [s for f in folds for s in f["test"]]
    assert sorted(held) == ids  # disjoint and covering
    for f in folds:
        assert not set(f["test"]) & set(f["train"]) and len(f["train"]) + len(f["test"]) == 15
    assert lotcv_folds(ids, seed=0) == folds and lotcv_folds(ids, seed=1) != folds


def test_splits_file_written_reused_and_checked(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "d"]
    splits = make_or_load_splits(tmp_path, ids, seed=0)
    assert json.loads((tmp_path / "splits.json").read_text())["folds"] == splits["folds"]
    assert make_or_load_splits(tmp_path, ids, seed=0)["folds"] == splits["folds"]
    with pytest.raises(DataError, match="already has different splits"):
        make_or_load_splits(tmp_path, ids, seed=5)
    with pytest.raises(ConfigError, match=r"fold=2 is out of range: this dataset has 2 folds \(0..1\)"):
        select_fold(splits, 2)
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"folds": [{"test": ["a"]}, {"test": ["b", "c", "d"]}]}))
    custom = make_or_load_splits(tmp_path / "other", ids, seed=0, splits_file=user)
    assert custom["folds"][1]["train"] == ["a"]
    user.write_text(json.dumps({"folds": [{"test": ["a"]}, {"test": ["a", "b"]}]}))
    with pytest.raises(DataError, match="more than one fold"):
        make_or_load_splits(tmp_path / "third", ids, seed=0, splits_file=user)


def test_vessel_negatives_are_dark_lines_in_bright_tissue_not_dark_nuclei() -> None:
    shape = (60, 60, 40)
    image = np.full(shape, 0.5, np.float32)
    image[10:22, 10:22, 10:22] = 0.2  # a dark nucleus: dark, but not against its surroundings
    image[40, 30:55, 20] = 0.15  # a thin vein through bright tissue
    mask = np.ones(shape, bool)
    scan = Scan("s", image, np.eye(4), Path("s.nii.gz"), instances=np.zeros(shape, np.int32))
    vol = build_training_volume(scan, Preprocessed("s", image, mask, {}), dark_threshold=0.3, vessel_contrast=0.15)
    vessel = {tuple(int(c) for c in v) for v in vol.vessel}
    vein = {(40, j, 20) for j in range(30, 55)}
    assert vein <= vessel  # the whole vein
    interior = {(i, j, k) for i in range(12, 20) for j in range(12, 20) for k in range(12, 20)}
    assert not vessel & interior  # not the nucleus's interior (only some of its corners and edges)
    assert len(vol.dark) == 12**3 + 25  # the nucleus and the vein
    without = build_training_volume(scan, Preprocessed("s", image, mask, {}), dark_threshold=0.3, vessel_contrast=None)
    assert len(without.vessel) == 0
    np.testing.assert_array_equal(without.dark, vol.dark)  # the same seeded pools either way
    ds = PatchDataset([vol], n_samples=200, mix={"vessel": 1.0}, seed=0)
    c = np.array(WINDOW) // 2
    for i in range(0, 200, 10):
        centre = ds[i]["image"][0].numpy()[c[0] - 1 : c[0] + 2, c[1] - 1 : c[1] + 2, c[2] - 1 : c[2] + 2]
        assert centre.min() < 0.3  # a vessel voxel at the window centre (+-1 voxel)
