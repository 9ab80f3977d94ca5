from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cmb import WINDOW
from cmb.data.augment import augment_window, crop_centred, region_size, scale_log_contrast, window_augmentation, zoomed_region
from cmb.data.patches import PatchDataset, TargetOptions, TrainingVolume, build_training_volume
from cmb.data.preprocess import Preprocessed
from cmb.data.readers import cmbs_from_instances
from cmb.data.scan import Scan
from cmb.data.splits import lotcv_folds, make_or_load_splits, select_fold
from cmb.errors import ConfigError, DataError


def _volume_with_dot(centre=(30, 30, 20), shape=(60, 60, 40)) -> TrainingVolume:
    image = np.ones(shape, np.float32)
    target = np.zeros(shape, np.uint8)
    image[centre] = 0.0
    target[centre] = 1
    return TrainingVolume("v", image, target, np.array([centre]), np.argwhere(image > 0)[:1000], np.zeros((0, 3), int))


def test_augmentation_keeps_cmb_at_centre_plus_minus_one_and_reaches_every_shift() -> None:
    vol = _volume_with_dot()
    augmentation = window_augmentation(1)
    region = crop_centred(vol.target, vol.cmb_centres[0], region_size(1))[None].astype(np.float32)
    shifts = set()
    for seed in range(400):
        window = augment_window(augmentation, {"image": 1 - region, "target": region}, seed)
        assert window["target"].shape == window["image"].shape == (1, *WINDOW)
        where = np.argwhere(window["target"][0] > 0)
        assert len(where) == 1 and window["image"][0][tuple(where[0])] == 0.0  # image and target moved together
        shift = where[0] - np.array(WINDOW) // 2
        assert np.all(np.abs(shift) <= 1)
        shifts.add(tuple(shift))
    assert len(shifts) == 27  # every shift in [-1, 1]^3
    again = augment_window(augmentation, {"image": 1 - region, "target": region}, 7)
    assert np.array_equal(again["target"], augment_window(augmentation, {"image": 1 - region, "target": region}, 7)["target"])


