"""Stage-2 scoring: the discriminator ensemble on 20x20x16 patches around candidates."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from cmb import input_window
from cmb.data.augment import centred_window
from cmb.inference.candidates import Candidate, candidate_points


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


def score_candidates(nets: list[nn.Module], image: np.ndarray, candidates: list[Candidate], tta: bool = True,
                     device: str | torch.device = "cpu", fusion: str = "cnn") -> list[Candidate]:
    """The candidates with `score` set to their detection score: the ensemble's CMB probability
    (`score_points` at their voxels), fused with their stage-1 peak by `fusion` (`fuse_scores`).

    One function for out-of-fold detection and `infer.py`, so both score the same patches.
    """
    points = candidate_points(candidates)
    cnn = score_points(nets, image, points, tta=tta, device=device)
    scores = fuse_scores(np.array([c.peak for c in candidates], dtype=float), cnn, fusion)
    return [replace(c, score=float(s)) for c, s in zip(candidates, scores)]
