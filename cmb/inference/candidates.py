"""Candidates: connected components of a thresholded probability map.

`extract_candidates` is the one definition of a stage-1 candidate used everywhere: out-of-fold
detection and `infer.py` (at `inference.unet_threshold`), mimic mining (at
`mining.threshold`) and the U-Nets' hard-negative round (at `unet.refine.threshold`) all call
it on the combined (or one member's) map. A candidate is one 26-connected component of
`map >= threshold`, placed at its score-weighted centroid, scored by its peak.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from scipy import ndimage

from cmb.data.io import CONNECTIVITY_26, vox_to_mm



@dataclass
class Candidate:
    """One candidate CMB. (i, j, k): score-weighted centroid, 0-based voxels of the processing
    grid; (x_mm, y_mm, z_mm): the same point in RAS mm; peak/mean: stage-1 scores; size: voxels.
    `score` is the detection score (stage-2 probability once scored, else the peak)."""

    scan_id: str
    i: float
    j: float
    k: float
    x_mm: float
    y_mm: float
    z_mm: float
    peak: float
    mean: float
    size: int
    score: float = float("nan")

    @property
    def voxel(self) -> np.ndarray:
        return np.array([self.i, self.j, self.k])


def candidate_points(cands: list[Candidate]) -> np.ndarray:
    """(N, 3) float: the candidates' (i, j, k) positions in voxels ((0, 3) for none)."""
    return np.array([c.voxel for c in cands], dtype=float).reshape(-1, 3)


def extract_candidates(prob: np.ndarray, threshold: float, affine: np.ndarray, scan_id: str = "", min_size: int = 1) -> list[Candidate]:
    """Components (26-connected) of `prob >= threshold` (prob: float (I, J, K)), highest peak first."""
    labels, n = ndimage.label(prob >= threshold, structure=CONNECTIVITY_26)
    if n == 0:
        return []
    # statistics from the labelled voxels only: ndimage.center_of_mass & co. sweep the whole
    # volume once per statistic (~15 s on 512x512x150), this is O(candidate voxels)
    coords = np.nonzero(labels)
    lab = labels[coords]
    weight = prob[coords].astype(np.float64)
    sizes = np.bincount(lab, minlength=n + 1)[1:]
    mass = np.bincount(lab, weight, minlength=n + 1)[1:]
    centroids = np.stack([np.bincount(lab, weight * c, minlength=n + 1)[1:] for c in coords], axis=1) / mass[:, None]
    peaks = np.zeros(n + 1)
    np.maximum.at(peaks, lab, weight)
    peaks = peaks[1:]
    means = mass / sizes
    mm = vox_to_mm(centroids, affine)
    out = [
        Candidate(scan_id, *map(float, c), *map(float, m), float(p), float(me), int(s), float(p))
        for c, m, p, me, s in zip(centroids, mm, peaks, means, sizes)
        if s >= min_size
    ]
    return sorted(out, key=lambda c: -c.peak)


CANDIDATE_COLUMNS = [f.name for f in fields(Candidate)]


def write_candidates(cands: list[Candidate], path: str | Path, extra: dict[str, list] | None = None) -> Path:
    """CSV with one row per candidate (columns of `Candidate` plus `extra` columns), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    extra = extra or {}
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CANDIDATE_COLUMNS + list(extra))
        for n, c in enumerate(cands):
            row = asdict(c)
            writer.writerow([_fmt(row[k]) for k in CANDIDATE_COLUMNS] + [_fmt(extra[k][n]) for k in extra])
    tmp.replace(path)
    return path


def _fmt(value: object) -> str:
    """Floats at full precision (shortest round-trip repr): saturated peaks such as 0.9999996 and
    0.9999999 must stay distinct for the FROC, and positions must read back to the same voxel."""
    return repr(float(value)) if isinstance(value, (float, np.floating)) else str(value)


def read_candidates(path: str | Path) -> tuple[list[Candidate], list[dict[str, str]]]:
    """Candidates and the raw rows (for extra columns) from `write_candidates` output."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    cands = []
    for r in rows:
        cands.append(Candidate(r["scan_id"], *(float(r[k]) for k in ("i", "j", "k", "x_mm", "y_mm", "z_mm", "peak", "mean")),
                               int(r["size"]), float(r["score"])))
    return cands, rows
