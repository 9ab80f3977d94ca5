"""Stage 1: a batch-normalized 3D U-Net for CMB localization."""

from __future__ import annotations

import torch
from torch import nn


def conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Two 3x3x3 convolutions, each followed by batch norm and ReLU (same padding)."""
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm3d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm3d(out_ch),
        nn.ReLU(inplace=True),
    )


class UNet3D(nn.Module):
    """Batch-normalized 3D U-Net: (N, 1, I, J, K) -> (N, 1, I, J, K) CMB logits.

    `channels` gives the width per level; len(channels) - 1 is the number of 2x2x2
    poolings. Fully convolutional: any input whose sides divide by 2**(len(channels)-1)
    works. `receptive_field` (voxels per axis) says how far an output voxel looks; keep it
    near the 20x20x16 training window, or whole-scan tiles show a member context it never
    saw in training (conf/model/unet.yaml uses one pooling: 18 voxels).
    We write our own because MONAI's BasicUNet fixes four poolings (too deep for a
    16-slice window) and its UNet uses strided residual units rather than the paper's
    plain conv-BN blocks.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, channels: tuple[int, ...] | list[int] = (16, 32, 64)) -> None:
        super().__init__()
        channels = list(channels)
        if len(channels) < 2:
            raise ValueError("UNet3D needs at least two levels")
        self.channels = channels
        self.down_factor = 2 ** (len(channels) - 1)
        self.encoders = nn.ModuleList()
        prev = in_channels
        for ch in channels:
            self.encoders.append(conv_block(prev, ch))
            prev = ch
        self.pool = nn.MaxPool3d(2)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for ch in reversed(channels[:-1]):
            self.ups.append(nn.ConvTranspose3d(prev, ch, kernel_size=2, stride=2))
            self.decoders.append(conv_block(2 * ch, ch))
            prev = ch
        self.head = nn.Conv3d(prev, out_channels, kernel_size=1)

    @property
    def receptive_field(self) -> int:
        """Side of the input cube (voxels) that one output voxel depends on.

        Each 3x3x3 convolution at level l (resolution 1/2**l) widens it by 2 * 2**l, each
        pooling by 2**l; the transposed convolutions (kernel = stride = 2) add nothing.
        """
        levels = len(self.channels)
        encoder = sum(4 * 2**level for level in range(levels))
        decoder = sum(4 * 2**level + 2**level for level in range(levels - 1))  # convs + the pooling below
        return 1 + encoder + decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.down_factor for s in x.shape[2:]):
            raise ValueError(f"input sides {tuple(x.shape[2:])} must divide by {self.down_factor}")
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.ups, self.decoders):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
