"""Brain masks against the phantom's true tissue map: the threshold fallback vs deepbet (vs HD-BET when usable).

    python benchmarks/brain_mask.py                       # demo scans 0-3 and paper scans 0-1
    python benchmarks/brain_mask.py --demo 8 --paper 3 --threads 2

Per method and preset: Dice against the true brain (tissue 4) and against the intracranial
volume (brain + CSF rim), the share of the brain the mask covers, the share of the mask that
is skull or scalp, the labelled CMBs it cuts (under 90% and under 50% of their voxels inside: the
image is 0 outside the mask, so a CMB cut away cannot be found) and seconds per scan (the paper
preset is 512x512x150). `--physics-demo N` / `--physics-paper N` add scans of the SWI-physics
family; `--closing 3,5` adds the threshold mask with other closing radii (mm). Methods that are not
installed are skipped with the reason. The rule that picks `preprocess.mask=auto`'s order
(docs/experiments.md): a learned method comes before the fallback only if its mean Dice against
the brain is higher on every preset and it leaves no more skull/scalp in.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import SimpleITK as sitk
import torch

from cmb.data import preprocess as pp
from cmb.data.io import voxel_sizes_mm
from cmb.data.phantom import PRESETS, PhantomGenerator
from cmb.data.physics_phantom import PHYSICS_PRESETS, PhysicsPhantomGenerator

BRAIN, CSF, SKULL, SCALP = 4, 3, 2, 1


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def mask_figures(mask: np.ndarray, tissue: np.ndarray) -> dict[str, float]:
    brain, intracranial = tissue == BRAIN, (tissue == BRAIN) | (tissue == CSF)
    return {"dice_brain": dice(mask, brain), "dice_intracranial": dice(mask, intracranial),
            "brain_covered": float((mask & brain).sum() / brain.sum()),
            "skull_scalp_share": float((mask & ((tissue == SKULL) | (tissue == SCALP))).sum() / max(1, mask.sum()))}


def cmbs_cut(mask: np.ndarray, instances: np.ndarray) -> dict[str, float]:
    """How many labelled CMBs (instances 1..N) have under 90% / under 50% of their voxels inside `mask`."""
    inside = [float(mask[instances == label].mean()) for label in np.unique(instances) if label > 0]
    return {"cmbs": len(inside), "cut_90": sum(f < 0.9 for f in inside), "cut_50": sum(f < 0.5 for f in inside)}


def methods(hdbet_weights: str | None, closings: list[float]) -> dict[str, object]:
    """Name -> function (image, spacing, affine) -> bool mask, for every usable method; prints why others are skipped."""
    found: dict[str, object] = {"threshold": lambda image, spacing, affine: pp.threshold_brain_mask(image, spacing)}
    for mm in closings:
        found[f"thr-close{mm:g}"] = lambda image, spacing, affine, mm=mm: pp.threshold_brain_mask(image, spacing, closing_mm=mm)
    usable, why = pp.deepbet_available()
    if usable:
        pp._deepbet_extractor()  # its networks load once, outside the timing
        found["deepbet"] = lambda image, spacing, affine: pp.deepbet_mask(image, affine)
    else:
        print(f"deepbet skipped: {why}")
    usable, weights = pp.hdbet_available(hdbet_weights)
    if usable:
        found["hdbet"] = lambda image, spacing, affine: pp.hdbet_mask(image, affine, weights)
    else:
        print(f"HD-BET skipped: {weights}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=int, default=4, help="demo phantom scans to use (from scan 0)")
    parser.add_argument("--paper", type=int, default=2, help="paper phantom scans (512x512x150) to use (from scan 0)")
    parser.add_argument("--physics-demo", type=int, default=0, help="physics_demo phantom scans to use (from scan 0)")
    parser.add_argument("--physics-paper", type=int, default=0, help="physics_paper phantom scans to use (from scan 0)")
    parser.add_argument("--closing", default="", help="comma-separated closing radii (mm) of extra threshold masks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hdbet-weights", default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    found = methods(args.hdbet_weights, [float(mm) for mm in args.closing.split(",") if mm])
    figures: dict[str, dict[str, list]] = {}
    for preset, n in (("demo", args.demo), ("paper", args.paper), ("physics_demo", args.physics_demo), ("physics_paper", args.physics_paper)):
        generator = PhysicsPhantomGenerator(PHYSICS_PRESETS[preset], seed=0) if preset in PHYSICS_PRESETS else PhantomGenerator(PRESETS[preset], seed=0)
        for index in range(n):
            scan = generator.generate(index)
            spacing = tuple(float(s) for s in voxel_sizes_mm(scan.affine))
            for name, make in found.items():
                t = time.perf_counter()
                mask = np.asarray(make(scan.image, spacing, scan.affine), dtype=bool)
                seconds = time.perf_counter() - t
                row = {**mask_figures(mask, scan.tissue), **cmbs_cut(mask, scan.instances), "seconds": seconds}
                for key, value in row.items():
                    figures.setdefault(f"{preset}/{name}", {}).setdefault(key, []).append(value)
                print(f"{preset} scan {index} {name:9s} " + " ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    print("\nmean per preset and method (shape: demo 160x160x64, paper 512x512x150); CMBs: summed over the scans")
    print("| preset / method | Dice brain | Dice intracranial | brain covered | skull+scalp share of mask | CMBs cut (< 90% / < 50% inside) | s per scan |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for key, values in figures.items():
        means = {k: float(np.mean(v)) for k, v in values.items()}
        sums = {k: int(np.sum(values[k])) for k in ("cmbs", "cut_90", "cut_50")}
        summary[key] = {**means, **sums, "n_scans": len(values["seconds"])}
        print(f"| {key} | {means['dice_brain']:.3f} | {means['dice_intracranial']:.3f} | {means['brain_covered']:.3f} | "
              f"{means['skull_scalp_share']:.4f} | {sums['cut_90']} / {sums['cut_50']} of {sums['cmbs']} | {means['seconds']:.1f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
