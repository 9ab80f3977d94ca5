"""Reading a labelled scan (`cmb.data.readers.build_scan`), and its CMB statistics against the whole-volume way.

    python benchmarks/scan_load.py                # scan 0 of the `paper` preset (512x512x150), 3 repeats
    python benchmarks/scan_load.py --repeats 5 --threads 2

The out-of-fold protocol reads every scan again in each fold that mines on it or detects on it (~135 reads
on a 15-scan preset), so the seconds of one read add up. Prints the seconds of one `build_scan` (image and
label map from .nii.gz, reorientation, CMB statistics) and, on the same label map, the seconds of the
statistics as `cmb.data.readers` computes them (ranks of label values in one pass; centroid and size inside
each CMB's bounding box) against the whole-volume way it replaced (one pass per label value; scipy's
center_of_mass and sum_labels over the whole volume), as a ratio, with a check that both give the same CMBs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from cmb.data.phantom import PRESETS, PhantomGenerator
from cmb.data.readers import build_scan, cmbs_from_instances, instances_from_label_map


def whole_volume_statistics(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The replaced way: instance map by one pass per label value, then centroids and sizes over the whole volume."""
    labels = np.rint(labels).astype(np.int64)
    values = np.unique(labels[labels > 0])
    instances = np.zeros(labels.shape, dtype=np.int32)
    for new, value in enumerate(values, start=1):
        instances[labels == value] = new
    ids = np.arange(1, len(values) + 1)
    centroids = np.array(ndimage.center_of_mass(instances > 0, instances, ids)).reshape(-1, 3)
    sizes = ndimage.sum_labels(instances > 0, instances, ids)
    return instances, centroids, sizes


def best_of(repeats: int, fn) -> float:  # noqa: ANN001 (a callable)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    scan = PhantomGenerator(PRESETS[args.preset], seed=0).generate(args.index)
    labels = scan.instances.astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        image_path, label_path = Path(tmp) / "scan.nii.gz", Path(tmp) / "labels.nii.gz"
        nib.save(nib.Nifti1Image(scan.image, scan.affine), image_path)
        nib.save(nib.Nifti1Image(scan.instances.astype(np.int16), scan.affine), label_path)
        read = best_of(args.repeats, lambda: build_scan("scan", image_path, label_path=label_path))

    new = best_of(args.repeats, lambda: cmbs_from_instances(instances_from_label_map(labels), scan.affine))
    old = best_of(args.repeats, lambda: whole_volume_statistics(labels))
    cmbs = cmbs_from_instances(instances_from_label_map(labels), scan.affine)
    _, centroids, sizes = whole_volume_statistics(labels)
    same = (len(cmbs) == len(sizes) and np.allclose([c.centroid_vox for c in cmbs], centroids, atol=1e-9)
            and [c.n_voxels for c in cmbs] == [int(s) for s in sizes])
    print(f"{args.preset} scan {args.index}: shape {scan.image.shape}, {len(cmbs)} CMBs")
    print(f"build_scan (image + label map, .nii.gz): {read:.2f} s")
    print(f"CMB statistics: whole-volume {old:.2f} s, per bounding box {new:.2f} s: {old / new:.1f}x; same CMBs: {same}")


if __name__ == "__main__":
    main()
