from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from cmb.inference.candidates import candidate_points, extract_candidates, read_candidates, write_candidates
from cmb.inference.unet_map import STRIDE3_OVERLAP, UNetMapConfig, balanced_tiles, combine_maps, inference_net, predict_probability
from cmb.models.unet import UNet3D


class DarkSpotNet(torch.nn.Module):
    """A fixed, fully convolutional 'detector': high where a 5x5x3 neighbourhood is dark."""

    down_factor = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = torch.nn.functional.avg_pool3d(x, (5, 5, 3), stride=1, padding=(2, 2, 1), count_include_pad=False)
        return (0.35 - local) * 40.0


def _volume_with_cmb():
    rng = np.random.default_rng(0)
    image = (0.5 + 0.02 * rng.standard_normal((64, 60, 40))).astype(np.float32)
    grid = np.indices(image.shape)
    centre = np.array([30, 25, 18])
    image[((grid - centre[:, None, None, None]) ** 2).sum(0) <= 5] = 0.1
    mask = np.zeros(image.shape, bool)
    mask[6:58, 6:54, 4:36] = True
    return image, mask, centre


def test_stride3_overlap_gives_step_3() -> None:
    assert [int(r * (1 - o)) for r, o in zip((20, 20, 16), STRIDE3_OVERLAP)] == [3, 3, 3]


def test_fast_and_faithful_agree_on_planted_cmb() -> None:
    image, mask, centre = _volume_with_cmb()
    net = DarkSpotNet()
    # tiles smaller than the brain box (68x64x48 with margin) in two axes: blending is exercised
    fast = predict_probability(net, image, mask, UNetMapConfig(mode="fast", tile=(48, 48, 48), tile_overlap=0.25, bf16="off", progress=False))
    slow = predict_probability(net, image, mask, UNetMapConfig(mode="faithful", bf16="off", progress=False))
    assert fast.shape == slow.shape == image.shape
    assert np.all(fast[~mask] == 0) and 0 <= fast.min() and fast.max() <= 1
    for prob in (fast, slow):  # both modes find the planted CMB, and only it
        cands = extract_candidates(prob, 0.5, np.eye(4))
        assert len(cands) == 1
        assert np.linalg.norm(cands[0].voxel - centre) < 1.0
    # Not identical (stride-3 averaging includes each window's edge effects), but close.
    interior = ndimage.binary_erosion(mask, iterations=3)
    assert np.corrcoef(fast[interior], slow[interior])[0, 1] > 0.98
    assert np.mean(np.abs(fast[interior] - slow[interior]) < 0.01) > 0.99


def test_fast_mode_runs_a_unet_on_tiles_with_bf16_fallback() -> None:
    image, mask, _ = _volume_with_cmb()
    net = UNet3D(channels=(4, 8, 16)).eval()
    for bf16 in ("off", "auto"):
        prob = predict_probability(net, image, mask, UNetMapConfig(mode="fast", tile=(32, 32, 32), bf16=bf16, progress=False))
        assert prob.shape == image.shape and prob.dtype == np.float32
        assert np.all(prob[~mask] == 0) and 0 <= prob.min() and prob.max() <= 1
    with pytest.raises(ValueError, match="'fast' or 'faithful'"):
        predict_probability(net, image, mask, UNetMapConfig(mode="quick", progress=False))


def test_combine_maps_mean_and_max() -> None:
    a = np.array([0.2, 0.4], np.float32)
    b = np.array([0.1, 0.8], np.float32)
    np.testing.assert_allclose(combine_maps([a, b]), [0.15, 0.6])
    np.testing.assert_allclose(combine_maps([a, b], "max"), [(0.5 + 0.125) / 2, 1.0])


