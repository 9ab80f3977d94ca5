"""Per-scan figures at one threshold: VALDO Task 2's precision, recall, F1 and count difference,
and sensitivity by CMB size.

Conventions (stated in report.md): a detection counts when its score >= the threshold. For
precision and F1 every kept detection that is not matched one-to-one to a CMB is a false
positive, duplicates included, as in VALDO (the FROC instead ignores duplicates, as LUNA16
does). A scan without CMBs has no recall and no F1 (VALDO: NaN, left out of the median); a
scan with CMBs and no detection has F1 0. Medians and IQRs are over the scans where the value
is defined, and say how many those are.
"""

from __future__ import annotations

import math

import numpy as np

from cmb.eval.froc import counts_at

SIZE_BINS: tuple[tuple[str, float, float], ...] = (("< 3 mm", 0.0, 3.0), ("3-5 mm", 3.0, 5.0), ("> 5 mm", 5.0, math.inf))
UNKNOWN_SIZE = "unknown (centroid-only truth)"


def scan_counts(scores: np.ndarray, status: np.ndarray, n_cmbs: int, threshold: float) -> dict:
    """TP, FP (FROC sense), duplicates and the VALDO figures of one scan at `threshold`."""
    tp, fp, n_det = counts_at(scores, status, threshold)
    duplicates = n_det - tp - fp
    precision = tp / n_det if n_det else math.nan
    recall = tp / n_cmbs if n_cmbs else math.nan
    f1 = 2 * tp / (2 * tp + (n_det - tp) + (n_cmbs - tp)) if n_cmbs else math.nan
    return {"tp": tp, "fp": fp, "duplicates": duplicates, "n_detections": n_det, "precision": precision, "recall": recall,
            "f1": f1, "count_abs_diff": abs(n_det - n_cmbs)}


def median_iqr(values: list[float]) -> dict:
    """Median, 25th and 75th percentiles of the defined (non-NaN) values, and how many there were."""
    v = np.array([x for x in values if not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return {"median": None, "q25": None, "q75": None, "n_scans": 0}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "q25": float(q25), "q75": float(q75), "n_scans": int(len(v))}


def valdo_summary(per_scan: list[dict]) -> dict:
    """Median and IQR over scans of precision, recall, F1 and |detected - true| count."""
    return {key: median_iqr([float(s[key]) for s in per_scan]) for key in ("precision", "recall", "f1", "count_abs_diff")}


def size_bin(diameter_mm: float | None) -> str:
    if diameter_mm is None:
        return UNKNOWN_SIZE
    return next(name for name, lo, hi in SIZE_BINS if lo <= diameter_mm < hi)


def sensitivity_by_size(found: list[tuple[list[float | None], set[int]]]) -> dict:
    """Per size bin: CMBs, found CMBs and sensitivity. `found`: per scan (diameters per CMB, indices found)."""
    bins = {name: [0, 0] for name, _, _ in SIZE_BINS}
    bins[UNKNOWN_SIZE] = [0, 0]
    for diameters, hit in found:
        for index, d in enumerate(diameters):
            entry = bins[size_bin(d)]
            entry[0] += 1
            entry[1] += int(index in hit)
    return {name: {"n_cmbs": n, "found": f, "sensitivity": f / n if n else None} for name, (n, f) in bins.items() if n or name != UNKNOWN_SIZE}


def found_cmbs(scores: np.ndarray, status: np.ndarray, threshold: float) -> set[int]:
    """Indices of the CMBs matched by detections scoring >= threshold."""
    st = np.asarray(status)[np.asarray(scores) >= threshold]
    return {int(s) for s in st if s >= 0}
