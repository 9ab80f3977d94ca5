"""A trained U-Net member's check on its own training CMBs (training data only, never held-out scans).

A member can end training "capped": its largest output is the sigmoid of a constant (e.g.
0.55 on every CMB and on large dark regions), because its last layer learned to mark what
is *not* a CMB and gives a fixed bias elsewhere. Such a member still lowers the loss a little
but halves the ensemble's scores and floods stage 1 with large low-confidence components
(paper preset, seed 1: 2 of 32 members). It is obvious on the member's own training CMBs,
which a healthy member scores ~1.0.

The same scores guard the hard-negative round (`replay_weights`): trained on its own false
positives, a member can unlearn a training CMB that looks like them (paper preset, seed 1: a
2 mm CMB on the rim of an iron-dark nucleus, 0.57-1.0 before the round, <= 0.1 after it in 11
of the 14 members that trained on it); with `unet.refine.replay` the round draws such CMBs more often.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cmb import WINDOW
from cmb.data.augment import centred_window
from cmb.data.patches import TrainingVolume


def cmb_windows(volumes: list[TrainingVolume]) -> np.ndarray:
    """(N, 1, 20, 20, 16) float32 windows centred on every training CMB of `volumes` (zero past the edge)."""
    windows = [centred_window(v.image, c) for v in volumes for c in v.cmb_centres]
    return np.stack(windows)[:, None].astype(np.float32) if windows else np.zeros((0, 1, *WINDOW), np.float32)


@torch.no_grad()
def training_cmb_peaks(net: nn.Module, volumes: list[TrainingVolume], batch: int = 64) -> np.ndarray:
    """Peak probability of `net` in the 20x20x16 window centred on each training CMB, (N,) in [0, 1].

    Runs on the device of the net's weights, in eval mode (batch-norm running statistics, as
    in prediction); the caller's mode is restored.
    """
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    stacked = torch.from_numpy(cmb_windows(volumes))
    if len(stacked) == 0:
        return np.zeros(0, dtype=np.float32)
    was_training = net.training
    net.eval()
    try:
        peaks = [torch.sigmoid(net(stacked[i : i + batch].to(device)).float()).amax(dim=(1, 2, 3, 4)).cpu()
                 for i in range(0, len(stacked), batch)]
    finally:
        net.train(was_training)
    return torch.cat(peaks).numpy()


def is_capped(peaks: np.ndarray, min_median_peak: float) -> bool:
    """True when the member's median peak on its training CMBs is below `min_median_peak`."""
    return len(peaks) > 0 and float(np.median(peaks)) < min_median_peak


def replay_weights(slipping: np.ndarray, share: float) -> np.ndarray | None:
    """Draw weights of the training CMBs for the next epoch of a hard-negative round, (N,).

    The CMBs flagged in `slipping` (N,) bool get `share` of all positive draws between them,
    on top of the uniform rest; None (uniform draws) when none is flagged.
    """
    slipping = np.asarray(slipping, dtype=bool)
    if not slipping.any():
        return None
    return (1.0 - share) / len(slipping) + share * slipping / slipping.sum()


class ReplaySchedule:
    """Positive draw weights for each epoch of a hard-negative round (`PatchDataModule.positive_weights`).

    Called at the start of every epoch: the member scores its own training CMBs; one below
    `below` is flagged for the rest of the round (once slipped, kept: a CMB let go as soon as it
    is back slips again), and the flagged CMBs share `share` of the positive draws
    (`replay_weights`). Its record (`slipping_per_epoch`, `replayed`) is checkpointed with the
    member (`state_dict`), so a resumed round goes on where it was.
    """

    def __init__(self, net: nn.Module, volumes: list[TrainingVolume], below: float, share: float) -> None:
        self.net, self.volumes, self.below, self.share = net, volumes, float(below), float(share)
        self.replayed = np.zeros(sum(len(v.cmb_centres) for v in volumes), dtype=bool)
        self.slipping_per_epoch: list[int] = []

    def __call__(self) -> np.ndarray | None:
        slipping = training_cmb_peaks(self.net, self.volumes) < self.below
        self.slipping_per_epoch.append(int(slipping.sum()))
        self.replayed |= slipping
        return replay_weights(self.replayed, self.share)

    def state_dict(self) -> dict:
        return {"replayed": self.replayed.tolist(), "slipping_per_epoch": list(self.slipping_per_epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.replayed = np.asarray(state["replayed"], dtype=bool)
        self.slipping_per_epoch = [int(n) for n in state["slipping_per_epoch"]]
