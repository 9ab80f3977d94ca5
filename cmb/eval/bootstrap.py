"""Confidence intervals by a percentile bootstrap over scans.

A resample draws as many scans as there are, with replacement (seeded); each drawn scan brings
its CMBs and all its detections, with the matching it had (matching is per scan). Operating
points keep their threshold (the per-fold thresholds of the nested point included); the FROC,
its CPM and the sensitivities at fixed FP rates are recomputed on each resample. Resamples
without any CMB are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmb.eval.froc import CPM_RATES, froc_curve, sensitivities_at
from cmb.eval.run_files import ScanRecord
from cmb.eval.scan_metrics import scan_counts


@dataclass
class BootstrapResult:
    """Interval bounds per statistic and the band of each FROC over `band_rates` (FP/scan)."""

    intervals: dict
    band_rates: np.ndarray
    bands: dict[str, tuple[np.ndarray, np.ndarray]]
    n_used: int


def _point_counts(records: list[ScanRecord], thresholds: list[float], stage: str) -> tuple[np.ndarray, np.ndarray]:
    """Per scan (TP, FP) of `stage` at that scan's threshold."""
    counts = [scan_counts(getattr(r, stage).scores, getattr(r, stage).status, r.n_cmbs, t) for r, t in zip(records, thresholds)]
    return np.array([c["tp"] for c in counts]), np.array([c["fp"] for c in counts])


def bootstrap(records: list[ScanRecord], points: dict[str, tuple[str, list[float]]], n_resamples: int = 1000, seed: int = 0,
              level: float = 0.95, band_rates: np.ndarray | None = None) -> BootstrapResult:
    """Percentile intervals for each operating point in `points` (name -> (stage, threshold per record)),
    for both FROCs' sensitivity at the CPM rates and their CPM, and FROC bands over `band_rates`."""
    if n_resamples < 1:
        raise ValueError("n_resamples must be positive")
    band_rates = np.geomspace(0.01, 100.0, 81) if band_rates is None else np.asarray(band_rates, dtype=float)
    n_scans = len(records)
    n_cmbs = np.array([r.n_cmbs for r in records])
    counts = {name: _point_counts(records, thr, stage) for name, (stage, thr) in points.items()}
    rng = np.random.default_rng(seed)
    samples: dict[str, list] = {f"{name}.{k}": [] for name in points for k in ("sensitivity", "fp_per_scan")}
    curve_samples: dict[str, list] = {"two_stage": [], "stage1": []}
    band_samples: dict[str, list] = {"two_stage": [], "stage1": []}
    rates = np.asarray(CPM_RATES, dtype=float)
    for _ in range(n_resamples):
        idx = rng.integers(0, n_scans, n_scans)
        total = int(n_cmbs[idx].sum())
        if total == 0:
            continue
        for name, (tp, fp) in counts.items():
            samples[f"{name}.sensitivity"].append(tp[idx].sum() / total)
            samples[f"{name}.fp_per_scan"].append(fp[idx].sum() / n_scans)
        for stage in ("two_stage", "stage1"):
            dets = [getattr(records[i], stage) for i in idx]
            curve = froc_curve(np.concatenate([d.scores for d in dets]), np.concatenate([d.status for d in dets]), total, n_scans)
            curve_samples[stage].append(sensitivities_at(curve, rates))
            band_samples[stage].append(sensitivities_at(curve, band_rates))
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(values: list | np.ndarray) -> list[float] | None:
        arr = np.asarray(values, dtype=float)
        return None if arr.size == 0 else [float(np.percentile(arr, lo_q)), float(np.percentile(arr, hi_q))]

    intervals: dict = {name: {k: interval(samples[f"{name}.{k}"]) for k in ("sensitivity", "fp_per_scan")} for name in points}
    bands = {}
    for stage, key in (("two_stage", "froc"), ("stage1", "stage1_froc")):
        sens = np.asarray(curve_samples[stage]).reshape(-1, len(rates))
        intervals[key] = {"cpm": interval(sens.mean(axis=1)),
                          "sensitivity_at_fp": {f"{r:g}": interval(sens[:, n]) for n, r in enumerate(rates)}}
        band = np.asarray(band_samples[stage]).reshape(-1, len(band_rates))
        bands[stage] = (np.percentile(band, lo_q, axis=0), np.percentile(band, hi_q, axis=0)) if len(band) else (band_rates * np.nan,) * 2
    return BootstrapResult(intervals, band_rates, bands, len(curve_samples["two_stage"]))
