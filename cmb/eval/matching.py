"""The matching rule of design.md.

A detection hits a CMB when its point lies inside that CMB's label component or, where
only centroids are known (or as a fallback when it misses every component), within
`radius_mm` of the centroid. Detections are taken in descending score: each finds the
nearest of its hit CMBs not yet found; one whose hit CMBs are all found already is a
duplicate (neither TP nor FP); one that hits nothing is a false positive. Processing in
score order makes every threshold's result a prefix of one pass (LUNA16-style).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP, DUPLICATE = -1, -2


@dataclass
class Truth:
    """CMBs of one scan: centroids (N, 3) canonical voxels, optional instance map (labels 1..N
    in centroid order), voxel spacing (mm)."""

    centroids_vox: np.ndarray
    spacing_mm: tuple[float, float, float]
    instances: np.ndarray | None = None

    @property
    def n_cmbs(self) -> int:
        return len(self.centroids_vox)


def hit_sets(points_vox: np.ndarray, truth: Truth, radius_mm: float = 2.5) -> list[list[int]]:
    """For each detection point (N, 3 voxels) the CMB indices it hits, nearest first."""
    points = np.asarray(points_vox, dtype=float).reshape(-1, 3)
    cents = np.asarray(truth.centroids_vox, dtype=float).reshape(-1, 3)
    sp = np.asarray(truth.spacing_mm, dtype=float)
    out: list[list[int]] = []
    for p in points:
        if truth.instances is not None:
            v = np.rint(p).astype(int)
            if np.all(v >= 0) and np.all(v < truth.instances.shape):
                label = int(truth.instances[tuple(v)])
                if label > 0:
                    out.append([label - 1])
                    continue
        if len(cents) == 0:
            out.append([])
            continue
        dist = np.sqrt((((cents - p) * sp) ** 2).sum(axis=1))
        near = np.flatnonzero(dist <= radius_mm)
        out.append([int(i) for i in near[np.argsort(dist[near])]])
    return out


def assign(scores: np.ndarray, hits: list[list[int]]) -> np.ndarray:
    """Per detection (in the given order): the CMB index found, FP (-1) or DUPLICATE (-2)."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    found: set[int] = set()
    result = np.full(len(hits), FP, dtype=int)
    for d in order:
        if not hits[d]:
            continue
        free = [c for c in hits[d] if c not in found]
        if free:
            found.add(free[0])
            result[d] = free[0]
        else:
            result[d] = DUPLICATE
    return result
