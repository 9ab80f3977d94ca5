"""Stage 2 looking at two points of each stage-1 component, on finished LOTCV runs (no training).

    python benchmarks/stage2_points.py runs/bgrid_physics_s0 runs/bgrid_demo_s0 [...] [--out points.json]

Each fold's members re-detect the fold's held-out scans through `infer.py`'s code (`Predictor.score_scan`),
and the fold's CNNs score every stage-1 component at two points: its score-weighted centroid (what a run
deploys) and the point of `inference.candidate_point=peak` (the score-weighted centroid of the 3x3x3 voxels
about its peak voxel). Four ways to pick each candidate's point and score are evaluated as `python -m
cmb.eval` would (CPM, nested point, stage 2's keep rate there):

- `centroid`: stage 2 at the candidate's point (`inference.stage2_window=candidate`);
- `peak`: the peak point, with CNNs trained on mimics at centroids (unlike a run trained with
  `inference.candidate_point=peak`, whose mimics are placed at peaks too);
- `max`: whichever of the two windows the CNNs score higher, at that window's point;
- `max_far`: the peak window only where it scores higher and its point lies more than `eval.match_radius_mm`
  from the centroid (a component whose centroid falls between two dark structures): `inference.stage2_window=max_far`.

The row of the run's own `inference.stage2_window` must equal the run's results.json in CPM and nested hits
(printed as a check). Each variant's stage-1 figures are those of its chosen points (a run judges stage 1 at
the candidates' own points). Nothing here changes a run or a default; a default needs a rule in docs/experiments.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf, open_dict

from cmb import user_cache_dir
from cmb.conf_utils import dataset_from_run_config
from cmb.data.io import vox_to_mm
from cmb.data.preprocess import preprocess_on_working_grid
from cmb.errors import DataError
from cmb.eval.evaluate import evaluate_run, load_run_config, load_splits
from cmb.eval.run_files import folder_settings
from cmb.inference.candidates import Candidate, candidate_points, extract_candidates, stage2_window, write_candidates
from cmb.inference.cnn_scores import lies_far, score_candidates
from cmb.inference.predictor import Predictor
from cmb.layout import CNN_SCORES, SETTINGS_FILE, TRUTH, UNET_CANDIDATES, RunLayout
from cmb.protocol.detection import hits_column
from cmb.protocol.mining import scan_truth

VARIANTS = ("centroid", "peak", "max", "max_far")
OWN_VARIANT = {"candidate": "centroid", "max_far": "max_far"}  # the variant each inference.stage2_window deploys


def pick_points(centroid: np.ndarray, peak: np.ndarray, centroid_score: np.ndarray, peak_score: np.ndarray,
                spacing_mm: tuple[float, float, float], variant: str, far_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate's (point (N, 3 voxels), score (N,)) under `variant`; far_mm: the `max_far` distance (mm)."""
    if variant == "centroid":
        take_peak = np.zeros(len(centroid), dtype=bool)
    elif variant == "peak":
        take_peak = np.ones(len(centroid), dtype=bool)
    elif variant in ("max", "max_far"):
        take_peak = peak_score > centroid_score
        if variant == "max_far":
            take_peak &= lies_far(centroid, peak, spacing_mm, far_mm)
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return np.where(take_peak[:, None], peak, centroid).reshape(-1, 3), np.where(take_peak, peak_score, centroid_score)


def two_point_scores(run: Path) -> tuple[dict, dict[tuple[int, str], dict]]:
    """The run's config and, per (fold, held-out scan), both points and both detection scores (the CNNs', fused as the run fuses them) of every stage-1 component."""
    cfg = load_run_config(run)
    dataset = dataset_from_run_config(cfg.data, run / "config.yaml")  # allow-listed readers only: a run folder is data
    cache_dir = cfg.data.get("cache_dir") or user_cache_dir()
    out: dict[tuple[int, str], dict] = {}
    for fold, split in enumerate(load_splits(run)["folds"]):
        predictor = Predictor(run, fold=fold, threshold=0.5, cache_dir=cache_dir, progress=False)
        predictor.stage2_window = "candidate"  # every candidate's score at its own point: the variants pick from both windows here
        tta = bool(predictor.run_cfg.inference.cnn_tta)
        fusion = str(predictor.run_cfg.inference.get("score_fusion", "cnn"))
        for scan_id in split["test"]:
            source = dataset.load(scan_id)
            scan, prob, cands, scored, _ = predictor.score_scan(source)  # the run's own candidates and scores, working grid
            peaks = extract_candidates(prob, predictor.unet_threshold, scan.affine, scan.scan_id, point="peak")
            image = np.asarray(preprocess_on_working_grid(source, predictor.pre_cfg, cache_dir)[1].image)  # cached by score_scan
            peaks_scored = score_candidates(predictor.cnns, image, peaks, tta=tta, device=predictor.device, fusion=fusion)  # as score_scan scores
            out[(fold, scan_id)] = {"scan": scan, "cands": cands, "centroid": candidate_points(cands), "peak": candidate_points(peaks),
                                    "centroid_score": np.array([c.score for c in scored]),
                                    "peak_score": np.array([c.score for c in peaks_scored])}
    return cfg, out


