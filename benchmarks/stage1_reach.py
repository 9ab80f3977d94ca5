"""Where stage 1 loses a CMB: in its map, or in where its candidates are placed (finished LOTCV runs, no training).

    python benchmarks/stage1_reach.py runs/physics_paper [runs/lotcv ...] [--cache-dir DIR] [--out reach.json]

For every fold, the fold's U-Nets map each held-out scan again (the run's own combined map, as its out-of-fold
detection made it), and for each CMB three questions are answered at the run's `inference.unet_threshold`, within
`eval.match_radius_mm` of the CMB's centroid (mm):
- *map*: does the combined map reach the threshold anywhere there (its highest value is printed)?
- *point*: does a candidate's point (the run's `unet_candidates/<scan>.csv`) lie there: what the report's
  "stage 1 at threshold" counts?
- *peak*: does a candidate's peak point lie there (where `inference.stage2_window=max_far` also looks)?
A CMB the map reaches but no point hits is lost to placement (a component that joins it to a vein or nucleus is
placed between the two); one the map does not reach is lost to the U-Nets. Nothing here changes a run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from omegaconf import open_dict

from cmb.eval.evaluate import load_run_config, load_splits
from cmb.eval.matching import hit_sets
from cmb.inference.candidates import candidate_points, read_candidates
from cmb.layout import UNET_CANDIDATES, RunLayout
from cmb.protocol.mining import scan_truth
from cmb.protocol.run import Protocol


def map_reach(prob: np.ndarray, centroid_vox: np.ndarray, spacing_mm: np.ndarray, radius_mm: float) -> float:
    """Highest value of `prob` (I, J, K) within `radius_mm` of `centroid_vox` (voxels; spacing_mm (3,) per voxel)."""
    half = np.ceil(radius_mm / spacing_mm).astype(int)
    low = np.maximum(np.floor(centroid_vox).astype(int) - half, 0)
    high = np.minimum(np.ceil(centroid_vox).astype(int) + half + 1, prob.shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij"), -1)
    near = np.linalg.norm((grid - centroid_vox) * spacing_mm, axis=-1) <= radius_mm
    box = prob[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    return float(box[near].max()) if near.any() else 0.0


def reach_rows(run: Path, cache_dir: str | None) -> tuple[float, list[dict]]:
    """The run's `inference.unet_threshold` and one row per held-out CMB of `run`: fold, scan, CMB, the map's highest
    value near it, and whether a candidate's point or peak point hits it."""
    cfg = load_run_config(run)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run)
        if cache_dir:
            cfg.paths.cache_dir = cache_dir
    protocol = Protocol(cfg)
    radius = float(cfg.eval.match_radius_mm)
    rows = []
    for fold, split in enumerate(load_splits(run)["folds"]):
        unet_map = protocol.unet_map(protocol.members("unet", fold))
        for scan_id in split["test"]:
            scan, pre = protocol.store.load(scan_id)
            prob = unet_map(pre)
            cands, _ = read_candidates(RunLayout(run).scan_file(fold, UNET_CANDIDATES, scan_id))
            truth = scan_truth(scan)
            by_point = set().union(*hit_sets(candidate_points(cands), truth, radius), set())
            peaks = [c.peak_point for c in cands if c.peak_point is not None]
            by_peak = set().union(*hit_sets(np.array(peaks, float).reshape(-1, 3), truth, radius), set()) if peaks else set()
            for n, centroid in enumerate(scan.centroids_vox):
                rows.append({"fold": fold, "scan": scan_id, "cmb": n, "map_max": map_reach(prob, centroid, np.asarray(scan.spacing_mm), radius),
                             "point": n in by_point, "peak": n in by_peak if peaks else None})
    return float(cfg.inference.unet_threshold), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--cache-dir", default=None, help="the preprocessing cache (default: the run's)")
    parser.add_argument("--out", type=Path, default=None, help="also write every CMB's row as JSON")
    args = parser.parse_args()
    for run in args.runs:  # before any work: a run still training (or not a run) is named, not a traceback half-way through
        if not RunLayout(run).results.is_file():
            parser.error(f"{run}: not a finished LOTCV run (no results.json)")
    table = []
    for run in args.runs:
        threshold, rows = reach_rows(run, args.cache_dir)
        reached = [r for r in rows if r["map_max"] >= threshold]
        print(f"{run}: {len(rows)} CMBs; the map reaches {threshold:g} near {len(reached)}, a candidate's point hits "
              f"{sum(r['point'] for r in rows)}, its point or peak point {sum(bool(r['point'] or r['peak']) for r in rows)}")
        for r in rows:
            if not r["point"]:
                where = "placement" if r["map_max"] >= threshold else "map"
                print(f"  lost to {where}: fold {r['fold']} {r['scan']} CMB {r['cmb']} (map {r['map_max']:.3f} within the radius; "
                      f"peak point hits: {r['peak']})")
        table += [{"run": str(run), **r} for r in rows]
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
