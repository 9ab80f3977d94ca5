"""Evaluate a finished LOTCV run from its cached out-of-fold outputs (no network is run).

Reads (and checks) every held-out scan's truth and candidates (`cmb.eval.run_files`), then
writes into the run folder: results.json (docs/design.md), operating_points.csv, froc.png,
report.md; logs the same to wandb (offline) when enabled. Nothing is written unless every
input file is valid.

Two kinds of operating point are reported and labelled as such:
- in-sample: a threshold chosen on the pooled out-of-fold predictions and reported on the
  same predictions (the standard FROC reading; `chosen_operating_point` is also infer.py's
  default threshold);
- nested: for each fold, the threshold is chosen by the same rule on the other folds'
  out-of-fold predictions and applied to the fold's held-out scans; the pooled result
  (`nested_operating_point`) never lets a scan choose its own threshold.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger

from cmb.data.io import atomic_write_text
from cmb.errors import DataError
from cmb.eval.bootstrap import bootstrap
from cmb.eval.froc import FROCCurve, best_curve_point, choose_operating_point, cpm, froc_curve, sweep
from cmb.eval.report import plot_froc, report_markdown
from cmb.eval.run_files import ScanRecord, candidate_definition, read_run
from cmb.eval.scan_metrics import found_cmbs, scan_counts, sensitivity_by_size, valdo_summary
from cmb.layout import RunLayout
from cmb.loggers import build_loggers, finish_wandb_run

log = logging.getLogger(__name__)
IN_SAMPLE = "in-sample: threshold chosen on the same out-of-fold predictions it is reported on"
NESTED = "nested: each fold's threshold chosen on the other folds' out-of-fold predictions, applied to its held-out scans"
TRANSFER = "transfer: the scored run's own threshold (chosen on its out-of-fold predictions), applied unchanged to this dataset"


def threshold_grid(eval_cfg: Any) -> np.ndarray:
    """The stage-2 thresholds swept for operating points (`eval.thresholds`: start, stop, step; both ends included)."""
    grid = eval_cfg.get("thresholds") or {}
    start, stop, step = float(grid.get("start", 0.0)), float(grid.get("stop", 1.0)), float(grid.get("step", 0.01))
    return np.round(np.arange(start, stop + step / 100, step), 6)


def _pooled(records: list[ScanRecord], stage: str) -> tuple[np.ndarray, np.ndarray]:
    dets = [getattr(r, stage) for r in records]
    if not dets:
        return np.zeros(0), np.zeros(0, int)
    return np.concatenate([d.scores for d in dets]), np.concatenate([d.status for d in dets])


def stage_curve(records: list[ScanRecord], stage: str) -> FROCCurve:
    scores, status = _pooled(records, stage)
    return froc_curve(scores, status, sum(r.n_cmbs for r in records), len(records))


def stage_sweep(records: list[ScanRecord], stage: str, thresholds: np.ndarray) -> list[dict]:
    scores, status = _pooled(records, stage)
    return sweep(scores, status, sum(r.n_cmbs for r in records), len(records), thresholds)


def nested_operating_point(records: list[ScanRecord], thresholds: np.ndarray, target_fp: float) -> dict | None:
    """Per fold, the threshold chosen (highest sensitivity at <= target FP/scan) on the other folds'
    out-of-fold two-stage predictions, applied to this fold's scans; pooled over folds. None with
    fewer than two folds."""
    folds = sorted({r.fold for r in records})
    if len(folds) < 2:
        return None
    per_fold, tp, fp = [], 0, 0
    for fold in folds:
        others = [r for r in records if r.fold != fold]
        choice = choose_operating_point(stage_sweep(others, "two_stage", thresholds), target_fp)
        mine = [scan_counts(r.two_stage.scores, r.two_stage.status, r.n_cmbs, choice["threshold"]) for r in records if r.fold == fold]
        f_tp, f_fp = sum(c["tp"] for c in mine), sum(c["fp"] for c in mine)
        per_fold.append({"fold": fold, "threshold": choice["threshold"], "within_budget": choice["within_budget"], "tp": f_tp, "fp": f_fp,
                         "n_cmbs": sum(r.n_cmbs for r in records if r.fold == fold), "n_scans": len(mine)})
        tp, fp = tp + f_tp, fp + f_fp
    n_cmbs = sum(r.n_cmbs for r in records)
    return {"sensitivity": tp / n_cmbs if n_cmbs else 0.0, "fp_per_scan": fp / len(records), "tp": tp, "fp": fp,
            "rule": f"highest sensitivity at <= {target_fp:g} FP/scan", "selection": NESTED, "per_fold": per_fold}


def keep_rate(records: list[ScanRecord], unet_threshold: float, thresholds: list[float]) -> dict[str, Any]:
    """Of the CMBs stage 1 finds at `unet_threshold`, how many the two-stage result still finds at each
    scan's threshold: the share of stage 1's work that stage 2 keeps."""
    found, kept = 0, 0
    for r, t in zip(records, thresholds):
        by_stage1 = found_cmbs(r.stage1.scores, r.stage1.status, unet_threshold)
        found += len(by_stage1)
        kept += len(by_stage1 & found_cmbs(r.two_stage.scores, r.two_stage.status, t))
    return {"found_by_stage1": found, "kept": kept, "rate": kept / found if found else None}


def _per_scan(records: list[ScanRecord], thresholds: list[float]) -> list[dict]:
    out = []
    for r, t in zip(records, thresholds):
        counts = scan_counts(r.two_stage.scores, r.two_stage.status, r.n_cmbs, t)
        out.append({"scan_id": r.scan_id, "fold": r.fold, "n_cmbs": r.n_cmbs, "threshold": t, **counts})
    return out


def _json_safe(value: Any) -> Any:
    """NaN (undefined per-scan figures) as null in results.json."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _dataset_name(cfg: DictConfig) -> str:
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    name = str(data_cfg.get("_target_", "")).rsplit(".", 1)[-1].replace("Dataset", "").lower()  # type: ignore[union-attr]
    return f"synthetic:{data_cfg.get('preset')}" if name == "synthetic" else name  # type: ignore[union-attr]