def test_candidates_from_hand_made_map(tmp_path) -> None:
    prob = np.zeros((20, 20, 20), np.float32)
    prob[2:5, 2:5, 2:5] = 0.5
    prob[3, 3, 3] = 0.9
    prob[10:12, 15, 15] = 0.3
    prob[18, 18, 18] = 0.1  # below threshold
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    cands = extract_candidates(prob, 0.2, affine, "s")
    assert len(cands) == 2
    first, second = cands
    assert first.peak == pytest.approx(0.9) and first.size == 27
    np.testing.assert_allclose(first.voxel, (3, 3, 3), atol=1e-6)
    assert (first.x_mm, first.y_mm, first.z_mm) == pytest.approx((1.5, 1.5, 3.0))
    assert second.size == 2 and second.mean == pytest.approx(0.3)
    np.testing.assert_allclose(second.voxel, (10.5, 15, 15))
    np.testing.assert_allclose(candidate_points(cands), [(3, 3, 3), (10.5, 15, 15)], atol=1e-6)
    assert candidate_points([]).shape == (0, 3)  # no candidates: still (N, 3), as the matching code expects
    path = write_candidates(cands, tmp_path / "c.csv", {"hits": ["0", ""]})
    back, rows = read_candidates(path)
    assert [r["hits"] for r in rows] == ["0", ""] and back[0].peak == pytest.approx(0.9)


def test_peak_point_keeps_a_candidate_on_its_cmb_where_a_vein_joins_the_component(tmp_path) -> None:
    # a CMB-like blob (peak 0.95 at (5, 5, 5)) joined by a faint 14-voxel "vein" along i: one component, whose
    # score-weighted centroid is dragged ~2.5 voxels down the vein, 5 mm at 2 mm slices along i
    prob = np.zeros((24, 12, 12), np.float32)
    prob[4:7, 4:7, 4:7] = 0.6
    prob[5, 5, 5] = 0.95
    prob[7:21, 5, 5] = 0.4
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    (centroid,) = extract_candidates(prob, 0.2, affine, "s", point="centroid")
    (peak,) = extract_candidates(prob, 0.2, affine, "s", point="peak")
    assert (peak.peak, peak.mean, peak.size, peak.score) == (centroid.peak, centroid.mean, centroid.size, centroid.score)
    assert centroid.i > 7  # in the vein: more than 4 mm from the CMB's centre
    np.testing.assert_allclose(peak.voxel, (5, 5, 5), atol=1e-6)  # the 3x3x3 cube about the peak is the symmetric blob
    assert peak.x_mm == pytest.approx(10.0)
    # the default is the whole component's centroid, as before the option (and as every earlier run's files)
    (default,) = extract_candidates(prob, 0.2, affine, "s")
    np.testing.assert_array_equal(default.voxel, centroid.voxel)
    # a flat plateau: ties go to the first voxel in C order, and the cube about it stays inside the component
    flat = np.zeros((10, 10, 10), np.float32)
    flat[2:5, 2:5, 2:5] = 0.5
    (p,) = extract_candidates(flat, 0.2, np.eye(4), "s", point="peak")
    np.testing.assert_allclose(p.voxel, (2.5, 2.5, 2.5))
    # several components at once: each placed about its own peak
    two = np.zeros((30, 12, 12), np.float32)
    two[2:5, 2:5, 2:5], two[3, 3, 3] = 0.5, 0.9
    two[20:23, 6:9, 6:9], two[21, 8, 7] = 0.5, 0.8
    cands = extract_candidates(two, 0.2, np.eye(4), "s", point="peak")
    assert [c.peak for c in cands] == pytest.approx([0.9, 0.8])
    np.testing.assert_allclose(cands[0].voxel, (3, 3, 3), atol=1e-6)
    cube = two[20:23, 7:9, 6:9]  # the 3x3x3 cube about (21, 8, 7), clipped to the component (j <= 8)
    w = cube.astype(float)
    jj = np.arange(7, 9)[None, :, None] * np.ones_like(w)
    assert cands[1].j == pytest.approx(float((w * jj).sum() / w.sum()))
    with pytest.raises(ValueError, match="point must be one of"):
        extract_candidates(prob, 0.2, affine, "s", point="middle")


