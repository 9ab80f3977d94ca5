"""Small real data written in tmp_path: NIfTI volumes with dark spherical 'CMBs'."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHAPE = (40, 40, 24)
AFFINE = np.diag([0.45, 0.45, 0.9, 1.0])


def make_volume(seed: int, centres: list[tuple[int, int, int]], shape=SHAPE, radius_vox: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """A bright noisy 'brain' with dark balls at `centres`; returns (image, instance labels)."""
    rng = np.random.default_rng(seed)
    image = (800 + 40 * rng.standard_normal(shape)).astype(np.float32)
    labels = np.zeros(shape, dtype=np.int16)
    grid = np.indices(shape).astype(float)
    for n, c in enumerate(centres, start=1):
        d2 = (grid[0] - c[0]) ** 2 + (grid[1] - c[1]) ** 2 + ((grid[2] - c[2]) * 2) ** 2
        image[d2 <= radius_vox**2] *= 0.3
        labels[d2 <= radius_vox**2] = n
    return image, labels


def save(data: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def nifti_root(tmp_path: Path) -> Path:
    """`nifti` layout with label maps: 3 scans with 2, 1 and 0 CMBs."""
    root = tmp_path / "nifti"
    for i, centres in enumerate([[(12, 12, 8), (28, 26, 14)], [(20, 20, 12)], []]):
        image, labels = make_volume(i, centres)
        save(image, root / "images" / f"s{i}.nii.gz")
        save(labels, root / "labels" / f"s{i}.nii.gz")
    return root


@pytest.fixture
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache folder holding the `tiny` synthetic preset (4 scans of 64x64x32)."""
    cache = tmp_path_factory.mktemp("cache")
    from cmb.data.synthetic import ensure_synthetic_dataset

    ensure_synthetic_dataset("tiny", 0, cache)
    return cache
