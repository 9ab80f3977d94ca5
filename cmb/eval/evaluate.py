"""Evaluate a finished LOTCV run from its cached out-of-fold outputs (no network is run).

Writes into the run folder: results.json (design.md), operating_points.csv, froc.png,
report.md; logs the same to wandb (offline) when enabled.
"""

from __future__ import annotations

import csv
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from cmb.data.io import atomic_write_text
from cmb.errors import DataError
from cmb.eval.froc import CPM_RATES, FROCCurve, best_curve_point, best_threshold, cpm, froc_curve, sensitivity_at, sweep
from cmb.eval.matching import FP, assign

log = logging.getLogger(__name__)
SWEEP = np.round(np.arange(0.0, 1.0001, 0.01), 2)
PAPER_POINTS = {"stage1": [(38.15, 0.9833)], "final": [(4.1, 0.95), (14.5, 0.975)]}


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _parse_hits(text: str) -> list[int]:
    return [int(h) for h in text.split(";") if h != ""]


def collect(run_dir: Path, splits: dict, folder: str, score_key: str) -> tuple[list[dict], np.ndarray, np.ndarray, int]:
    """Per-scan records and pooled (scores, status) of one stage's out-of-fold detections."""
    per_scan, all_scores, all_status, n_cmbs = [], [], [], 0
    for fold in splits["folds"]:
        fdir = run_dir / f"fold_{fold['fold']}"
        for scan_id in fold["test"]:
            truth_path, det_path = fdir / "truth" / f"{scan_id}.json", fdir / folder / f"{scan_id}.csv"
            if not truth_path.is_file() or not det_path.is_file():
                raise DataError(det_path, f"out-of-fold output missing for scan {scan_id} (fold {fold['fold']}); is the run finished?")
            truth = json.loads(truth_path.read_text())
            rows = _read_rows(det_path)
            scores = np.array([float(r[score_key]) for r in rows])
            status = assign(scores, [_parse_hits(r["hits"]) for r in rows])
            per_scan.append({"scan_id": scan_id, "fold": fold["fold"], "n_cmbs": truth["n_cmbs"], "scores": scores, "status": status})
            all_scores.append(scores)
            all_status.append(status)
            n_cmbs += int(truth["n_cmbs"])
    return per_scan, np.concatenate(all_scores) if all_scores else np.zeros(0), np.concatenate(all_status) if all_status else np.zeros(0, int), n_cmbs


def _at(per_scan: list[dict], threshold: float) -> list[dict]:
    out = []
    for s in per_scan:
        keep = s["scores"] >= threshold
        out.append({"scan_id": s["scan_id"], "fold": s["fold"], "n_cmbs": s["n_cmbs"], "tp": int((s["status"][keep] >= 0).sum()),
                    "fp": int((s["status"][keep] == FP).sum())})
    return out


