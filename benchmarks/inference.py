"""Inference of one new 512x512x150 scan with both ensembles (2 U-Nets + 2 CNNs).

    python benchmarks/inference.py RUN_DIR [--fold final|K] [--threads 2]

Writes a fresh synthetic `paper`-preset scan (not in any training set: another phantom
seed) to a temporary NIfTI, preprocesses it (timed separately), then times the detection
itself through `cmb.inference.predictor.Predictor`, the code infer.py runs, and compares
the two stage-1 modes' cost per U-Net against the target.
Target: <= 30 s after preprocessing on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from cmb.data.phantom import PRESETS, PhantomGenerator
from cmb.inference.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--fold", default=None, help="members to use (default: final if present)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scan = PhantomGenerator(PRESETS["paper"], seed=12345).generate(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "new_scan.nii.gz"
        nib.save(nib.Nifti1Image(np.rint(scan.image).astype(np.int16), scan.affine), str(path))
        predictor = Predictor(args.run_dir, fold=args.fold, threshold=None, cache_dir=Path(tmp) / "cache", progress=False)
        first = predictor.predict_scan(path)  # preprocessing runs here and is cached
        t = time.perf_counter()
        det = predictor.predict_scan(path)  # preprocessing now comes from the cache
        total = time.perf_counter() - t
    found = 0
    for c in scan.centroids_vox:
        d = np.sqrt((((det.voxels - c) * np.array([0.45, 0.45, 0.9])) ** 2).sum(1)) if len(det.voxels) else np.array([np.inf])
        found += int(d.min() <= 2.5)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"new scan 512x512x150, {args.threads} threads, members of {args.run_dir}/fold_{predictor.fold}")
    print(f"  preprocessing (first call): {first.seconds['preprocess']:.1f} s")
    print(f"  stage 1 (2 U-Nets, {predictor.stage1_cfg.mode}): {det.seconds['stage1']:.1f} s;  stage 2 (2 CNNs): {det.seconds['stage2']:.2f} s")
    print(f"  detection after preprocessing: {total:.1f} s  (target <= 30 s: {'met' if total <= 30 else 'NOT met'}; "
          f"the paper: ~40 min for its two U-Nets)")
    print(f"  {len(det.scores)} detections at threshold {predictor.threshold:g}; planted CMBs found {found}/{len(scan.centroids_vox)}")
    print(f"  peak memory (process RSS): {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
