"""Candidates: connected components of a thresholded probability map.

`extract_candidates` is the one definition of a stage-1 candidate used everywhere: out-of-fold
detection and `infer.py` (at `inference.unet_threshold`), mimic mining (at
`mining.threshold`) and the U-Nets' hard-negative round (at `unet.refine.threshold`) all call
it on the combined (or one member's) map. A candidate is one 26-connected component of
`map >= threshold`, scored by its peak and placed by `inference.candidate_point` (`CANDIDATE_POINTS`):
at its score-weighted centroid (`centroid`), or at the score-weighted centroid of its voxels in the
3x3x3 cube about its peak voxel (`peak`: a component that spans a CMB and the vein or nucleus beside it
keeps its point on the CMB instead of between the two). With `with_peak_point`, each candidate also carries
the `peak` point (`Candidate.peak_point`, written as the columns `PEAK_POINT_COLUMNS`), where stage 2 looks
too when `inference.stage2_window=max_far` (cmb.inference.cnn_scores.score_candidates).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from cmb.data.io import CONNECTIVITY_26, vox_to_mm
from cmb.validate import CANDIDATE_POINTS



@dataclass
class Candidate:
    """One candidate CMB. (i, j, k): its point (`extract_candidates`), 0-based voxels of the processing
    grid; (x_mm, y_mm, z_mm): the same point in RAS mm; peak/mean: stage-1 scores; size: voxels.
    `score` is the detection score (stage-2 probability once scored, else the peak). `peak_point`: the
    component's `peak` point (i, j, k voxels) where it was extracted `with_peak_point`, else None."""

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
    peak_point: tuple[float, float, float] | None = field(default=None, compare=False)

    @property
    def voxel(self) -> np.ndarray:
        return np.array([self.i, self.j, self.k])


def candidate_points(cands: list[Candidate]) -> np.ndarray:
    """(N, 3) float: the candidates' (i, j, k) positions in voxels ((0, 3) for none)."""
    return np.array([c.voxel for c in cands], dtype=float).reshape(-1, 3)


def candidate_point(cfg: Any) -> str:
    """A run's `inference.candidate_point` (`centroid` for a run made before the option)."""
    return str(cfg.inference.get("candidate_point", "centroid"))


def stage2_window(cfg: Any) -> str:
    """A run's `inference.stage2_window` (`candidate` for a run made before the option; cmb.inference.cnn_scores)."""
    return str(cfg.inference.get("stage2_window", "candidate"))


def point_description(point: str = "centroid") -> str:
    """How a candidate is placed, in words (the out-of-fold files' stamp and results.json)."""
    return {"centroid": "score-weighted centroid", "peak": "score-weighted centroid of the 3x3x3 voxels about its peak"}[point]


def extract_candidates(prob: np.ndarray, threshold: float, affine: np.ndarray, scan_id: str = "", min_size: int = 1,
                       point: str = "centroid", with_peak_point: bool = False) -> list[Candidate]:
    """Components (26-connected) of `prob >= threshold` (prob: float (I, J, K)), highest peak first, each placed
    by `point` (`CANDIDATE_POINTS`; voxels); `with_peak_point`: each also carries its `peak` point (`peak_point`)."""
    if point not in CANDIDATE_POINTS:
        raise ValueError(f"point must be one of {CANDIDATE_POINTS}, got {point!r}")
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
    peaks = np.zeros(n + 1)
    np.maximum.at(peaks, lab, weight)
    stacked = np.stack(coords, axis=1)
    peak_point = None
    if point == "peak" or with_peak_point:
        # each component's peak voxel (ties: the first in C order, as np.nonzero lists them; lexsort is stable),
        # then the weights of its voxels within one voxel of it (Chebyshev)
        first = np.lexsort((-weight, lab))
        starts = first[np.searchsorted(lab[first], np.arange(1, n + 1))]
        peak_vox = np.zeros((n + 1, 3), dtype=np.int64)
        peak_vox[1:] = stacked[starts]
        near_weight = weight * (np.max(np.abs(stacked - peak_vox[lab]), axis=1) <= 1)
        peak_point = _weighted_centroids(stacked, lab, near_weight, np.bincount(lab, near_weight, minlength=n + 1)[1:], n)
    centroids = peak_point if point == "peak" else _weighted_centroids(stacked, lab, weight, mass, n)
    peaks = peaks[1:]
    means = mass / sizes
    mm = vox_to_mm(centroids, affine)
    second = peak_point if with_peak_point else [None] * n
    out = [
        Candidate(scan_id, *map(float, c), *map(float, m), float(p), float(me), int(s), float(p),
                  None if q is None else (float(q[0]), float(q[1]), float(q[2])))
        for c, m, p, me, s, q in zip(centroids, mm, peaks, means, sizes, second)
        if s >= min_size
    ]
    return sorted(out, key=lambda c: -c.peak)


def _weighted_centroids(coords: np.ndarray, lab: np.ndarray, weight: np.ndarray, mass: np.ndarray, n: int) -> np.ndarray:
    """(n, 3) voxels: the `weight`-weighted centroid of each component 1..n (coords (V, 3), lab (V,), mass (n,) its weights' sums)."""
    return np.stack([np.bincount(lab, weight * coords[:, a], minlength=n + 1)[1:] for a in range(3)], axis=1) / mass[:, None]


CANDIDATE_COLUMNS = [f.name for f in fields(Candidate) if f.name != "peak_point"]
PEAK_POINT_COLUMNS = ("peak_i", "peak_j", "peak_k")  # Candidate.peak_point, in files of candidates that carry one


def write_candidates(cands: list[Candidate], path: str | Path, extra: dict[str, list] | None = None) -> Path:
    """CSV with one row per candidate (columns of `Candidate`, `PEAK_POINT_COLUMNS` when the candidates carry
    peak points, then `extra` columns), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    carried = [c.peak_point is not None for c in cands]
    if any(carried) and not all(carried):
        raise ValueError(f"{path}: some candidates carry a peak point and some do not")
    extra = {**({name: [c.peak_point[a] for c in cands] for a, name in enumerate(PEAK_POINT_COLUMNS)}  # type: ignore[index]
                if cands and all(carried) else {}), **(extra or {})}
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
    """Candidates (with their peak points where the file has `PEAK_POINT_COLUMNS`) and the raw rows (for extra
    columns) from `write_candidates` output."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    cands = []
    for r in rows:
        peak_point = tuple(float(r[k]) for k in PEAK_POINT_COLUMNS) if all(r.get(k) not in (None, "") for k in PEAK_POINT_COLUMNS) else None
        cands.append(Candidate(r["scan_id"], *(float(r[k]) for k in ("i", "j", "k", "x_mm", "y_mm", "z_mm", "peak", "mean")),
                               int(r["size"]), float(r["score"]), peak_point))  # type: ignore[arg-type]
    return cands, rows
