"""Resolution-aware processing: a scan resampled to the run's working voxel size, and maps back.

A 20x20x16-voxel window covers ~9x9x14 mm at 0.45x0.45x0.9 mm but 20x20x32 mm at 1x1x2 mm. With
`preprocess.spacing` set, every scan is resampled to that voxel size before preprocessing, for
training, out-of-fold detection and infer.py alike (one code path: `working_scan`); infer.py maps
its outputs back to the input's own grid.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import ndimage

from cmb.data.io import mm_to_vox, voxel_sizes_mm
from cmb.data.scan import CMBInstance, Scan

SAME_SPACING_MM = 1e-3  # voxel sizes this close to the working spacing are left as they are


def working_grid(affine: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, float, float]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The grid of voxel size `spacing` (mm along i, j, k) covering the same field of view as (affine, shape), with the
    same axis directions and the same outer corner: (4x4 affine, shape)."""
    old = voxel_sizes_mm(affine)
    new = np.asarray(spacing, dtype=float)
    direction = affine[:3, :3] / old
    out = np.eye(4)
    out[:3, :3] = direction * new
    out[:3, 3] = affine[:3, 3] + direction @ ((new - old) / 2)  # corner of voxel 0 stays where it was
    new_shape = tuple(int(max(1, np.ceil(n * o / s - 1e-6))) for n, o, s in zip(shape[:3], old, new))
    return out, new_shape  # type: ignore[return-value]


def resample_to_grid(data: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, target_shape: tuple[int, ...],
                     order: int) -> np.ndarray:
    """(I, J, K) `data` on `affine` resampled onto (target_affine, target_shape); `order` 1: linear (images, maps),
    0: nearest (labels, masks). Outside the source: the nearest edge value (order 1) or 0 (order 0)."""
    to_source = np.linalg.inv(affine) @ target_affine  # target voxel -> source voxel
    return ndimage.affine_transform(data, to_source[:3, :3], offset=to_source[:3, 3], output_shape=tuple(target_shape), order=order,
                                    mode="nearest" if order else "constant", cval=0)


def needs_resampling(scan_spacing: tuple[float, float, float], spacing: tuple[float, float, float] | None) -> bool:
    return spacing is not None and not np.allclose(scan_spacing, spacing, atol=SAME_SPACING_MM)


def working_scan(scan: Scan, spacing: tuple[float, float, float] | None) -> Scan:
    """`scan` on the working grid of voxel size `spacing` (None, or the scan's own voxel size: unchanged).

    Image: linear interpolation. Label components: nearest neighbour, and a CMB smaller than the new
    voxels keeps at least the voxel at its centroid. CMB centroids keep their world position (mm).
    `native_affine`/`native_shape` record the canonical grid before resampling (infer.py maps back).
    """
    if not needs_resampling(scan.spacing_mm, spacing):
        return scan
    affine, shape = working_grid(scan.affine, scan.shape, spacing)  # type: ignore[arg-type]
    image = resample_to_grid(np.asarray(scan.image, dtype=np.float32), scan.affine, affine, shape, order=1).astype(np.float32)
    centroids = mm_to_vox(np.array([c.centroid_mm for c in scan.cmbs], dtype=float).reshape(-1, 3), affine)
    instances = None
    if scan.instances is not None:
        instances = resample_to_grid(np.asarray(scan.instances), scan.affine, affine, shape, order=0).astype(np.int32)
        for c, point in zip(scan.cmbs, centroids):
            if c.label and not np.any(instances == c.label):
                instances[tuple(np.clip(np.rint(point).astype(int), 0, np.array(shape) - 1))] = c.label
    cmbs = [CMBInstance(tuple(float(v) for v in point), c.centroid_mm, c.label,  # type: ignore[arg-type]
                        int((instances == c.label).sum()) if instances is not None and c.label else c.n_voxels)
            for c, point in zip(scan.cmbs, centroids)]
    return replace(scan, image=image, affine=affine, instances=instances, cmbs=cmbs, native_affine=scan.affine, native_shape=scan.shape)


def to_native_grid(data: np.ndarray, scan: Scan) -> np.ndarray:
    """A map on `scan`'s (working) grid back on the canonical grid it was resampled from (linear); unchanged when not resampled."""
    if scan.native_affine is None or scan.native_shape is None:
        return data
    return resample_to_grid(data, scan.affine, scan.native_affine, scan.native_shape, order=1).astype(data.dtype)
