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