def load_run_config(run_dir: Path) -> DictConfig:
    path = RunLayout(run_dir).config
    if not path.is_file():
        raise DataError(run_dir, "not a run folder (no config.yaml)")
    cfg = OmegaConf.load(path)
    if "unet" not in cfg:  # before cmb 0.2 the U-Net's group was `model`, and out-of-fold files were laid out otherwise
        raise DataError(path, "a run folder of an earlier cmb (no `unet` settings); train it again with this version")
    return cfg  # type: ignore[return-value]


def load_splits(run_dir: Path) -> dict:
    path = RunLayout(run_dir).splits
    if not path.is_file():
        raise DataError(run_dir, "not a run folder (no splits.json)")
    try:
        splits = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(path, "not valid JSON") from None
    if not isinstance(splits, dict) or not isinstance(splits.get("folds"), list) or not splits["folds"]:
        raise DataError(path, "no folds listed")
    return splits


def evaluate_run(run_dir: str | Path, cfg: DictConfig | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir) if cfg is None else cfg
    splits = load_splits(run_dir)
    records = read_run(run_dir, splits, cfg)
    n_scans, n_cmbs = len(records), sum(r.n_cmbs for r in records)
    s1_thr = float(cfg.inference.unet_threshold)
    target_fp = float(cfg.eval.target_fp_per_scan)
    stage1_budget = float(cfg.eval.get("unet_fp_per_scan", 40.0))

    s1_curve, s2_curve = stage_curve(records, "stage1"), stage_curve(records, "two_stage")
    s1_point = stage_sweep(records, "stage1", np.array([s1_thr]))[0]
    grid = threshold_grid(cfg.eval)
    points = stage_sweep(records, "two_stage", grid)
    chosen = {**choose_operating_point(points, target_fp), "selection": IN_SAMPLE}
    nested = nested_operating_point(records, grid, target_fp)
    transfer = cfg.get("transfer")  # a scored run on another dataset (cmb.protocol.transfer): its own threshold, unchanged
    transfer_point = None
    if transfer:
        transfer_point = {**stage_sweep(records, "two_stage", np.array([float(transfer.threshold)]))[0], "selection": TRANSFER,
                          "scored_run": str(transfer.model_dir), "members": str(transfer.members)}
    cpm2, at2 = cpm(s2_curve)
    cpm1, at1 = cpm(s1_curve)

    boot_cfg = cfg.eval.get("bootstrap") or {}
    n_resamples = int(boot_cfg.get("n_resamples", 1000))
    boot_seed = int(boot_cfg.get("seed") if boot_cfg.get("seed") is not None else splits.get("seed") or 0)
    level = float(boot_cfg.get("level", 0.95))
    fold_thr = {f["fold"]: f["threshold"] for f in nested["per_fold"]} if nested else {}
    nested_thr = [fold_thr[r.fold] for r in records] if nested else []
    chosen_thr = [chosen["threshold"]] * n_scans
    transfer_thr = [transfer_point["threshold"]] * n_scans if transfer_point else []
    boot_points: dict[str, tuple[str, list[float]]] = {"chosen_operating_point": ("two_stage", chosen_thr),
                                                       "stage1": ("stage1", [s1_thr] * n_scans)}
    if nested:
        boot_points["nested_operating_point"] = ("two_stage", nested_thr)
    if transfer_point:
        boot_points["transfer_operating_point"] = ("two_stage", transfer_thr)
    boot = bootstrap(records, boot_points, n_resamples=n_resamples, seed=boot_seed, level=level)

    keep = {"chosen": keep_rate(records, s1_thr, chosen_thr)}
    if nested:
        keep["nested"] = keep_rate(records, s1_thr, nested_thr)
    if transfer_point:
        keep["transfer"] = keep_rate(records, s1_thr, transfer_thr)
    per_scan = _per_scan(records, chosen_thr)
    per_scan_nested = _per_scan(records, nested_thr) if nested else None
    by_size = {"two_stage_chosen": sensitivity_by_size([(r.diameters_mm, found_cmbs(r.two_stage.scores, r.two_stage.status, chosen["threshold"]))
                                                        for r in records]),
               "stage1": sensitivity_by_size([(r.diameters_mm, found_cmbs(r.stage1.scores, r.stage1.status, s1_thr)) for r in records])}
    if nested:
        by_size["two_stage_nested"] = sensitivity_by_size([(r.diameters_mm, found_cmbs(r.two_stage.scores, r.two_stage.status, t))
                                                           for r, t in zip(records, nested_thr)])

    timing_file = RunLayout(run_dir).timing
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    n_inf = max(1, int(timing.get("n_stage1_scans", 0)))
    best_s1 = {**best_curve_point(s1_curve, stage1_budget), "max_fp_per_scan": stage1_budget, "selection": IN_SAMPLE}
    synthetic_share = {s: float(cfg[s].sampling.get("synthetic", 0.0)) for s in ("unet", "cnn")}
    results = {
        "dataset": {"name": _dataset_name(cfg), "n_scans": n_scans, "n_cmbs": n_cmbs},
        "protocol": {"cv": splits.get("source") if splits.get("source") in ("lotcv", "transfer") else "user_splits",
                     "n_folds": len(splits["folds"]),
                     "unet_batch_sizes": list(cfg.unet.batch_sizes), "cnn_batch_sizes": list(cfg.cnn.batch_sizes),
                     "mining": str(cfg.mining.mode), "seed": splits.get("seed"),
                     **({"train_scans_per_fold": int(cfg.protocol.train_scans)} if cfg.get("protocol", {}).get("train_scans") else {}),
                     **({"synthetic_cmb_share": synthetic_share} if any(v > 0 for v in synthetic_share.values()) else {})},
        "candidates": {"definition": candidate_definition(cfg), "stage1_threshold": s1_thr,
                       "note": "the out-of-fold candidates are the ones infer.py deploys at the same thresholds"},
        "stage1": {"threshold": s1_thr, "sensitivity": s1_point["sensitivity"], "fp_per_scan": s1_point["fp_per_scan"],
                   "tp": s1_point["tp"], "fp": s1_point["fp"], "cpm": cpm1, "sensitivity_at_fp": at1,
                   "max_fp_per_scan_reached": s1_curve.max_fp_per_scan, "best_at_budget": best_s1},
        "operating_points": points,
        "chosen_operating_point": chosen,
        "nested_operating_point": nested,
        **({"transfer_operating_point": transfer_point} if transfer_point else {}),
        "stage2_keep_rate": keep,
        "froc": {"cpm": cpm2, "sensitivity_at_fp": at2, "max_fp_per_scan_reached": s2_curve.max_fp_per_scan,
                 "unreached_rates_note": "beyond max_fp_per_scan_reached the sensitivity is held at its last value (LUNA16/MONAI)"},
        "confidence_intervals": {"method": "percentile bootstrap over scans", "level": level, "n_resamples": n_resamples,
                                 "n_resamples_used": boot.n_used, "seed": boot_seed, **boot.intervals},
        "per_scan": per_scan,
        "per_scan_nested": per_scan_nested,
        "per_scan_summary": {"chosen": valdo_summary(per_scan), **({"nested": valdo_summary(per_scan_nested)} if per_scan_nested else {}),
                             "conventions": "VALDO Task 2: duplicates count as false positives for precision/F1; a scan without CMBs "
                                            "has no recall/F1 (left out of the median); no detection on a scan with CMBs: F1 0"},
        "sensitivity_by_size": by_size,
        "timing_s": {"preprocess": timing.get("preprocess", 0.0), "train": timing.get("train", 0.0),
                     "inference_per_scan": round((timing.get("stage1_inference", 0.0) + timing.get("stage2_inference", 0.0)) / n_inf, 3),
                     "protocol_wall": timing.get("protocol_wall")},
    }
    results = _json_safe(results)
    s1_points = stage_sweep(records, "stage1", grid[grid >= s1_thr])
    layout = RunLayout(run_dir)
    atomic_write_text(json.dumps(results, indent=1), layout.results)
    _write_points_csv(layout.operating_points, points, s1_points)
    plot_froc(s1_curve, s2_curve, layout.froc_plot, results, boot)
    atomic_write_text(report_markdown(results), layout.report)
    if bool(cfg.eval.get("review", True)):
        from cmb.eval.review import write_review

        write_review(run_dir, cfg, records, float(results["chosen_operating_point"]["threshold"]))
    if bool(cfg.eval.get("log", True)):
        log_evaluation(build_loggers(cfg.get("logger"), layout.root / "logs" / "eval", "eval", run_dir.name), results, points,
                       layout.froc_plot)
    return results


