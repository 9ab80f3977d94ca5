"""Stage-2 score fusion on finished runs' out-of-fold files (no network is run).

    python benchmarks/score_fusion.py runs/lotcv runs/physics_demo [...] [--out fusion.json]

For each run and each fusion of `inference.score_fusion` (cnn, mean, geometric;
cmb.inference.cnn_scores.fuse_scores), the run's held-out candidates are re-scored from the
stage-1 peak and the CNN probability they already carry, and evaluated as `python -m cmb.eval`
would: CPM, the nested operating point (<= eval.target_fp_per_scan) and the share of the CMBs
stage 1 found that the nested point keeps. Runs written by cmb 0.1 (folders stage1/ and oof/,
config group `model`) are read too. The rule that decides a default is in docs/experiments.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf, open_dict

from cmb.eval.evaluate import evaluate_run
from cmb.eval.run_files import folder_settings
from cmb.inference.candidates import read_candidates, write_candidates
from cmb.inference.cnn_scores import fuse_scores
from cmb.layout import CNN_SCORES, SETTINGS_FILE, TRUTH, UNET_CANDIDATES, RunLayout

FUSIONS = ("cnn", "mean", "geometric")
OLD_FOLDERS = {"stage1": UNET_CANDIDATES, "oof": CNN_SCORES, "truth": TRUTH}  # cmb 0.1 -> 0.2


def current_config(run: Path):  # noqa: ANN201 - a DictConfig
    """The run's config.yaml with cmb 0.1's names mapped to 0.2's."""
    cfg = OmegaConf.load(run / "config.yaml")
    with open_dict(cfg):
        if "unet" not in cfg:
            cfg.unet = cfg.model
            inf = cfg.inference
            inf.unet, inf.unet_threshold, inf.cnn_tta = inf.stage1, inf.stage1_threshold, inf.stage2_tta
        cfg.eval.review, cfg.eval.log = False, False
    return cfg


def fused_copy(run: Path, dest: Path, fusion: str):  # noqa: ANN201 - the fused run's config
    """A run folder at `dest` holding `run`'s out-of-fold files with the detection score fused by `fusion`."""
    cfg = current_config(run)
    with open_dict(cfg):
        cfg.inference.score_fusion = fusion
    layout = RunLayout(dest)
    dest.mkdir(parents=True)
    shutil.copy(run / "splits.json", layout.splits)
    (dest / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    for fold_dir in sorted(run.glob("fold_[0-9]*")):
        fold = fold_dir.name.removeprefix("fold_")
        for old, new in {**OLD_FOLDERS, **{f: f for f in (UNET_CANDIDATES, CNN_SCORES)}}.items():
            if not (fold_dir / old).is_dir():
                continue
            out = layout.fold_folder(fold, new)
            out.mkdir(parents=True, exist_ok=True)
            for path in sorted((fold_dir / old).glob("*.json" if new == TRUTH else "*.csv")):
                if new != CNN_SCORES:
                    shutil.copy(path, out / path.name)
                    continue
                cands, rows = read_candidates(path)
                scores = fuse_scores(np.array([c.peak for c in cands]), np.array([c.score for c in cands]), fusion)
                for c, s in zip(cands, scores):
                    c.score = float(s)
                write_candidates(cands, out / path.name, {"hits": [r["hits"] for r in rows]})
        for folder in (UNET_CANDIDATES, CNN_SCORES):
            (layout.fold_folder(fold, folder) / SETTINGS_FILE).write_text(
                json.dumps(folder_settings(cfg, layout.fold_dir(fold), folder)))
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args()
    table = []
    print("| run | fusion | CPM | nested (transfer for a stage=score run) sensitivity (TP/CMBs) at FP/scan | stage-2 keep rate there |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        for fusion in FUSIONS:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = fused_copy(run, Path(tmp) / run.name, fusion)
                results = evaluate_run(Path(tmp) / run.name, cfg)
            point = "transfer" if results.get("transfer_operating_point") else "nested"  # a stage=score run: one fold, nested None
            chosen, keep = results[f"{point}_operating_point"], results["stage2_keep_rate"][point]
            row = {"run": str(run), "fusion": fusion, "cpm": results["froc"]["cpm"], "point": point, "nested_tp": chosen["tp"],
                   "n_cmbs": results["dataset"]["n_cmbs"], "nested_sensitivity": chosen["sensitivity"],
                   "nested_fp_per_scan": chosen["fp_per_scan"], "keep_found": keep["found_by_stage1"], "keep_kept": keep["kept"]}
            table.append(row)
            print(f"| {run} | {fusion} | {row['cpm']:.3f} | {point}: {row['nested_sensitivity']:.3f} ({row['nested_tp']}/{row['n_cmbs']}) at "
                  f"{row['nested_fp_per_scan']:.2f} | {row['keep_kept']}/{row['keep_found']} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