def variant_copy(run: Path, dest: Path, cfg, scores: dict[tuple[int, str], dict], variant: str):  # noqa: ANN001, ANN201 - DictConfigs
    """A run folder at `dest` whose out-of-fold files hold each candidate at the point and score `variant` picks."""
    with open_dict(cfg):
        cfg.eval.review, cfg.eval.log = False, False
    layout = RunLayout(dest)
    dest.mkdir(parents=True)
    shutil.copy(run / "splits.json", layout.splits)
    (dest / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    radius = float(cfg.eval.match_radius_mm)
    for (fold, scan_id), s in scores.items():
        scan = s["scan"]
        points, chosen = pick_points(s["centroid"], s["peak"], s["centroid_score"], s["peak_score"], scan.spacing_mm, variant, radius)
        mm = vox_to_mm(points, scan.affine)
        placed: list[Candidate] = [replace(c, i=float(p[0]), j=float(p[1]), k=float(p[2]), x_mm=float(m[0]), y_mm=float(m[1]),
                                           z_mm=float(m[2])) for c, p, m in zip(s["cands"], points, mm)]
        hits = {"hits": hits_column(points, scan_truth(scan), radius)}
        for folder in (UNET_CANDIDATES, CNN_SCORES, TRUTH):
            layout.fold_folder(fold, folder).mkdir(parents=True, exist_ok=True)
        write_candidates(placed, layout.scan_file(fold, UNET_CANDIDATES, scan_id), hits)
        write_candidates([replace(c, score=float(v)) for c, v in zip(placed, chosen)], layout.scan_file(fold, CNN_SCORES, scan_id), hits)
        shutil.copy(RunLayout(run).scan_file(fold, TRUTH, scan_id), layout.scan_file(fold, TRUTH, scan_id))
    for fold in {fold for fold, _ in scores}:
        for member in RunLayout(run).fold_dir(fold).glob("*_bs*"):  # the members whose digests stamp the files
            (layout.fold_dir(fold) / member.name).symlink_to(member.resolve(), target_is_directory=True)
        for folder in (UNET_CANDIDATES, CNN_SCORES):
            (layout.fold_folder(fold, folder) / SETTINGS_FILE).write_text(json.dumps(folder_settings(cfg, layout.fold_dir(fold), folder)))
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args()
    for run in args.runs:  # before any work: a run still training (or not a run) is named, not a traceback half-way through the table
        if not RunLayout(run).results.is_file():
            parser.error(f"{run}: not a finished LOTCV run (no results.json)")
        try:
            load_run_config(run), load_splits(run)  # the evaluation's own checks of a run folder
        except DataError as err:
            parser.error(str(err))
    table = []
    print("| run | points | stage 1 at its threshold | CPM | nested sensitivity (TP/CMBs) at FP/scan | stage-2 keep rate there |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        own = json.loads(RunLayout(run).results.read_text())
        cfg, scores = two_point_scores(run)
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory() as tmp:
                results = evaluate_run(Path(tmp) / run.name, variant_copy(run, Path(tmp) / run.name, cfg.copy(), scores, variant))
            nested, keep = results["nested_operating_point"], results["stage2_keep_rate"]["nested"]
            row = {"run": str(run), "points": variant, "cpm": results["froc"]["cpm"], "stage1_sensitivity": results["stage1"]["sensitivity"],
                   "stage1_fp_per_scan": results["stage1"]["fp_per_scan"], "nested_tp": nested["tp"], "n_cmbs": results["dataset"]["n_cmbs"],
                   "nested_sensitivity": nested["sensitivity"], "nested_fp_per_scan": nested["fp_per_scan"],
                   "keep_found": keep["found_by_stage1"], "keep_kept": keep["kept"]}
            if variant == OWN_VARIANT[stage2_window(cfg)]:
                row["equals_run"] = results["froc"]["cpm"] == own["froc"]["cpm"] and nested["tp"] == own["nested_operating_point"]["tp"]
            table.append(row)
            print(f"| {run} | {variant} | {row['stage1_sensitivity']:.3f} at {row['stage1_fp_per_scan']:.2f} | {row['cpm']:.3f} | "
                  f"{row['nested_sensitivity']:.3f} ({row['nested_tp']}/{row['n_cmbs']}) at {row['nested_fp_per_scan']:.2f} | "
                  f"{row['keep_kept']}/{row['keep_found']} |" + (f" (equals the run: {row['equals_run']})" if "equals_run" in row else ""),
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