def summary_lines(results: dict) -> str:
    """The headline figures of `results` as a few console lines (train.py and python -m cmb.eval)."""
    s1, ch, nested = results["stage1"], results["chosen_operating_point"], results.get("nested_operating_point")
    transfer = results.get("transfer_operating_point")
    source = "another run's final models, scans they never saw" if transfer else "out-of-fold"
    lines = [f"stage 1 @ {s1['threshold']:g}: sensitivity {s1['sensitivity']:.3f} at {s1['fp_per_scan']:.2f} FP/scan ({source})"]
    if transfer:
        lines.append(f"two-stage @ {transfer['threshold']:g} (the scored run's own threshold): sensitivity {transfer['sensitivity']:.3f} "
                     f"at {transfer['fp_per_scan']:.2f} FP/scan")
    if nested:
        lines.append(f"two-stage, nested thresholds: sensitivity {nested['sensitivity']:.3f} at {nested['fp_per_scan']:.2f} FP/scan")
    which = "in-sample choice on these scans" if transfer else "in-sample choice, infer.py's default"
    lines.append(f"two-stage @ {ch['threshold']:g} ({which}): sensitivity {ch['sensitivity']:.3f} at "
                 f"{ch['fp_per_scan']:.2f} FP/scan{'' if ch.get('within_budget', True) else ' (over the FP budget)'}; "
                 f"CPM {results['froc']['cpm']:.3f} (stage 1 {s1['cpm']:.3f})")
    return "\n".join(lines)


