"""Matching, sensitivity, FP/scan, FROC interpolation and CPM on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from cmb.eval.froc import best_curve_point, best_threshold, cpm, froc_curve, sensitivity_at, sweep
from cmb.eval.matching import DUPLICATE, FP, Truth, assign, hit_sets

SPACING = (0.5, 0.5, 1.0)


def test_radius_rule_just_inside_and_just_outside() -> None:
    truth = Truth(np.array([[10.0, 10.0, 10.0]]), SPACING)
    inside = [10 + 2.4 / 0.5, 10, 10]  # 2.4 mm along i
    outside = [10, 10 + 2.6 / 0.5, 10]  # 2.6 mm along j
    assert hit_sets(np.array([inside, outside]), truth, radius_mm=2.5) == [[0], []]


def test_component_rule_wins_and_radius_is_fallback() -> None:
    instances = np.zeros((30, 30, 30), np.int32)
    instances[5:15, 10, 10] = 1  # an elongated CMB: its far end is 4.5 mm from the centroid
    truth = Truth(np.array([[9.5, 10, 10], [25, 25, 25]]), SPACING, instances)
    assert hit_sets(np.array([[14, 10, 10]]), truth) == [[0]]  # inside the component, beyond the radius
    assert hit_sets(np.array([[25, 27, 25]]), truth) == [[1]]  # CMB 2 has no component voxel: radius fallback (1 mm)
    assert hit_sets(np.array([[20, 20, 20]]), truth) == [[]]


def test_duplicates_are_ignored_and_nearest_free_cmb_is_taken() -> None:
    truth = Truth(np.array([[10.0, 10, 10], [10.0, 18, 10]]), SPACING)  # 4 mm apart
    points = np.array([[10, 10, 10], [10, 10.5, 10], [10, 14, 10], [30, 30, 30]])
    hits = hit_sets(points, truth)
    assert hits[0] == [0] and hits[2] == [0, 1]  # equidistant: order of listing
    status = assign(np.array([0.9, 0.8, 0.7, 0.6]), hits)
    # 0.9 finds CMB 0; 0.8 hits only CMB 0 again -> duplicate; 0.7 finds CMB 1; 0.6 is a false positive
    assert status.tolist() == [0, DUPLICATE, 1, FP]


def test_scan_without_cmbs_only_adds_false_positives() -> None:
    empty = Truth(np.zeros((0, 3)), SPACING)
    status = assign(np.array([0.5, 0.4]), hit_sets(np.array([[1, 1, 1], [5, 5, 5]]), empty))
    assert status.tolist() == [FP, FP]
    curve = froc_curve(np.array([0.5, 0.4]), status, n_cmbs=0, n_scans=1)
    assert curve.sensitivity.max() == 0 and curve.fp_per_scan[-1] == 2


def test_pooled_sweep_froc_and_cpm_by_hand() -> None:
    # scan A: 2 CMBs, detections 0.9 (hit 0), 0.8 (FP), 0.6 (duplicate of 0), 0.3 (hit 1)
    # scan B: 1 CMB, detections 0.7 (FP), 0.5 (hit), plus one scan C with nothing at all
    scores = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5])
    status = np.array([0, FP, DUPLICATE, 1, FP, 0])
    n_cmbs, n_scans = 3, 3
    pts = {p["threshold"]: p for p in sweep(scores, status, n_cmbs, n_scans, [0.85, 0.55, 0.4, 0.2])}
    assert (pts[0.85]["tp"], pts[0.85]["fp"]) == (1, 0)
    assert (pts[0.55]["tp"], pts[0.55]["fp"]) == (1, 2)  # the duplicate at 0.6 counts as nothing
    assert (pts[0.4]["tp"], pts[0.4]["fp"]) == (2, 2)
    assert pts[0.2]["sensitivity"] == 1.0 and pts[0.2]["fp_per_scan"] == pytest.approx(2 / 3)
    curve = froc_curve(scores, status, n_cmbs, n_scans)
    # points: (0,0) (0,1/3)@0.9 (1/3,1/3)@0.8 (2/3,1/3)@0.7 (2/3,1/3)@0.6 (2/3,2/3)@0.5 (2/3,1)@0.3
    np.testing.assert_allclose(curve.fp_per_scan, [0, 0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(curve.sensitivity, [0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    assert sensitivity_at(curve, 0.125) == pytest.approx(1 / 3)  # flat segment
    assert sensitivity_at(curve, 0.5) == pytest.approx(1 / 3)  # before the vertical step at 2/3
    assert sensitivity_at(curve, 2 / 3) == pytest.approx(1.0)  # top of the step
    assert sensitivity_at(curve, 8) == pytest.approx(1.0)  # past the end: stays at the final value
    value, at = cpm(curve)
    assert at == pytest.approx({"0.125": 1 / 3, "0.25": 1 / 3, "0.5": 1 / 3, "1": 1, "2": 1, "4": 1, "8": 1})
    assert value == pytest.approx((3 / 3 + 4) / 7)


def test_interpolation_between_distinct_fp_rates() -> None:
    # one scan, 2 CMBs: hit@0.9, FP@0.8, FP@0.7, hit@0.6  -> (0,.5) (1,.5) (2,.5) (2,1)
    curve = froc_curve(np.array([0.9, 0.8, 0.7, 0.6]), np.array([0, FP, FP, 1]), 2, 1)
    assert sensitivity_at(curve, 1.5) == pytest.approx(0.5)
    # two scans, CMB found only after 1 FP/scan rises linearly between (0.5, .5) and (1.0, 1.0)
    curve = froc_curve(np.array([0.9, 0.8, 0.6]), np.array([0, FP, 1]), 2, 2)
    assert curve.fp_per_scan.tolist() == [0, 0, 0.5, 0.5]
    assert sensitivity_at(curve, 0.25) == pytest.approx(0.5)


def test_best_threshold_picks_highest_sensitivity_within_budget() -> None:
    points = [{"threshold": 0.1, "sensitivity": 1.0, "fp_per_scan": 9.0}, {"threshold": 0.3, "sensitivity": 0.9, "fp_per_scan": 3.0},
              {"threshold": 0.5, "sensitivity": 0.9, "fp_per_scan": 1.0}, {"threshold": 0.8, "sensitivity": 0.5, "fp_per_scan": 0.0}]
    assert best_threshold(points, 4.0)["threshold"] == 0.5
    assert best_threshold(points, 10.0)["threshold"] == 0.1
    assert best_threshold([p for p in points if p["fp_per_scan"] > 5], 4.0) is None


def test_best_curve_point_resolves_saturated_scores_within_budget() -> None:
    # one scan, 3 CMBs; scores crowd near 1 as stage-1 peaks do
    scores = np.array([0.99995, 0.9999, 0.9998, 0.9990, 0.998, 0.5])
    status = np.array([0, FP, 1, FP, FP, 2])
    curve = froc_curve(scores, status, n_cmbs=3, n_scans=1)
    assert best_curve_point(curve, 1.0) == pytest.approx({"threshold": 0.9998, "sensitivity": 2 / 3, "fp_per_scan": 1.0})
    assert best_curve_point(curve, 3.0)["sensitivity"] == pytest.approx(1.0)
    assert best_curve_point(curve, 0.0) == pytest.approx({"threshold": 0.99995, "sensitivity": 1 / 3, "fp_per_scan": 0.0})


# ----------------------------------------------------------------------------- order-independent one-to-one matching


def _tp_at_every_threshold(scores: np.ndarray, status: np.ndarray) -> list[int]:
    return [int((status[scores >= t] >= 0).sum()) for t in sorted(set(scores.tolist()))]


def test_a_detection_between_two_cmbs_and_a_second_on_one_of_them_find_both() -> None:
    truth = Truth(np.array([[10.0, 10, 10], [10.0, 18, 10]]), SPACING)  # 4 mm apart along j
    points = np.array([[10, 14, 10], [10, 10, 10]])  # the first is 2 mm from both; the second sits on CMB 0
    hits = hit_sets(points, truth)
    assert hits == [[0, 1], [0]]
    # greedy nearest-free would give the higher-scored detection CMB 0 and call the second a duplicate
    status = assign(np.array([0.9, 0.8]), hits, points)
    assert sorted(status.tolist()) == [0, 1]
    assert status.tolist() == [1, 0]


def test_two_detections_on_one_cmb_count_once() -> None:
    truth = Truth(np.array([[10.0, 10, 10]]), SPACING)
    points = np.array([[10, 10, 10], [10, 11, 10], [30, 30, 30]])
    status = assign(np.array([0.5, 0.9, 0.7]), hit_sets(points, truth), points)
    assert status.tolist() == [DUPLICATE, 0, FP]  # the higher score takes the CMB


@pytest.mark.parametrize("seed", range(5))
def test_matching_does_not_depend_on_row_order_even_with_tied_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = Truth(rng.uniform(5, 25, (6, 3)), SPACING)
    points = np.concatenate([truth.centroids_vox + rng.normal(0, 1.5, truth.centroids_vox.shape), rng.uniform(0, 30, (8, 3))])
    scores = rng.choice([0.3, 0.6, 0.9], len(points))  # many ties
    status = assign(scores, hit_sets(points, truth, 2.5), points)
    for _ in range(10):
        perm = rng.permutation(len(points))
        st = assign(scores[perm], hit_sets(points[perm], truth, 2.5), points[perm])
        assert st.tolist() == status[perm].tolist()  # the same detection gets the same status
        assert _tp_at_every_threshold(scores[perm], st) == _tp_at_every_threshold(scores, status)


def test_every_threshold_gets_a_maximum_matching() -> None:
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(3)
    truth = Truth(rng.uniform(5, 15, (8, 3)), (1.0, 1.0, 1.0))  # crowded: many shared hits
    points = rng.uniform(5, 15, (20, 3))
    scores = rng.uniform(0, 1, 20)
    hits = hit_sets(points, truth, 3.0)
    status = assign(scores, hits, points)
    for t in np.unique(scores):
        keep = np.flatnonzero(scores >= t)
        cost = np.ones((len(keep), truth.n_cmbs))
        for row, d in enumerate(keep):
            cost[row, hits[d]] = 0.0
        r, c = linear_sum_assignment(cost)
        assert int((cost[r, c] == 0).sum()) == int((status[keep] >= 0).sum())


def test_a_10mm_cmb_is_hit_at_its_edge_through_its_label_component_only() -> None:
    spacing = (0.5, 0.5, 1.0)
    grid = np.indices((60, 60, 30)).astype(float)
    centre = np.array([30.0, 30.0, 15.0])
    r_mm = np.sqrt(sum(((grid[a] - centre[a]) * spacing[a]) ** 2 for a in range(3)))
    instances = (r_mm <= 5.0).astype(np.int32)  # a 10 mm CMB
    edge = [[30 + 4.5 / 0.5, 30, 15]]  # 4.5 mm from the centre, inside the component
    assert hit_sets(np.array(edge), Truth(centre[None], spacing, instances)) == [[0]]
    assert hit_sets(np.array(edge), Truth(centre[None], spacing)) == [[]]  # centroid-only: beyond 2.5 mm


def test_distances_are_in_mm_on_anisotropic_voxels() -> None:
    truth = Truth(np.array([[10.0, 10, 10]]), (0.45, 0.45, 2.0))
    assert hit_sets(np.array([[10, 10, 11]]), truth) == [[0]]  # 1 slice = 2.0 mm
    assert hit_sets(np.array([[10, 10, 12]]), truth) == [[]]  # 2 slices = 4.0 mm
    assert hit_sets(np.array([[15, 10, 10]]), truth) == [[0]]  # 5 voxels in-plane = 2.25 mm


# ----------------------------------------------------------------------------- cross-check with MONAI, curve ends


def test_cpm_agrees_with_monai_apart_from_its_dropped_lowest_threshold() -> None:
    from monai.metrics import compute_froc_curve_data, compute_froc_score

    from cmb.eval.froc import CPM_RATES

    # 4 scans, 5 CMBs; every CMB hit at most once, distinct scores, FP steps at distinct rates
    scores = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    status = np.array([0, 1, FP, 2, FP, FP, 3, FP, FP, FP, FP, 4])  # the last, lowest-scored detection is a hit
    n_cmbs, n_scans = 5, 4
    curve = froc_curve(scores, status, n_cmbs, n_scans)
    ours, _ = cpm(curve)
    # MONAI on the same curve points (its arrays run from low to high threshold): equal
    assert compute_froc_score(curve.fp_per_scan[::-1], curve.sensitivity[::-1], CPM_RATES) == pytest.approx(ours)
    # MONAI's own curve skips the lowest score as a threshold, so it never credits the CMB found last
    fps, sens = compute_froc_curve_data(scores[status == FP], scores[status >= 0], n_cmbs, n_scans)
    assert sens.max() == pytest.approx(4 / 5) and curve.sensitivity.max() == pytest.approx(1.0)
    without_lowest = froc_curve(scores[:-1], status[:-1], n_cmbs, n_scans)
    assert compute_froc_score(fps, sens, CPM_RATES) == pytest.approx(cpm(without_lowest)[0])
    assert compute_froc_score(fps, sens, CPM_RATES) < ours


def test_the_curve_records_where_it_ends_and_holds_sensitivity_beyond() -> None:
    curve = froc_curve(np.array([0.9, 0.8]), np.array([0, FP]), n_cmbs=2, n_scans=2)
    assert curve.max_fp_per_scan == 0.5
    assert sensitivity_at(curve, 8.0) == sensitivity_at(curve, 0.5) == 0.5


def test_choose_operating_point_labels_a_point_over_the_budget() -> None:
    from cmb.eval.froc import choose_operating_point

    points = [{"threshold": 0.5, "sensitivity": 1.0, "fp_per_scan": 9.0}, {"threshold": 0.9, "sensitivity": 0.8, "fp_per_scan": 6.0}]
    choice = choose_operating_point(points, 4.0)
    assert choice["threshold"] == 0.9 and choice["within_budget"] is False and "no threshold reaches" in choice["rule"]
    assert choose_operating_point(points, 6.0)["within_budget"] is True


# ----------------------------------------------------------------------------- per-scan figures and sizes


def test_valdo_per_scan_figures_by_hand() -> None:
    from cmb.eval.scan_metrics import scan_counts, valdo_summary

    # 3 CMBs; kept at 0.5: hit 0, duplicate of 0, FP, hit 1  -> TP 2, FP 1, duplicate 1, FN 1
    c = scan_counts(np.array([0.9, 0.8, 0.7, 0.6, 0.1]), np.array([0, DUPLICATE, FP, 1, 2]), 3, 0.5)
    assert (c["tp"], c["fp"], c["duplicates"], c["n_detections"]) == (2, 1, 1, 4)
    assert c["precision"] == pytest.approx(2 / 4)  # VALDO: the duplicate is a false positive here
    assert c["recall"] == pytest.approx(2 / 3) and c["f1"] == pytest.approx(4 / (4 + 2 + 1)) and c["count_abs_diff"] == 1
    empty = scan_counts(np.array([0.9]), np.array([FP]), 0, 0.5)  # no CMBs: no recall, no F1
    assert np.isnan(empty["recall"]) and np.isnan(empty["f1"]) and empty["precision"] == 0.0
    missed = scan_counts(np.zeros(0), np.zeros(0, int), 2, 0.5)  # CMBs, no detection: F1 0, no precision
    assert missed["f1"] == 0.0 and np.isnan(missed["precision"]) and missed["count_abs_diff"] == 2
    summary = valdo_summary([c, empty, missed])
    assert summary["f1"]["n_scans"] == 2 and summary["f1"]["median"] == pytest.approx((4 / 7) / 2)
    assert summary["count_abs_diff"]["n_scans"] == 3


def test_sensitivity_by_size_bins() -> None:
    from cmb.eval.scan_metrics import UNKNOWN_SIZE, sensitivity_by_size

    out = sensitivity_by_size([([2.0, 4.0, 6.0, 2.9], {0, 2}), ([None, 3.0], {1})])
    assert out["< 3 mm"] == {"n_cmbs": 2, "found": 1, "sensitivity": 0.5}
    assert out["3-5 mm"] == {"n_cmbs": 2, "found": 1, "sensitivity": 0.5}
    assert out["> 5 mm"] == {"n_cmbs": 1, "found": 1, "sensitivity": 1.0}
    assert out[UNKNOWN_SIZE] == {"n_cmbs": 1, "found": 0, "sensitivity": 0.0}


def test_froc_plot_zooms_the_sensitivity_axis_to_what_it_shows() -> None:
    from cmb.eval.report import _short_name, _visible_low, sensitivity_floor

    class Curve:
        fp_per_scan = np.array([0.0, 0.005, 0.5, 3.0])
        sensitivity = np.array([0.0, 0.84, 0.9, 0.96])

    assert _visible_low(Curve()) == 0.84  # the step drawn at the left edge (1e-2 FP/scan), not the 0 at no detections
    assert sensitivity_floor([0.84, 0.95]) == pytest.approx(0.75)
    assert sensitivity_floor([0.02]) == 0.0
    assert _short_name("Rau et al. 2026 (Brain Sciences, doi 10.3390/x), final, lower threshold") == "Rau et al. 2026, final, low…"


def test_keep_rate_counts_the_cmbs_stage2_keeps_of_those_stage1_found() -> None:
    from cmb.eval.evaluate import keep_rate
    from cmb.eval.run_files import ScanRecord, StageDetections

    points = np.zeros((4, 3))
    status = np.array([0, 1, 2, -1])  # three candidates on CMBs 0, 1, 2, one false positive
    stage1 = StageDetections(np.array([0.9, 0.5, 0.1, 0.8]), points, status)  # CMB 2 below stage 1's 0.2
    two = StageDetections(np.array([0.95, 0.3, 0.99, 0.9]), points, status)  # at 0.5 stage 2 drops CMB 1
    record = ScanRecord("s", 0, 3, [None] * 3, stage1, two)
    assert keep_rate([record], 0.2, [0.5]) == {"found_by_stage1": 2, "kept": 1, "rate": 0.5}
    assert keep_rate([record], 0.2, [0.2])["rate"] == 1.0
    assert keep_rate([record, record], 0.2, [0.5, 0.0])["kept"] == 3