def compose_train(overrides: list[str]):  # noqa: ANN201 - a DictConfig
    """The training config as `python train.py OVERRIDES` composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_candidate_point_is_checked_at_the_door_and_enters_the_negatives_hashes_and_stamps_only_when_not_centroid() -> None:
    from omegaconf import open_dict

    from cmb.errors import ConfigError
    from cmb.eval.run_files import CANDIDATE_DEFINITION, candidate_settings
    from cmb.layout import CNN_SCORES, MIMICS
    from cmb.protocol.settings import member_settings, settings_hash
    from cmb.validate import check_train

    with pytest.raises(ConfigError, match="inference.candidate_point='middle' is not allowed: one of centroid, peak"):
        check_train(compose_train(["inference.candidate_point=middle"]))
    default, peak = compose_train([]), compose_train(["inference.candidate_point=peak"])
    check_train(peak)
    before = compose_train([])  # a run made before the option: no key at all
    with open_dict(before):
        del before.inference["candidate_point"]
    split = {"fold": 0, "train": ["a", "b"], "test": ["c"]}
    for stage in ("cnn", "unet"):  # CNNs: their mimics; U-Nets: their hard-negative round (on by default)
        hashes = [settings_hash(member_settings(c, stage, split, 20)) for c in (before, default, peak)]
        assert hashes[0] == hashes[1] != hashes[2]
    with open_dict(peak):
        peak.unet.refine.steps = 0
    with open_dict(default):
        default.unet.refine.steps = 0
    assert settings_hash(member_settings(default, "unet", split, 20)) == settings_hash(member_settings(peak, "unet", split, 20))
    for folder in (CNN_SCORES, MIMICS):  # out-of-fold files and mimics placed otherwise are recomputed, never reused
        assert candidate_settings(before, folder) == candidate_settings(default, folder) != candidate_settings(peak, folder)
    assert candidate_settings(default, CNN_SCORES)["candidates"] == CANDIDATE_DEFINITION
    assert "3x3x3 voxels about its peak" in candidate_settings(peak, CNN_SCORES)["candidates"]


def test_balanced_tiles_cover_the_box_with_fewest_even_tiles() -> None:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for size in [(470, 400, 140), (512, 512, 150), (100, 90, 40), (487, 230, 157)]:
        roi, overlap = balanced_tiles(size, (256, 256, 152), 0.1, 4)
        assert all(r % 4 == 0 for r in roi)
        windows = dense_patch_slices(size, roi, _get_scan_interval(size, roi, 3, overlap))
        covered = np.zeros(size, bool)
        for w in windows:
            covered[tuple(w)] = True
        assert covered.all()
        fixed_roi = tuple(min(t, -(-s // 4) * 4) for s, t in zip(size, (256, 256, 152)))
        fixed = dense_patch_slices(size, fixed_roi, _get_scan_interval(size, fixed_roi, 3, (0.1, 0.1, 0.1)))
        assert len(windows) <= len(fixed)
        assert len(windows) * np.prod(roi) <= len(fixed) * np.prod(fixed_roi)  # never more voxels computed
    assert balanced_tiles((470, 400, 140), (256, 256, 152), 0.1, 4)[0] == (264, 228, 140)  # not 3x256 along 470


def test_inference_copy_folds_batch_norm_without_changing_the_net_or_its_output() -> None:
    torch.manual_seed(0)
    net = UNet3D(channels=(4, 8), local_contrast=(3, 3, 3))
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d)):  # trained-looking statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(2, 1, 20, 20, 16)
    with torch.no_grad():
        expected = net.eval()(x)
        net.train()
        folded = inference_net(net)
        assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)
        half = inference_net(net, torch.bfloat16)
        assert half.head.weight.dtype == torch.bfloat16
        assert torch.corrcoef(torch.stack([half(x).float().flatten(), expected.flatten()]))[0, 1] > 0.99
    # the caller's network is untouched: still training, float32, with its batch norms
    assert net.training and net.head.weight.dtype == torch.float32
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules()) == 6


def test_brain_bbox_from_projections_and_prepared_copies_are_reused() -> None:
    from cmb.inference.unet_map import brain_bbox

    mask = np.zeros((30, 20, 10), bool)
    mask[5:9, 2:3, 7:10] = True
    assert brain_bbox(mask, 2) == (slice(3, 11), slice(0, 5), slice(5, 10))
    assert brain_bbox(np.zeros_like(mask), 2) == (slice(0, 30), slice(0, 20), slice(0, 10))
    net = UNet3D(channels=(4, 8))
    prepared = inference_net(net, torch.float32, True)
    assert inference_net(prepared, torch.float32, True) is prepared
    assert inference_net(prepared, torch.bfloat16, True) is not prepared


def test_infer_warns_when_a_scan_s_voxels_are_far_from_the_training_scans() -> None:
    from cmb.inference.predictor import voxel_size_warning

    training = {"min": [0.45, 0.45, 0.9], "max": [0.5, 0.5, 1.0]}
    assert voxel_size_warning("s", (0.5, 0.5, 1.2), training) is None  # within 25% of the range
    assert voxel_size_warning("s", (0.4, 0.4, 0.8), training) is None
    message = voxel_size_warning("s", (1.0, 1.0, 2.0), training)
    assert message is not None and message.startswith("s: voxel size 1.00x1.00x2.00 mm is far from the training scans' "
                                                       "(0.45x0.45x0.90 to 0.50x0.50x1.00 mm)")
    assert "preprocess.spacing=median" in message
    assert voxel_size_warning("s", (0.3, 0.45, 0.9), training) is not None  # one axis is enough
    assert voxel_size_warning("s", (1.0, 1.0, 2.0), None) is None  # members of an earlier cmb record no range


def test_with_peak_point_carries_the_peak_rule_point_beside_the_centroid_and_files_keep_it(tmp_path) -> None:
    from cmb.inference.candidates import PEAK_POINT_COLUMNS, Candidate

    prob = np.zeros((24, 12, 12), np.float32)  # the CMB-and-vein component of the test above
    prob[4:7, 4:7, 4:7] = 0.6
    prob[5, 5, 5] = 0.95
    prob[7:21, 5, 5] = 0.4
    prob[2, 10, 10] = 0.5  # and a one-voxel component
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    plain = extract_candidates(prob, 0.2, affine, "s")
    both = extract_candidates(prob, 0.2, affine, "s", with_peak_point=True)
    peak = extract_candidates(prob, 0.2, affine, "s", point="peak")
    assert [c.peak_point for c in plain] == [None, None]
    np.testing.assert_array_equal(candidate_points(both), candidate_points(plain))  # the candidate stays at its centroid
    np.testing.assert_allclose([c.peak_point for c in both], candidate_points(peak))  # and carries the peak rule's point
    np.testing.assert_allclose(both[0].peak_point, (5, 5, 5), atol=1e-6)
    np.testing.assert_allclose(both[1].peak_point, (2, 10, 10))
    path = write_candidates(both, tmp_path / "c.csv", {"hits": ["0", ""]})
    back, rows = read_candidates(path)
    assert [c.peak_point for c in back] == [c.peak_point for c in both] and [r["hits"] for r in rows] == ["0", ""]
    header = path.read_text().splitlines()[0].split(",")
    assert header[-4:] == [*PEAK_POINT_COLUMNS, "hits"]
    old, _ = read_candidates(write_candidates(plain, tmp_path / "old.csv"))  # files without the columns: no peak points
    assert [c.peak_point for c in old] == [None, None] and "peak_i" not in (tmp_path / "old.csv").read_text()
    with pytest.raises(ValueError, match="some candidates carry a peak point"):
        write_candidates([both[0], plain[1]], tmp_path / "mixed.csv")
    assert isinstance(back[0], Candidate)


class CentreDarknessNet(torch.nn.Module):
    """A fixed 'discriminator': CMB logit 20 * (0.5 - the window's centre voxel), so a darker centre scores higher."""

    def __init__(self) -> None:
        super().__init__()
        self.windows_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows_seen += len(x)
        centre = x[:, 0, x.shape[2] // 2, x.shape[3] // 2, x.shape[4] // 2]
        return torch.stack([torch.zeros_like(centre), 20 * (0.5 - centre)], dim=1)


def test_max_far_scores_the_peak_window_only_where_it_lies_far_and_takes_it_only_where_it_scores_higher() -> None:
    from dataclasses import replace

    from cmb.inference.candidates import Candidate
    from cmb.inference.cnn_scores import score_candidates, score_points

    image = np.full((40, 40, 30), 0.5, np.float32)
    image[10, 10, 10] = 0.1  # a dark CMB at candidate A's peak point, 4 voxels (4 mm) from A's centroid
    image[30, 30, 10] = 0.9  # a bright spot at C's peak point
    image[20, 20, 20] = 0.2  # B's own point is dark; its peak point, 1 mm away, darker still
    image[21, 20, 20] = 0.05
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-5.0, 2.0, 3.0)

    def cand(point, peak_point):
        return Candidate("s", *map(float, point), 0, 0, 0, 0.7, 0.5, 9, peak_point=tuple(map(float, peak_point)))

    cands = [cand((14, 10, 10), (10, 10, 10)), cand((20, 20, 20), (21, 20, 20)), cand((30, 30, 14), (30, 30, 10))]
    net = CentreDarknessNet()
    plain = score_candidates([net], image, cands, tta=False)
    assert net.windows_seen == 3
    net.windows_seen = 0
    far = score_candidates([net], image, cands, tta=False, window="max_far", affine=affine, far_mm=2.5)
    assert net.windows_seen == 3 + 2  # B's peak point is within 2.5 mm: its window is never scored
    a, b, c = far
    np.testing.assert_allclose(a.voxel, (10, 10, 10))  # A: the far, darker window wins, with its point in voxels and RAS mm
    assert (a.x_mm, a.y_mm, a.z_mm) == (5.0, 12.0, 13.0)
    assert a.score == pytest.approx(float(score_points([net], image, np.array([[10, 10, 10]]), tta=False)[0])) and a.score > plain[0].score
    assert (a.peak, a.mean, a.size) == (0.7, 0.5, 9)
    assert b == plain[1] and c == plain[2]  # B: too near; C: far but brighter
    np.testing.assert_array_equal(candidate_points([b, c]), candidate_points(cands[1:]))
    far_cutoff = score_candidates([net], image, cands, tta=False, window="max_far", affine=affine, far_mm=5.0)
    np.testing.assert_array_equal(candidate_points(far_cutoff), candidate_points(cands))  # 4 mm is not more than 5 mm: nobody moves
    assert score_candidates([net], image, [], window="max_far", affine=affine) == []
    with pytest.raises(ValueError, match="needs each candidate's peak point"):
        score_candidates([net], image, [replace(cands[0], peak_point=None)], window="max_far", affine=affine)
    with pytest.raises(ValueError, match="window must be one of"):
        score_candidates([net], image, cands, window="widest")


def test_stage2_window_is_checked_at_the_door_and_enters_the_detection_stamps_but_no_member_or_mimic() -> None:
    from omegaconf import open_dict

    from cmb.errors import ConfigError
    from cmb.eval.run_files import candidate_settings
    from cmb.layout import CNN_SCORES, MIMICS, PAPER_MINING, UNET_CANDIDATES
    from cmb.protocol.settings import member_settings, settings_hash
    from cmb.validate import check_train

    with pytest.raises(ConfigError, match="inference.stage2_window='widest' is not allowed: one of candidate, max_far"):
        check_train(compose_train(["inference.stage2_window=widest"]))
    candidate, far = compose_train(["inference.stage2_window=candidate"]), compose_train(["inference.stage2_window=max_far"])
    check_train(far)
    before = compose_train(["inference.stage2_window=candidate"])  # a run made before the option: no key at all
    with open_dict(before):
        del before.inference["stage2_window"]
    split = {"fold": 0, "train": ["a", "b"], "test": ["c"]}
    for stage in ("cnn", "unet"):  # mimics and hard negatives stay at the candidates' points: members are shared
        assert len({settings_hash(member_settings(c, stage, split, 20)) for c in (before, candidate, far)}) == 1
    for folder in (UNET_CANDIDATES, CNN_SCORES):  # peak points in one, the window scored in the other: recomputed, never reused
        assert candidate_settings(before, folder) == candidate_settings(candidate, folder) != candidate_settings(far, folder)
        assert candidate_settings(far, folder)["stage2_window"] == "max_far"
    for folder in (MIMICS, PAPER_MINING):
        assert candidate_settings(candidate, folder) == candidate_settings(far, folder)