def _write_points_csv(path: Path, two_stage: list[dict], stage1: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["stage", "threshold", "sensitivity", "fp_per_scan", "tp", "fp"])
    for stage, pts in (("stage1", stage1), ("two_stage", two_stage)):
        writer.writerows([stage, p["threshold"], f"{p['sensitivity']:.4f}", f"{p['fp_per_scan']:.4f}", p["tp"], p["fp"]] for p in pts)
    atomic_write_text(buffer.getvalue(), path)


def log_evaluation(loggers: list[Logger], results: dict, points: list[dict], froc_plot: Path) -> None:
    """The headline figures through the run's configured loggers; wandb also gets the FROC table and plot."""
    nested = results.get("nested_operating_point") or {}
    metrics = {"eval/cpm": results["froc"]["cpm"], "eval/stage1_sensitivity": results["stage1"]["sensitivity"],
               "eval/stage1_fp_per_scan": results["stage1"]["fp_per_scan"], "eval/nested_sensitivity": nested.get("sensitivity"),
               "eval/nested_fp_per_scan": nested.get("fp_per_scan")}
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    try:
        for logger in loggers:
            logger.log_metrics(metrics, step=0)
            if isinstance(logger, WandbLogger):
                logger.log_table(key="eval/froc_table", columns=["threshold", "sensitivity", "fp_per_scan", "tp", "fp"],
                                 data=[[p["threshold"], p["sensitivity"], p["fp_per_scan"], p["tp"], p["fp"]] for p in points])
                logger.log_image(key="eval/froc", images=[str(froc_plot)])
            logger.save()
            logger.finalize("success")
    finally:
        finish_wandb_run()
