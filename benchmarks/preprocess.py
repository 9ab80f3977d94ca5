"""Preprocessing speed on one 512x512x150 scan (synthetic `paper` preset).

    python benchmarks/preprocess.py [--threads 2] [--baseline]

Times each step of the chain (mask, N4, normalization) on one scan in one process.
Target: the whole chain <= 60 s on 2 CPU cores. With --baseline it also times N4 with
shrink 2 (a common default) in the same run and prints the speed ratio.
"""

from __future__ import annotations

import argparse
import time

import SimpleITK as sitk
import torch

from cmb.data import preprocess as pp
from cmb.data.phantom import PRESETS, PhantomGenerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", action="store_true", help="also time N4 at shrink 2")
    args = parser.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    torch.set_num_threads(args.threads)

    scan = PhantomGenerator(PRESETS["paper"], seed=0).generate(0)
    spacing = (0.45, 0.45, 0.9)
    data = {"image": scan.image, "mask": None, "spacing": spacing, "affine": scan.affine}
    times = {}
    t0 = time.perf_counter()
    data = pp.BrainMaskd("image", method="threshold")(data)
    times["mask"] = time.perf_counter() - t0
    t = time.perf_counter()
    n4 = pp.N4BiasCorrectiond("image", shrink=4)(data)
    times["n4"] = time.perf_counter() - t
    t = time.perf_counter()
    out = pp.HistogramPeakNormalized("image")(n4)
    times["normalize"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    brain = scan.tissue == 4
    coverage = (out["mask"] & brain).sum() / brain.sum()
    print(f"scan 512x512x150, {args.threads} threads")
    for k, v in times.items():
        print(f"  {k:10s} {v:6.1f} s")
    print(f"  total      {total:6.1f} s   (target <= 60 s: {'met' if total <= 60 else 'NOT met'}, {total / 60:.2f} x budget)")
    print(f"  brain covered by mask: {coverage:.3f}; peak after normalization: {pp.histogram_peak(out['image'][out['mask']]):.3f}")
    if args.baseline:
        t = time.perf_counter()
        pp.N4BiasCorrectiond("image", shrink=2)(data)
        base = time.perf_counter() - t
        print(f"  baseline N4 shrink 2: {base:.1f} s; ours (shrink 4) is {base / times['n4']:.1f}x faster")


if __name__ == "__main__":
    main()
