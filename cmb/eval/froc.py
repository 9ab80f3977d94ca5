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

    @property
    def max_fp_per_scan(self) -> float:
        """The largest FP/scan the curve reaches (its lowest threshold); beyond it sensitivity is held."""
        return float(self.fp_per_scan[-1])


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
    last point the sensitivity stays at its final value (the LUNA16/MONAI convention;
    `curve.max_fp_per_scan` says where the curve ends).
    """
    return float(sensitivities_at(curve, np.array([fp_rate], dtype=float))[0])


def sensitivities_at(curve: FROCCurve, fp_rates: np.ndarray) -> np.ndarray:
    """`sensitivity_at` for many rates at once (vectorized: the bootstrap calls it thousands of times)."""
    fps, sens = curve.fp_per_scan, curve.sensitivity  # both non-decreasing along the curve
    uniq, first = np.unique(fps, return_index=True)
    last = np.r_[first[1:], len(fps)] - 1
    top, bottom = sens[last], sens[first]
    rates = np.asarray(fp_rates, dtype=float)
    right = np.searchsorted(uniq, rates, side="right")
    left = np.maximum(right - 1, 0)
    out = np.empty(len(rates))
    past = right >= len(uniq)
    out[past] = top[-1]
    inside = ~past
    l, r = left[inside], right[inside]
    exact = uniq[l] == rates[inside]
    frac = np.where(exact, 0.0, (rates[inside] - uniq[l]) / np.where(exact, 1.0, uniq[r] - uniq[l]))
    out[inside] = np.where(exact, top[l], top[l] + frac * (bottom[r] - top[l]))
    return out


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
    values = sensitivities_at(curve, np.asarray(rates, dtype=float))
    at = {_rate_key(r): float(v) for r, v in zip(rates, values)}
    return float(np.mean(values)), at


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


def counts_at(scores: np.ndarray, status: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(true positives, false positives, detections) among the detections scoring >= `threshold`; `status`
    from `cmb.eval.matching.assign` (CMB index, FP, or a duplicate on a found CMB, which is neither)."""
    keep = np.asarray(scores, dtype=float) >= threshold
    st = np.asarray(status)[keep]
    return int((st >= 0).sum()), int((st == FP).sum()), int(keep.sum())


def sweep(scores: np.ndarray, status: np.ndarray, n_cmbs: int, n_scans: int, thresholds: np.ndarray) -> list[dict]:
    """Operating points at each threshold (ascending): detections with score >= threshold."""
    out = []
    for t in np.sort(np.asarray(thresholds, dtype=float)):
        tp, fp, _ = counts_at(scores, status, t)
        out.append({"threshold": round(float(t), 6), "sensitivity": tp / n_cmbs if n_cmbs else 0.0,
                    "fp_per_scan": fp / n_scans, "tp": tp, "fp": fp})
    return out


def best_threshold(points: list[dict], max_fp_per_scan: float) -> dict | None:
    """The operating point with the highest sensitivity at <= max FP/scan (highest threshold on ties)."""
    ok = [p for p in points if p["fp_per_scan"] <= max_fp_per_scan]
    if not ok:
        return None
    return max(ok, key=lambda p: (p["sensitivity"], p["threshold"]))


def choose_operating_point(points: list[dict], max_fp_per_scan: float) -> dict:
    """`best_threshold`, labelled: `within_budget` is False (and `rule` says so) when no threshold of
    the sweep reaches <= max FP/scan; the point is then the sweep's fewest-FP one (highest threshold)."""
    best = best_threshold(points, max_fp_per_scan)
    if best is not None:
        return {**best, "within_budget": True, "rule": f"highest sensitivity at <= {max_fp_per_scan:g} FP/scan"}
    fewest = min(points, key=lambda p: (p["fp_per_scan"], -p["threshold"]))
    return {**fewest, "within_budget": False,
            "rule": f"no threshold reaches <= {max_fp_per_scan:g} FP/scan; fewest false positives of the sweep instead"}
