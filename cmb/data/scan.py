"""In-memory scan records: image, geometry and truth as CMB instances."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmb.data.io import voxel_sizes_mm


@dataclass(frozen=True)
class CMBInstance:
    """One annotated microbleed.

    `centroid_vox` is a 0-based (i, j, k) position in the scan's processing (canonical)
    array; `centroid_mm` the same point in world RAS millimetres. `label` is the
    component's value in `Scan.instances` (0 for centroid-only truth).
    """

    centroid_vox: tuple[float, float, float]
    centroid_mm: tuple[float, float, float]
    label: int = 0
    n_voxels: int = 0


@dataclass
class Scan:
    """One SWI scan, reoriented to the closest canonical (RAS) orientation.

    image: float32 array (I, J, K) in the canonical orientation.
    affine: 4x4 voxel->RAS mm affine of `image`.
    instances: int32 instance label map (I, J, K), 0 background, 1..N one per CMB, or
        None when only centroids are known.
    cmbs: the CMB instances (empty for a scan without CMBs or without truth).
    source_affine / source_shape / to_canonical: the file's own grid and the nibabel
        orientation transform used, so outputs can be mapped back.
    slice_uids: for a DICOM series, the SOP Instance UID of each slice k of the source grid.
    native_affine / native_shape: the canonical grid before resampling to a working voxel size
        (cmb.data.resample.working_scan); None when the scan is on its own grid.
    """

    scan_id: str
    image: np.ndarray
    affine: np.ndarray
    path: Path
    cmbs: list[CMBInstance] = field(default_factory=list)
    instances: np.ndarray | None = None
    mask_path: Path | None = None
    has_truth: bool = True
    source_affine: np.ndarray | None = None
    source_shape: tuple[int, ...] | None = None
    to_canonical: np.ndarray | None = None
    slice_uids: list[str] | None = None  # DICOM input: SOP Instance UID of each source slice k
    native_affine: np.ndarray | None = None
    native_shape: tuple[int, ...] | None = None

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size in mm along (i, j, k)."""
        return tuple(float(s) for s in voxel_sizes_mm(self.affine))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    @property
    def centroids_vox(self) -> np.ndarray:
        """(N, 3) float array of CMB centroids in canonical voxel indices."""
        return np.array([c.centroid_vox for c in self.cmbs], dtype=float).reshape(-1, 3)
