"""Stage 2: Dou et al. (2016) discrimination CNN with batch normalization."""

from __future__ import annotations

import torch
from torch import nn


class DouCNN(nn.Module):
    """(N, 1, 20, 20, 16) patch -> (N, 2) logits (mimic, CMB) for the patch centre.

    Dou's discrimination model (valid convolutions, ReLU): conv 32@7x7x5 -> max-pool 2
    -> conv 64@5x5x3 -> FC 500 -> FC 100 -> 2, with batch norm after each convolution
    and fully connected layer (as Rau et al. added) and dropout. Shapes for a
    20x20x16 input: 14x14x12 -> 7x7x6 -> 3x3x4 -> 576 features.
    """

    def __init__(self, in_channels: int = 1, conv_channels: tuple[int, int] | list[int] = (32, 64), fc: tuple[int, int] | list[int] = (500, 100),
                 dropout: float = 0.3, window: tuple[int, int, int] | list[int] = (20, 20, 16)) -> None:
        super().__init__()
        c1, c2 = conv_channels
        self.features = nn.Sequential(
            nn.Conv3d(in_channels, c1, kernel_size=(7, 7, 5), bias=False),
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
