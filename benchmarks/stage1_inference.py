"""Stage-1 inference: `fast` against `faithful` (the paper's stride-3 windows), one process.

    python benchmarks/stage1_inference.py --run runs/paper --fold 0 [--threads 2] [--region 96 96 64]

Uses the fold's trained U-Net (batch size 20 member) and its held-out scans. Both modes run
on the same regions (a box around each held-out CMB; faithful over a whole scan would take
about 1.5 h on 2 cores), and the script prints:
- the speed ratio faithful/fast on those regions (target: fast >= 100x faster);
- agreement: candidates (threshold 0.2) found by both modes, and the stage-1 sensitivity of
  each mode on the CMBs of the regions;
- `fast` over one whole scan (brain bounding box) and the process's peak memory
  (targets: <= 15 s for 512x512x150 on 2 cores, <= 4 GB).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from cmb.conf_utils import dataset_from_run_config
from cmb.data.preprocess import PreprocessConfig, preprocess_scan
from cmb.eval.matching import Truth, hit_sets
from cmb.inference.candidates import candidate_points, extract_candidates
from cmb.inference.unet_map import UNetMapConfig, inference_net, inference_settings, predict_probability
from cmb.layout import RunLayout
from cmb.models.checkpoint import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a run folder with fold_<k>/unet_bs20/model.pt")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--region", type=int, nargs=3, default=[96, 96, 64], help="box around each CMB (voxels)")
    parser.add_argument("--max-regions", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = OmegaConf.load(args.run / "config.yaml")
    splits = json.loads((args.run / "splits.json").read_text())
    heldout = splits["folds"][int(args.fold)]["test"]
    net, _ = load_model(RunLayout(args.run).member("unet", args.fold, 20).model)
    dataset = dataset_from_run_config(cfg.data, args.run / "config.yaml")  # allow-listed readers only
    pre_cfg = PreprocessConfig.from_settings(cfg.preprocess, args.run / "config.yaml")
    fast_cfg = UNetMapConfig.from_cfg(cfg.inference.unet)
    fast_cfg.mode, fast_cfg.progress = "fast", False
    slow_cfg = UNetMapConfig(mode="faithful", bf16=fast_cfg.bf16, progress=True)
    # each mode's prediction copy (batch norm folded, bf16 where supported), made once as for a whole scan
    cpu = torch.device("cpu")
    fast_net, slow_net = (inference_net(net, *inference_settings(c, cpu)) for c in (fast_cfg, slow_cfg))

    t_fast = t_slow = 0.0
    n_cmbs = found_fast = found_slow = both = only_fast = only_slow = 0
    whole_scan = None
    regions = 0
    for scan_id in heldout:
        scan = dataset.load(scan_id)
        pre = preprocess_scan(scan, pre_cfg, cfg.paths.cache_dir)
        image, mask = np.asarray(pre.image), np.asarray(pre.mask)
        if whole_scan is None:
            t = time.perf_counter()
            predict_probability(fast_net, image, mask, fast_cfg)
            whole_scan = (scan.shape, time.perf_counter() - t)
        for cmb in scan.cmbs:
            if regions >= args.max_regions:
                break
            regions += 1
            c = np.rint(cmb.centroid_vox).astype(int)
            lo = np.clip(c - np.array(args.region) // 2, 0, np.array(scan.shape) - np.array(args.region))
            box = tuple(slice(int(a), int(a + s)) for a, s in zip(lo, args.region))
            sub_img, sub_mask = np.ascontiguousarray(image[box]), np.ascontiguousarray(mask[box])
            t = time.perf_counter()
            p_fast = predict_probability(fast_net, sub_img, sub_mask, fast_cfg)
            t_fast += time.perf_counter() - t
            t = time.perf_counter()
            p_slow = predict_probability(slow_net, sub_img, sub_mask, slow_cfg)
            t_slow += time.perf_counter() - t
            sub_instances = scan.instances[box] if scan.instances is not None else None
            sub_cents = scan.centroids_vox - lo
            inside = np.all((sub_cents >= 0) & (sub_cents < np.array(args.region)), axis=1)
            truth = Truth(sub_cents[inside], scan.spacing_mm, None)
            if sub_instances is not None:  # keep only labels of CMBs inside the box, renumbered
                ids = np.flatnonzero(inside) + 1
                remap = np.zeros(int(scan.instances.max()) + 1, np.int32)
                remap[ids] = np.arange(1, len(ids) + 1)
                truth.instances = remap[sub_instances]
            c_fast = extract_candidates(p_fast, args.threshold, np.eye(4))
            c_slow = extract_candidates(p_slow, args.threshold, np.eye(4))
            pts_fast = candidate_points(c_fast)
            pts_slow = candidate_points(c_slow)
            n_cmbs += truth.n_cmbs
            found_fast += len({h for hs in hit_sets(pts_fast, truth) for h in hs})
            found_slow += len({h for hs in hit_sets(pts_slow, truth) for h in hs})
            # the same candidate in both modes: within 2.5 mm (the matching radius)
            near = np.linalg.norm((pts_fast[:, None] - pts_slow[None]) * scan.spacing_mm, axis=2) <= 2.5
            both += int(near.any(axis=1).sum())
            only_fast += int((~near.any(axis=1)).sum())
            only_slow += int((~near.any(axis=0)).sum())
            print(f"{scan_id} region {tuple(int(v) for v in lo)}+{tuple(args.region)}: fast {len(c_fast)} candidates, faithful {len(c_slow)}", flush=True)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"\nstage-1 inference, {args.threads} threads, U-Net {args.run}/fold_{args.fold}/unet_bs20, {regions} regions of {tuple(args.region)}")
    print(f"  faithful (20x20x16, stride 3): {t_slow:8.2f} s")
    print(f"  fast (tiles {tuple(fast_cfg.tile)}): {t_fast:8.2f} s")
    print(f"  speed ratio faithful/fast: {t_slow / max(t_fast, 1e-9):.0f}x  (target >= 100x)")
    print(f"  candidates at {args.threshold}: found by both {both}, only fast {only_fast}, only faithful {only_slow}")
    print(f"  stage-1 sensitivity on the regions' {n_cmbs} CMBs: fast {found_fast}/{n_cmbs}, faithful {found_slow}/{n_cmbs}")
    if whole_scan:
        shape, secs = whole_scan
        print(f"  fast over a whole scan {shape}: {secs:.1f} s (target <= 15 s for 512x512x150)")
    print(f"  peak memory (process RSS): {peak_gb:.2f} GB (target <= 4 GB)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