def test_augmentation_flips_each_axis_and_turns_both_ways() -> None:
    region = np.zeros((1, *region_size(0)), np.float32)
    centre = np.array(region_size(0)) // 2
    region[(0, *(centre + (3, 1, 2)))] = 1.0  # a marker off the centre on every axis
    seen = set()
    augmentation = window_augmentation(0)
    for seed in range(300):
        out = augment_window(augmentation, {"image": region, "target": region}, seed)["target"][0]
        seen.add(tuple(np.argwhere(out > 0)[0] - np.array(WINDOW) // 2))
    # (i, j) of the marker under the 4 quarter turns and the flips, and k flipped or not: 16 placements
    assert {abs(i) for i, _, _ in seen} == {3, 1} and {k for _, _, k in seen} == {2, -2}
    assert len(seen) == 16


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


def _volume_with_ball(radius: float, centre=(30, 30, 20), shape=(60, 60, 40)) -> TrainingVolume:
    grid = np.indices(shape)
    ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
    image = np.where(ball, 0.1, 1.0).astype(np.float32)
    return TrainingVolume("v", image, ball.astype(np.uint8), np.array([centre]), np.argwhere(~ball)[::50], np.zeros((0, 3), int))


def test_a_zoomed_region_at_factor_one_is_the_plain_crop_and_enlarges_about_its_centre() -> None:
    rng = np.random.default_rng(0)
    volume = rng.random((30, 28, 20)).astype(np.float32)
    for centre in [(15, 14, 10), (1, 26, 3)]:  # inside, and at the edge (zeros past it)
        for order in (0, 1):
            np.testing.assert_array_equal(zoomed_region(volume, centre, (21, 21, 17), 1.0, order), crop_centred(volume, centre, (21, 21, 17)))
    ball = _volume_with_ball(3.0).target
    plain = crop_centred(ball, (30, 30, 20), (23, 23, 19))
    zoomed = zoomed_region(ball, (30, 30, 20), (23, 23, 19), 1.5, order=0)
    assert zoomed[11, 11, 9] == 1 and 1.5**3 * 0.8 < zoomed.sum() / plain.sum() < 1.5**3 * 1.2
    where = np.argwhere(zoomed > 0)
    np.testing.assert_allclose(where.mean(axis=0), (11, 11, 9), atol=0.01)  # still centred
    assert zoomed.dtype == ball.dtype


def test_zoomed_windows_enlarge_the_share_asked_and_keep_the_label() -> None:
    """share 0.5, factors [1.5, 1.5]: about half the positives show the CMB 1.5x as large, centred as before; without
    zoom every window is the plain one."""
    volume = _volume_with_ball(3.0)
    plain_size = (crop_centred(volume.target, (30, 30, 20), (23, 23, 19)) > 0).sum()
    ds = PatchDataset([volume], n_samples=200, mix={"positive": 1.0}, seed=0, zoom=(0.5, 1.5, 1.5))
    sizes = []
    for i in range(200):
        item = ds[i]
        target = item["target"][0].numpy()
        assert item["label"] == 1 and target[tuple(np.array(WINDOW) // 2)] == 1  # the CMB covers the centre, +-1 voxel too
        sizes.append(int((target > 0).sum()))
    enlarged = sum(size > 1.5 * plain_size for size in sizes)
    assert 70 < enlarged < 130 and all(size >= 0.9 * plain_size for size in sizes)
    plain = PatchDataset([volume], n_samples=50, mix={"positive": 1.0}, seed=0)
    assert all((plain[i]["target"].numpy() > 0).sum() <= 1.1 * plain_size for i in range(50))



def test_log_contrast_keeps_the_peak_and_the_background_and_powers_the_ratio() -> None:
    """0.5 (the normalized peak) and 0 (outside the brain) stay; a voxel at a ratio r to the peak goes to r**gamma."""
    image = np.array([0.0, 0.125, 0.25, 0.5, 1.0], np.float32)
    darker = scale_log_contrast(image, 2.0, 0.5)
    np.testing.assert_allclose(darker, [0.0, 0.5 * 0.25**2, 0.5 * 0.5**2, 0.5, 0.5 * 2.0**2], rtol=1e-6)
    np.testing.assert_allclose(scale_log_contrast(image, 0.5, 0.5), [0.0, 0.25, 0.5 * 0.5**0.5, 0.5, 0.5 * 2**0.5], rtol=1e-6)
    np.testing.assert_array_equal(scale_log_contrast(image, 1.0, 0.5), image)
    assert darker.dtype == np.float32


def test_contrast_scaled_windows_take_the_share_asked_and_leave_the_rest_and_the_labels_as_they_were() -> None:
    """share 0.5, gamma [2, 2]: about half the CMB-centred windows show the CMB's core at 0.5 * (v / 0.5)**2 instead of v;
    flips, turns, shifts and targets are those of the same dataset without the option, and its windows are unchanged."""
    volume = _volume_with_ball(3.0)
    volume.image[volume.target > 0] = 0.25
    volume.image[volume.target == 0] = 0.5
    mix = {"positive": 0.5, "random": 0.5}
    scaled = PatchDataset([volume], n_samples=200, mix=mix, seed=0, contrast=(0.5, 2.0, 2.0, 0.5))
    plain = PatchDataset([volume], n_samples=200, mix=mix, seed=0)
    cores = {"positive": [], "negative": []}
    for i in range(200):
        item, reference = scaled[i], plain[i]
        np.testing.assert_array_equal(item["target"].numpy(), reference["target"].numpy())
        assert item["label"] == reference["label"]
        image = item["image"].numpy()
        assert np.all(np.isin(np.round(image, 6), np.round([0.0, 0.5, 0.25, 0.125], 6)))
        if (item["target"].numpy() > 0).any():
            cores["positive" if item["label"] == 1 else "negative"].append(float(image[item["target"].numpy() > 0].mean()))
    n = len(cores["positive"])
    assert n > 60 and 0.3 * n < sum(c == pytest.approx(0.125) for c in cores["positive"]) < 0.7 * n
    assert all(c in (pytest.approx(0.125), pytest.approx(0.25)) for c in cores["positive"])


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
    for content, message in [([1, 2], "splits file needs a non-empty 'folds' list"),  # before: an AttributeError
                             ({"folds": [{"test": "ab"}, {"test": ["c", "d"]}]}, r"fold 0: 'test' must be a list of scan ids \(strings\)"),
                             ({"folds": [{"test": ids}]}, "fold 0 holds out every scan: nothing is left to train on"),
                             ({"folds": [{"fold": 3, "test": ["a", "b"]}, {"test": ["c", "d"]}]}, "fold 0 is numbered 3")]:
        user.write_text(json.dumps(content))  # "ab" used to be read as the scans "a" and "b"
        with pytest.raises(DataError, match=message):
            make_or_load_splits(tmp_path / "fourth", ids, seed=0, splits_file=user)
    user.write_bytes(b"\x1f\x8b\x08\x00 not text")  # a gzipped file given as the splits file: before, a UnicodeDecodeError
    with pytest.raises(DataError, match=r"mine.json: splits file is not valid JSON \(UnicodeDecodeError"):
        make_or_load_splits(tmp_path / "fifth", ids, seed=0, splits_file=user)
    (tmp_path / "splits.json").write_text("{garbled")  # the run folder's own file, damaged: before, a JSONDecodeError
    with pytest.raises(DataError, match=r"splits.json: the run folder's splits.json is not valid JSON \(JSONDecodeError"):
        make_or_load_splits(tmp_path, ids, seed=0)
    (tmp_path / "splits.json").write_text("[1, 2]")  # valid JSON, not a splits object: before, an AttributeError
    with pytest.raises(DataError, match="already has different splits"):
        make_or_load_splits(tmp_path, ids, seed=0)


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


def test_centroid_targets_give_every_labelled_cmb_the_same_ball_and_keep_negatives_off_the_labels() -> None:
    shape = (40, 40, 20)
    image = np.full(shape, 0.5, np.float32)
    instances = np.zeros(shape, np.int32)
    instances[8:17, 8:17, 6:13] = 1  # a large CMB: 567 voxels, centroid (12, 12, 9)
    instances[30, 30, 10] = 2  # a 1-voxel CMB
    image[instances > 0] = 0.05
    mask = np.ones(shape, bool)
    scan = Scan("s", image, np.eye(4), Path("s.nii.gz"), cmbs=cmbs_from_instances(instances, np.eye(4)), instances=instances)
    pre = Preprocessed("s", image, mask, {})
    labels = build_training_volume(scan, pre, vessel_contrast=None)
    np.testing.assert_array_equal(labels.target, (instances > 0).astype(np.uint8))  # off: the label map, as before
    balls = build_training_volume(scan, pre, vessel_contrast=None, target_options=TargetOptions(centroid_balls=True), point_radius_mm=1.5)
    sizes = [int(balls.target[ndimage.label(balls.target)[0] == n].sum()) for n in (1, 2)]
    assert sizes[0] == sizes[1] == 19  # the same 1.5 mm ball (1 mm voxels) about each centroid, however large the label
    assert balls.target[12, 12, 9] == 1 and balls.target[8, 8, 6] == 0  # the big CMB's centre in, its corner out
    np.testing.assert_array_equal(balls.cmb_centres, labels.cmb_centres)
    for pool in (balls.brain, balls.dark):  # negatives never land on the labelled CMB outside its ball
        assert not instances[tuple(np.asarray(pool).T)].any()
    assert not balls.target[tuple(np.asarray(balls.brain).T)].any()  # nor on a ball reaching past a 1-voxel label


def test_bloom_targets_grow_each_cmb_into_its_own_dark_dot_and_nothing_beyond() -> None:
    shape = (48, 48, 24)
    image = np.full(shape, 0.5, np.float32)
    grid = np.indices(shape)
    dist = np.sqrt(((grid - np.array([14, 14, 12])[:, None, None, None]) ** 2).sum(0))  # 1 mm voxels
    image[dist <= 2.0] = 0.1  # the visible dark dot (bloom) about a 1-voxel core
    image[14, 14, 12] = 0.0
    image[14, 20:48, 12] = 0.1  # a vein 6 mm away that does not touch the dot: not part of the target
    image[20:48, 14, 12] = 0.1  # a vein that touches the dot at (17, 14, 12) and runs out of the 4 mm ball
    image[16:20, 14, 12] = 0.1
    image[36, 36, 12] = 0.45  # a faint CMB with nothing dark about it
    instances = np.zeros(shape, np.int32)
    instances[14, 14, 12] = 1
    instances[36, 36, 12] = 2
    mask = np.ones(shape, bool)
    scan = Scan("s", image, np.eye(4), Path("s.nii.gz"), cmbs=cmbs_from_instances(instances, np.eye(4)), instances=instances)
    pre = Preprocessed("s", image, mask, {})
    grown = build_training_volume(scan, pre, vessel_contrast=None, target_options=TargetOptions(bloom_ratio=0.6, bloom_radius_mm=4.0))
    target = grown.target.astype(bool)
    assert target[dist <= 2.0].all()  # the whole dark dot, core included
    assert not target[14, 20:, 12].any()  # the vein beside it stays a negative
    assert target[18, 14, 12] and not target[19:, 14, 12].any()  # the touching vein only within 4 mm of the centroid
    assert target[36, 36, 12] and target[ndimage.label(target)[0] == ndimage.label(target)[0][36, 36, 12]].sum() == 1  # the faint one: its core
    assert int(target.sum()) == int((dist <= 2.0).sum()) + 2 + 1  # dot, the vein's (16..18, 14, 12) beyond the dot's rim, the faint core
    np.testing.assert_array_equal(grown.cmb_centres, build_training_volume(scan, pre, vessel_contrast=None).cmb_centres)
    for pool in (grown.brain, grown.dark):  # negatives keep clear of the grown target
        assert not target[tuple(np.asarray(pool).T)].any()
    assert len(grown.dark) > 0  # the veins are still dark negatives


def test_bloom_option_is_checked_at_the_door_reaches_the_recipe_is_on_for_user_data_and_off_for_the_paper() -> None:
    from hydra import compose, initialize_config_dir

    from cmb.protocol.recipes import member_recipe
    from cmb.protocol.settings import member_settings, settings_hash
    from cmb.validate import check_train

    conf = Path(__file__).resolve().parents[1] / "conf"

    def compose_train(overrides: list[str]):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            return compose(config_name="train", overrides=overrides)

    for override, message in [("unet.bloom={ratio:1.5,radius_mm:4}", r"unet.bloom.ratio=1.5 is not allowed: a number in \(0, 1\]"),
                              ("unet.bloom={ratio:0.6,radius_mm:0}", "unet.bloom.radius_mm=0 is not allowed: a number > 0"),
                              ("unet.bloom=0.6", "unet.bloom=0.6 is not allowed: null or")]:
        with pytest.raises(ConfigError, match=message):
            check_train(compose_train([override]))
    default, off, on = (compose_train(o) for o in ([], ["unet.bloom=null"], ["unet.bloom={ratio:0.6,radius_mm:4.0}"]))
    check_train(on)
    check_train(default)
    assert member_recipe(off, "unet").target == TargetOptions()
    assert member_recipe(default, "unet").target == TargetOptions(bloom_ratio=0.6, bloom_radius_mm=4.0)  # the default since 2026-12-07
    assert member_recipe(on, "unet").target == TargetOptions(bloom_ratio=0.6, bloom_radius_mm=4.0)
    assert member_recipe(on, "cnn").target == TargetOptions()  # the CNNs' pools are built as before
    split = {"fold": 0, "train": ["a", "b"], "test": ["c"]}
    hashes = [settings_hash(member_settings(c, "unet", split, 20)) for c in (default, off, on)]
    assert hashes[0] == hashes[2] != hashes[1]
    paper = compose_train(["experiment=paper"])  # keeps the label map, and so its members' hashes
    assert member_recipe(paper, "unet").target == TargetOptions() and paper.preprocess.spacing is None
