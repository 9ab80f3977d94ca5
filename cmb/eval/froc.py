"""FROC curve, sensitivity at FP rates, CPM, and threshold sweeps on matched detections.

Input everywhere: pooled per-detection `scores` and `status` (from `matching.assign`:
CMB index >= 0 is a hit, -1 a false positive, -2 a duplicate that counts as neither),
the total number of CMBs and of scans. Scans without CMBs and without detections
contribute only to the scan count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmb.eval.matching import FP

CPM_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class FROCCurve:
    """Points of the curve, one per distinct score (descending), starting at (0, 0)."""

    thresholds: np.ndarray
    fp_per_scan: np.ndarray
    sensitivity: np.ndarray


def froc_curve(scores: np.ndarray, status: np.ndarray, n_cmbs: int, n_scans: int) -> FROCCurve:
    """Sensitivity vs FP/scan over all score thresholds (every distinct score, ties together)."""
    if n_scans <= 0:
        raise ValueError("n_scans must be positive")
    scores = np.asarray(scores, dtype=float)
    status = np.asarray(status)
    order = np.argsort(-scores, kind="stable")
    s, st = scores[order], status[order]
    tp = np.cumsum(st >= 0)
    fp = np.cumsum(st == FP)
    last_of_tie = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)
    sens = tp[last_of_tie] / n_cmbs if n_cmbs > 0 else np.zeros(int(last_of_tie.sum()))
    return FROCCurve(np.r_[np.inf, s[last_of_tie]], np.r_[0.0, fp[last_of_tie] / n_scans], np.r_[0.0, sens])


def sensitivity_at(curve: FROCCurve, fp_rate: float) -> float:
    """Sensitivity at `fp_rate` FP/scan, linearly interpolated along the curve's polyline.

    Where several points share an FP rate (a vertical step), the segment to the left
    ends at the step's top and the segment to the right starts at its bottom, so no
    sensitivity is credited before the threshold that reaches it. Past the curve's
    last point the sensitivity stays at its final value.
    """
    fps, sens = curve.fp_per_scan, curve.sensitivity
    uniq = np.unique(fps)
    top = np.array([sens[fps == u].max() for u in uniq])
    bottom = np.array([sens[fps == u].min() for u in uniq])
    if fp_rate >= uniq[-1]:
        return float(top[-1])
    right = int(np.searchsorted(uniq, fp_rate, side="right"))
    left = right - 1
    if uniq[left] == fp_rate:
        return float(top[left])
    frac = (fp_rate - uniq[left]) / (uniq[right] - uniq[left])
    return float(top[left] + frac * (bottom[right] - top[left]))


def best_curve_point(curve: FROCCurve, max_fp_per_scan: float) -> dict:
    """The curve's point with the highest sensitivity at <= max FP/scan (highest threshold on ties).

    Unlike a fixed threshold grid this resolves scores that crowd near 1 (saturated
    stage-1 peaks). The start point (threshold inf, nothing kept) always qualifies.
    """
    ok = np.flatnonzero(curve.fp_per_scan <= max_fp_per_scan)
    best = ok[np.argmax(curve.sensitivity[ok])]  # argmax takes the first (highest-threshold) maximum
    return {"threshold": float(curve.thresholds[best]), "sensitivity": float(curve.sensitivity[best]),
            "fp_per_scan": float(curve.fp_per_scan[best])}


def cpm(curve: FROCCurve, rates: tuple[float, ...] = CPM_RATES) -> tuple[float, dict[str, float]]:
    """Competition performance metric: mean sensitivity at 1/8 ... 8 FP/scan."""
    at = {_rate_key(r): sensitivity_at(curve, r) for r in rates}
    return float(np.mean(list(at.values()))), at


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


def sweep(scores: np.ndarray, status: np.ndarray, n_cmbs: int, n_scans: int, thresholds: np.ndarray) -> list[dict]:
    """Operating points at each threshold (ascending): detections with score >= threshold."""
    scores = np.asarray(scores, dtype=float)
    status = np.asarray(status)
    out = []
    for t in np.sort(np.asarray(thresholds, dtype=float)):
        keep = scores >= t
        tp = int((status[keep] >= 0).sum())
        fp = int((status[keep] == FP).sum())
        out.append({"threshold": round(float(t), 6), "sensitivity": tp / n_cmbs if n_cmbs else 0.0,
                    "fp_per_scan": fp / n_scans, "tp": tp, "fp": fp})
    return out


def best_threshold(points: list[dict], max_fp_per_scan: float) -> dict | None:
    """The operating point with the highest sensitivity at <= max FP/scan (highest threshold on ties)."""
    ok = [p for p in points if p["fp_per_scan"] <= max_fp_per_scan]
    if not ok:
        return None
    return max(ok, key=lambda p: (p["sensitivity"], p["threshold"]))