def evaluate_run(run_dir: str | Path, cfg: DictConfig | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if cfg is None:
        if not (run_dir / "config.yaml").is_file():
            raise DataError(run_dir, "not a run folder (no config.yaml)")
        cfg = OmegaConf.load(run_dir / "config.yaml")  # type: ignore[assignment]
    assert cfg is not None
    splits_path = run_dir / "splits.json"
    if not splits_path.is_file():
        raise DataError(run_dir, "not a run folder (no splits.json)")
    splits = json.loads(splits_path.read_text())
    n_scans = sum(len(f["test"]) for f in splits["folds"])
    s1_thr = float(cfg.inference.stage1_threshold)
    target_fp = float(cfg.eval.target_fp_per_scan)
    stage1_budget = float(cfg.eval.get("stage1_fp_per_scan", 40.0))

    s1_scans, s1_scores, s1_status, n_cmbs = collect(run_dir, splits, "stage1", "peak")
    s2_scans, s2_scores, s2_status, _ = collect(run_dir, splits, "oof", "score")
    s1_curve = froc_curve(s1_scores, s1_status, n_cmbs, n_scans)
    s2_curve = froc_curve(s2_scores, s2_status, n_cmbs, n_scans)
    s1_point = sweep(s1_scores, s1_status, n_cmbs, n_scans, [s1_thr])[0]
    points = sweep(s2_scores, s2_status, n_cmbs, n_scans, SWEEP)
    chosen = best_threshold(points, target_fp) or points[-1]
    cpm2, at2 = cpm(s2_curve)
    cpm1, at1 = cpm(s1_curve)
    timing = json.loads((run_dir / "timing.json").read_text()) if (run_dir / "timing.json").is_file() else {}
    n_inf = max(1, int(timing.get("n_stage1_scans", 0)))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    name = str(data_cfg.get("_target_", "")).rsplit(".", 1)[-1].replace("Dataset", "").lower()  # type: ignore[union-attr]
    if name == "synthetic":
        name = f"synthetic:{data_cfg.get('preset')}"  # type: ignore[union-attr]
    results = {
        "dataset": {"name": name, "n_scans": n_scans, "n_cmbs": n_cmbs},
        "protocol": {"cv": "lotcv" if splits.get("source") == "lotcv" else "user_splits", "n_folds": len(splits["folds"]),
                     "unet_batch_sizes": list(cfg.model.batch_sizes), "cnn_batch_sizes": list(cfg.cnn.batch_sizes),
                     "mining": str(cfg.mining.mode), "seed": splits.get("seed")},
        "stage1": {"threshold": s1_thr, "sensitivity": s1_point["sensitivity"], "fp_per_scan": s1_point["fp_per_scan"],
                   "tp": s1_point["tp"], "fp": s1_point["fp"], "cpm": cpm1, "sensitivity_at_fp": at1,
                   "best_at_budget": {**best_curve_point(s1_curve, stage1_budget), "max_fp_per_scan": stage1_budget}},
        "operating_points": points,
        "chosen_operating_point": {**chosen, "rule": f"highest sensitivity at <= {target_fp:g} FP/scan"},
        "froc": {"cpm": cpm2, "sensitivity_at_fp": at2},
        "per_scan": _at(s2_scans, chosen["threshold"]),
        "timing_s": {"preprocess": timing.get("preprocess", 0.0), "train": timing.get("train", 0.0),
                     "inference_per_scan": round((timing.get("stage1_inference", 0.0) + timing.get("stage2_inference", 0.0)) / n_inf, 3),
                     "protocol_wall": timing.get("protocol_wall")},
    }
    atomic_write_text(json.dumps(results, indent=1), run_dir / "results.json")
    _write_points_csv(run_dir / "operating_points.csv", points, sweep(s1_scores, s1_status, n_cmbs, n_scans, SWEEP))
    plot_froc(s1_curve, s2_curve, run_dir / "froc.png", results)
    atomic_write_text(report_markdown(results, s1_curve, s2_curve), run_dir / "report.md")
    if bool(cfg.eval.get("wandb", True)):
        _log_wandb(run_dir, results, points)
    return results


def _write_points_csv(path: Path, two_stage: list[dict], stage1: list[dict]) -> None:
    lines = ["stage,threshold,sensitivity,fp_per_scan,tp,fp"]
    for stage, pts in (("stage1", stage1), ("two_stage", two_stage)):
        lines += [f"{stage},{p['threshold']},{p['sensitivity']:.4f},{p['fp_per_scan']:.4f},{p['tp']},{p['fp']}" for p in pts]
    atomic_write_text("\n".join(lines) + "\n", path)


def plot_froc(stage1: FROCCurve, two_stage: FROCCurve, path: Path, results: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for curve, label, colour in ((stage1, "stage 1 (U-Net ensemble)", "tab:orange"), (two_stage, "two-stage (U-Nets + CNNs)", "tab:blue")):
        x = np.maximum(curve.fp_per_scan, 1e-2)
        ax.step(x, curve.sensitivity, where="post", label=label, color=colour)
    ax.scatter(*zip(*PAPER_POINTS["stage1"]), marker="s", color="tab:orange", edgecolor="k", zorder=5, label="Rau et al.: stage 1")
    ax.scatter(*zip(*PAPER_POINTS["final"]), marker="*", s=120, color="tab:blue", edgecolor="k", zorder=5, label="Rau et al.: final")
    chosen = results["chosen_operating_point"]
    ax.scatter([max(chosen["fp_per_scan"], 1e-2)], [chosen["sensitivity"]], marker="o", facecolor="none", edgecolor="red", s=120,
               zorder=6, label=f"ours: threshold {chosen['threshold']:g}")
    ax.set_xscale("log")
    ax.set_xlim(1e-2, max(100.0, float(stage1.fp_per_scan.max()) * 1.2))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan (log)")
    ax.set_ylabel("sensitivity")
    d = results["dataset"]
    ax.set_title(f"FROC, out-of-fold: {d['name']} ({d['n_scans']} scans, {d['n_cmbs']} CMBs), CPM {results['froc']['cpm']:.3f}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_baselines() -> list[dict]:
    text = resources.files("cmb.eval").joinpath("baselines.yaml").read_text()
    return yaml.safe_load(text) or []


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _fp(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def report_markdown(results: dict, stage1: FROCCurve, two_stage: FROCCurve) -> str:
    d, s1, ch = results["dataset"], results["stage1"], results["chosen_operating_point"]
    ours = [("stage 1 only", s1["threshold"], s1["sensitivity"], s1["fp_per_scan"])]
    b = s1["best_at_budget"]
    ours.append((f"stage 1 only, best at <= {b['max_fp_per_scan']:g} FP/scan", b["threshold"], b["sensitivity"], b["fp_per_scan"]))
    ours.append(("two-stage, chosen", ch["threshold"], ch["sensitivity"], ch["fp_per_scan"]))
    for fp in (4.0, 8.0, 14.5):
        p = best_threshold(results["operating_points"], fp)
        if p is not None:
            ours.append((f"two-stage, best at <= {fp:g} FP/scan", p["threshold"], p["sensitivity"], p["fp_per_scan"]))
    lines = [f"# CMB detection report: {d['name']}", "",
             f"Out-of-fold results of {results['protocol']['n_folds']}-fold leave-two-out cross-validation on {d['n_scans']} scans "
             f"with {d['n_cmbs']} CMBs. Thresholds were chosen on these out-of-fold predictions; no model saw the scan it is scored on.", "",
             "## Our operating points", "", "| point | threshold | sensitivity | FP/scan |", "|---|---|---|---|"]
    lines += [f"| {n} | {t:g} | {_pct(s)} | {_fp(f)} |" for n, t, s, f in ours]
    lines += ["", f"CPM (mean sensitivity at {', '.join(f'{r:g}' for r in CPM_RATES)} FP/scan): two-stage {results['froc']['cpm']:.3f}, "
              f"stage 1 {s1['cpm']:.3f}.", "", "| FP/scan | " + " | ".join(results["froc"]["sensitivity_at_fp"]) + " |",
              "|---|" + "---|" * len(results["froc"]["sensitivity_at_fp"]),
              "| two-stage | " + " | ".join(_pct(v) for v in results["froc"]["sensitivity_at_fp"].values()) + " |",
              "| stage 1 | " + " | ".join(_pct(v) for v in s1["sensitivity_at_fp"].values()) + " |", "",
              "## Published baselines", "",
              "These numbers come from other data than ours (mostly real clinical SWI; ours may be synthetic). "
              "The table compares operating points, not a head-to-head run. Rows live in `cmb/eval/baselines.yaml`.", "",
              "| method | data | sensitivity | FP/scan | note |", "|---|---|---|---|---|"]
    for b in load_baselines():
        lines.append(f"| {b['method']} | {b.get('data', '')} | {_pct(b.get('sensitivity'))} | {_fp(b.get('fp_per_scan'))} | {b.get('note', '')} |")
    t = results["timing_s"]
    lines += ["", "## Timing", "", f"preprocessing {t['preprocess']:.0f} s, training {t['train']:.0f} s, "
              f"inference {t['inference_per_scan']:.1f} s per held-out scan (both stages, after preprocessing)"
              + (f", whole protocol {t['protocol_wall']:.0f} s" if t.get("protocol_wall") else "") + ".", ""]
    return "\n".join(lines)


def _log_wandb(run_dir: Path, results: dict, points: list[dict]) -> None:
    try:
        import wandb
    except ImportError:
        log.info("wandb not installed; skipping wandb logging")
        return
    run = wandb.init(project="cmb", name=f"eval-{run_dir.name}", dir=str(run_dir), mode="offline", reinit=True,
                     settings=wandb.Settings(silent=True))
    try:
        table = wandb.Table(columns=["threshold", "sensitivity", "fp_per_scan", "tp", "fp"],
                            data=[[p["threshold"], p["sensitivity"], p["fp_per_scan"], p["tp"], p["fp"]] for p in points])
        run.log({"eval/froc_table": table, "eval/cpm": results["froc"]["cpm"], "eval/stage1_sensitivity": results["stage1"]["sensitivity"],
                 "eval/stage1_fp_per_scan": results["stage1"]["fp_per_scan"], "eval/froc": wandb.Image(str(run_dir / "froc.png"))})
    finally:
        run.finish()
