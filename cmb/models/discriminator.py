"""Stage 2: Dou et al. (2016) discrimination CNN with batch normalization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DouCNN(nn.Module):
    """(N, 1, 20, 20, 16) patch -> (N, 2) logits (mimic, CMB) for the patch centre.

    Dou's discrimination model (valid convolutions, ReLU): conv 32@7x7x5 -> max-pool 2
    -> conv 64@5x5x3 -> FC 500 -> FC 100 -> 2, with batch norm after each convolution
    and fully connected layer (as Rau et al. added) and dropout. Shapes for a
    20x20x16 input: 14x14x12 -> 7x7x6 -> 3x3x4 -> 576 features.

    `context_zoom` z > 1 (None or 1: off, the paper's net): the net takes the window of z times
    the extent, (N, C, z*20, z*20, z*16), around the same centre, and sees two views of it as
    2C channels of 20x20x16: its central 20x20x16 (the paper's window) and the whole, averaged
    z x z x z. The context view shows what surrounds a CMB that fills the window (a large
    one), a nucleus or a vein. `input_window` is the window the caller must cut.
    """

    def __init__(self, in_channels: int = 1, conv_channels: tuple[int, int] | list[int] = (32, 64), fc: tuple[int, int] | list[int] = (500, 100),
                 dropout: float = 0.3, window: tuple[int, int, int] | list[int] = (20, 20, 16), context_zoom: int | None = None) -> None:
        super().__init__()
        zoom = 1 if context_zoom is None else context_zoom
        if isinstance(zoom, bool) or not isinstance(zoom, int) or zoom < 1:
            raise ValueError(f"context_zoom must be a whole number >= 1 (or null: off), got {context_zoom!r}")
        self.window: tuple[int, int, int] = tuple(int(w) for w in window)  # type: ignore[assignment]
        self.context_zoom = zoom
        self.input_window: tuple[int, int, int] = tuple(zoom * w for w in self.window)  # type: ignore[assignment]
        c1, c2 = conv_channels
        self.features = nn.Sequential(
            nn.Conv3d(in_channels * (2 if zoom > 1 else 1), c1, kernel_size=(7, 7, 5), bias=False),
            nn.BatchNorm3d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(2),
            nn.Conv3d(c1, c2, kernel_size=(5, 5, 3), bias=False),
            nn.BatchNorm3d(c2),
            nn.ReLU(inplace=True),
        )
        w = [((s - k1 + 1) // 2) - k2 + 1 for s, k1, k2 in zip(window, (7, 7, 5), (5, 5, 3))]
        if min(w) < 1:
            raise ValueError(f"window {tuple(window)} is too small for DouCNN")
        n_features = c2 * w[0] * w[1] * w[2]
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_features, fc[0], bias=False),
            nn.BatchNorm1d(fc[0]),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc[0], fc[1], bias=False),
            nn.BatchNorm1d(fc[1]),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc[1], 2),
        )

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *input_window) -> (N, C or 2C, *window): the input itself, or its centre and its zoomed-out whole."""
        if self.context_zoom == 1:
            return x
        lo = [(s - w) // 2 for s, w in zip(self.input_window, self.window)]  # the input's centre voxel lands at window//2
        centre = x[:, :, lo[0] : lo[0] + self.window[0], lo[1] : lo[1] + self.window[1], lo[2] : lo[2] + self.window[2]]
        return torch.cat([centre, F.avg_pool3d(x, self.context_zoom)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *input_window) -> (N, 2) logits."""
        if tuple(x.shape[2:]) != self.input_window:
            raise ValueError(f"DouCNN expects windows of {self.input_window} voxels, got {tuple(x.shape[2:])}")
        return self.classifier(self.features(self.views(x)))
