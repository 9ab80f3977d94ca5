"""Scans of a run: read, preprocessed (cached), and turned into training volumes once per process; the
wall time of each phase accumulated in the run's timing.json."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cmb.data.io import atomic_write_text
from cmb.data.patches import TargetOptions, TrainingVolume, build_training_volume
from cmb.data.preprocess import PreprocessConfig, Preprocessed, preprocess_on_working_grid
from cmb.data.readers import ScanDataset
from cmb.data.scan import Scan
from cmb.inference.candidates import candidate_points, read_candidates


class RunTiming:
    """Wall time per phase (seconds) and counts, accumulated in `path` (timing.json) across commands."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def add(self, key: str, seconds: float, count_key: str | None = None) -> None:
        timing = json.loads(self.path.read_text()) if self.path.is_file() else {}
        timing[key] = round(timing.get(key, 0.0) + seconds, 3)
        if count_key:
            timing[count_key] = timing.get(count_key, 0) + 1
        atomic_write_text(json.dumps(timing, indent=1), self.path)


@dataclass(frozen=True)
class VolumeOptions:
    """How training volumes are built (cmb.data.patches.build_training_volume)."""

    point_radius_mm: float  # centroid-only truth: the target is a ball of this radius
    dark_threshold: float  # normalized intensity below which in-brain voxels are "dark" negatives
    vessel_contrast: float | None  # None: no vessel pool (no sampling mix draws it)
    seed: int  # the run's seed: which negatives the pools keep


def median_spacing(dataset: ScanDataset, scan_ids: list[str]) -> list[float]:
    """The median voxel size (mm along i, j, k, canonical orientation) of the dataset's scans."""
    spacings = np.array([dataset.load(s).spacing_mm for s in scan_ids], dtype=float).reshape(-1, 3)
    return [round(float(v), 4) for v in np.median(spacings, axis=0)]


class ScanStore:
    """The run's dataset, preprocessed into `cache_dir`, with training volumes kept in memory once built."""

    def __init__(self, dataset: ScanDataset, preprocess: PreprocessConfig, cache_dir: Path, options: VolumeOptions,
                 timing: RunTiming) -> None:
        self.dataset, self.preprocess, self.cache_dir, self.options, self.timing = dataset, preprocess, Path(cache_dir), options, timing
        self._volumes: dict[tuple[str, TargetOptions], TrainingVolume] = {}

    def load(self, scan_id: str) -> tuple[Scan, Preprocessed]:
        """The scan on the run's working grid (`preprocess.spacing`, cmb.data.resample) and its preprocessing."""
        t = time.perf_counter()
        scan, pre = preprocess_on_working_grid(self.dataset.load(scan_id), self.preprocess, self.cache_dir)
        self.timing.add("preprocess", time.perf_counter() - t)
        return scan, pre

    def training_volumes(self, scan_ids: list[str], mimics_dir: Path | None = None, hits_dir: Path | None = None,
                         target: TargetOptions = TargetOptions()) -> list[TrainingVolume]:
        """Targets and negative pools per scan, with the mimics of `mimics_dir/<scan>.csv` and the stage-1 hits of
        `hits_dir/<scan>.csv` attached where present; `target`: what the U-Net marks (`unet.centroid_target`,
        `unet.bloom`)."""
        volumes = []
        o = self.options
        for scan_id in scan_ids:
            key = (scan_id, target)
            if key not in self._volumes:
                scan, pre = self.load(scan_id)
                self._volumes[key] = build_training_volume(scan, pre, point_radius_mm=o.point_radius_mm, dark_threshold=o.dark_threshold,
                                                           vessel_contrast=o.vessel_contrast, seed=o.seed, target_options=target)
            vol = self._volumes[key]
            if mimics_dir is not None and (mimics_dir / f"{scan_id}.csv").is_file():
                vol = replace(vol, mimics=candidate_voxels(mimics_dir / f"{scan_id}.csv"))
            if hits_dir is not None and (hits_dir / f"{scan_id}.csv").is_file():
                vol = replace(vol, stage1_hits=candidate_voxels(hits_dir / f"{scan_id}.csv"))
            volumes.append(vol)
        return volumes


def candidate_voxels(path: Path) -> np.ndarray:
    """(N, 3) int: the rounded voxel positions of the candidates in `path` (cmb.inference.candidates)."""
    cands, _ = read_candidates(path)
    return np.rint(candidate_points(cands)).astype(int)
