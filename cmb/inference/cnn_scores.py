"""Stage-2 scoring: the discriminator ensemble on 20x20x16 patches around candidates.

Where stage 2 looks is `inference.stage2_window` (`STAGE2_WINDOWS`): `candidate`, the window at each candidate's
point; `max_far`, also the window at the component's peak point (`Candidate.peak_point`), taken, with its
point and score, where the ensemble scores it higher and it lies more than `far_mm` (the run's
`eval.match_radius_mm`) from the candidate's point: a component that joins a CMB to the vein or nucleus
beside it has its centroid between the two, and there the window sees neither well. (With
`inference.candidate_point=peak` the two points coincide, and `max_far` scores one window.)
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from cmb import input_window
from cmb.data.augment import centred_window
from cmb.data.io import vox_to_mm
from cmb.inference.candidates import Candidate, candidate_points
from cmb.validate import STAGE2_WINDOWS


@torch.no_grad()
def score_points(nets: list[nn.Module], image: np.ndarray, points_vox: np.ndarray, batch_size: int = 256, tta: bool = True,
                 device: str | torch.device = "cpu") -> np.ndarray:
    """Mean CMB probability of the ensemble for windows centred on each point.

    image: normalized float32 (I, J, K); points_vox: (N, 3) voxel positions (rounded).
    Each member gets the window it takes (`cmb.input_window`: 20x20x16, or larger with a
    context view), zero-padded past the volume's edge.
    With `tta`, each member also sees the window flipped along i and j, and the
    probabilities are averaged (cheap, and the model was trained on flips).
    Returns (N,) float32 in [0, 1].
    """
    points = np.rint(np.asarray(points_vox, dtype=float).reshape(-1, 3)).astype(int)
    if len(points) == 0:
        return np.zeros(0, dtype=np.float32)
    windows: dict[tuple[int, int, int], np.ndarray] = {}  # cut once per window size among the members
    device = torch.device(device)
    probs = np.zeros(len(points), dtype=np.float64)
    views = [(), (2,), (3,), (2, 3)] if tta else [()]
    for net in nets:
        size = input_window(net)
        if size not in windows:
            windows[size] = np.stack([centred_window(image, p, size) for p in points])[:, None].astype(np.float32)
        net = net.to(device).eval()
        for start in range(0, len(points), batch_size):
            batch = torch.from_numpy(windows[size][start : start + batch_size]).to(device)
            acc = torch.zeros(len(batch), dtype=torch.float64, device=device)
            for dims in views:
                x = torch.flip(batch, dims) if dims else batch
                acc += torch.softmax(net(x).float(), dim=1)[:, 1].double()
            probs[start : start + len(batch)] += (acc / len(views)).cpu().numpy()
    return (probs / len(nets)).astype(np.float32)


def fuse_scores(peaks: np.ndarray, cnn: np.ndarray, fusion: str = "cnn") -> np.ndarray:
    """The detection score from the stage-1 peaks and the CNN ensemble's probabilities, (N,) each:
    `cnn` the CNNs' alone (the paper), `mean` (p + c) / 2, `geometric` sqrt(p c)."""
    p, c = np.asarray(peaks, dtype=np.float64), np.asarray(cnn, dtype=np.float64)
    if fusion == "cnn":
        return c
    if fusion == "mean":
        return (p + c) / 2
    if fusion == "geometric":
        return np.sqrt(p * c)
    raise ValueError(f"score fusion must be one of cnn, mean, geometric; got {fusion!r}")


def lies_far(points: np.ndarray, peak_points: np.ndarray, spacing_mm: np.ndarray | tuple[float, float, float], far_mm: float) -> np.ndarray:
    """(N,) bool: the peak point lies more than `far_mm` (mm) from the candidate's point (both (N, 3) voxels; spacing_mm (3,))."""
    offsets_mm = (np.asarray(peak_points, float) - np.asarray(points, float)).reshape(-1, 3) * np.asarray(spacing_mm, float)
    return np.linalg.norm(offsets_mm, axis=1) > far_mm


def score_candidates(nets: list[nn.Module], image: np.ndarray, candidates: list[Candidate], tta: bool = True,
                     device: str | torch.device = "cpu", fusion: str = "cnn", window: str = "candidate",
                     affine: np.ndarray | None = None, far_mm: float = 0.0) -> list[Candidate]:
    """The candidates with `score` set to their detection score: the ensemble's CMB probability
    (`score_points` at their voxels), fused with their stage-1 peak by `fusion` (`fuse_scores`). With
    `window="max_far"`, a candidate whose peak point `lies_far` and whose peak window scores higher comes back at its
    peak point with that window's score (the candidates must carry `peak_point`s; `affine` (4, 4) gives the spacing and RAS mm).

    One function for out-of-fold detection, `stage=score` and `infer.py`, so all score the same patches.
    """
    if window not in STAGE2_WINDOWS:
        raise ValueError(f"window must be one of {STAGE2_WINDOWS}, got {window!r}")
    points = candidate_points(candidates)
    peaks = np.array([c.peak for c in candidates], dtype=float)
    scores = fuse_scores(peaks, score_points(nets, image, points, tta=tta, device=device), fusion)
    scored = [replace(c, score=float(s)) for c, s in zip(candidates, scores)]
    if window == "candidate" or not candidates:
        return scored
    if affine is None or any(c.peak_point is None for c in candidates):
        raise ValueError("stage2_window=max_far needs each candidate's peak point and the scan's affine")
    peak_points = np.array([c.peak_point for c in candidates], dtype=float)
    spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    far = np.flatnonzero(lies_far(points, peak_points, spacing, far_mm))  # only these windows can be taken: score no others
    if len(far):
        far_scores = fuse_scores(peaks[far], score_points(nets, image, peak_points[far], tta=tta, device=device), fusion)
        mm = vox_to_mm(peak_points[far], affine)
        for n, score, m in zip(far, far_scores, mm):
            if score > scores[n]:
                p = peak_points[n]
                scored[n] = replace(scored[n], i=float(p[0]), j=float(p[1]), k=float(p[2]), x_mm=float(m[0]), y_mm=float(m[1]),
                                    z_mm=float(m[2]), score=float(score))
    return scored
