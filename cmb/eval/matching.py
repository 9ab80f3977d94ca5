"""The matching rule (docs/design.md, "Matching").

Hit test: a detection hits a CMB when its point lies inside that CMB's label component or,
where only centroids are known (or as a fallback when it misses every component), within
`radius_mm` of the centroid (distances in mm, so anisotropic voxels count correctly). A
10 mm CMB with a label component is hit anywhere inside it; with centroid-only truth only
within `radius_mm` of its centre.

Assignment: one-to-one, and independent of the order in which detections are listed.
Detections are taken in descending score, ties broken by position (i, then j, then k);
each one that can enlarge the current one-to-one assignment (directly, or by moving an
earlier detection to another CMB it also hits: an augmenting path) is a true positive.
So at every threshold the number of true positives is the largest possible one-to-one
matching of the detections above it (a detection between two CMBs and a second detection
on one of them find both). A detection that hits only CMBs already matched is a
*duplicate*: neither TP nor FP, as in LUNA16 (where one detection may even count for
several nodules); VALDO instead counts such extra claimants as false positives (the
per-scan precision/F1 of `cmb.eval.scan_metrics` follow VALDO). A detection that hits
nothing is a false positive.
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
        out.append([int(i) for i in near[np.argsort(dist[near], kind="stable")]])
    return out


def detection_order(scores: np.ndarray, points_vox: np.ndarray | None = None) -> np.ndarray:
    """Indices in descending score, ties broken by position (i, j, k ascending) when given."""
    scores = np.asarray(scores, dtype=float)
    if points_vox is None or len(scores) == 0:
        return np.argsort(-scores, kind="stable")
    p = np.asarray(points_vox, dtype=float).reshape(-1, 3)
    return np.lexsort((p[:, 2], p[:, 1], p[:, 0], -scores))


def assign(scores: np.ndarray, hits: list[list[int]], points_vox: np.ndarray | None = None) -> np.ndarray:
    """Per detection (in the given order): the CMB index it is matched to, FP (-1) or DUPLICATE (-2).

    scores: (N,); hits: per detection the CMBs it hits (nearest first, `hit_sets`);
    points_vox: (N, 3), used only to break score ties so the result does not depend on
    row order (without it, ties keep row order). Any prefix of the detections in
    (score, position) order gets a maximum one-to-one matching from this one pass
    (matched detections and CMBs stay matched as later ones are added), so a threshold
    sweep is a cumulative sum over the returned status.
    """
    if len(hits) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(hits)} hit lists")
    # written here rather than with scipy's matchers: the sweep needs the matching of every prefix in one pass
    cmb_owner: dict[int, int] = {}

    def augment(det: int, seen: set[int]) -> bool:
        for cmb in hits[det]:
            if cmb in seen:
                continue
            seen.add(cmb)
            if cmb not in cmb_owner or augment(cmb_owner[cmb], seen):
                cmb_owner[cmb] = det
                return True
        return False

    for d in detection_order(scores, points_vox):
        if hits[d]:
            augment(int(d), set())
    status = np.full(len(hits), FP, dtype=int)
    for d, h in enumerate(hits):
        if h:
            status[d] = DUPLICATE
    for cmb, det in cmb_owner.items():
        status[det] = cmb
    return status
