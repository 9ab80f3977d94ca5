"""Stage 1: a batch-normalized 3D U-Net for CMB localization."""

from __future__ import annotations

import torch
from torch import nn


def activation(leaky_slope: float = 0.0) -> nn.Module:
    """ReLU at `leaky_slope` 0 (the paper's), else LeakyReLU with that slope for negative inputs."""
    if leaky_slope < 0 or leaky_slope >= 1:
        raise ValueError(f"leaky_slope must lie in [0, 1), got {leaky_slope}")
    return nn.LeakyReLU(leaky_slope, inplace=True) if leaky_slope else nn.ReLU(inplace=True)


def conv_block(in_ch: int, out_ch: int, leaky_slope: float = 0.0) -> nn.Sequential:
    """Two 3x3x3 convolutions, each followed by batch norm and ReLU (LeakyReLU at `leaky_slope` > 0; same padding)."""
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm3d(out_ch),
        activation(leaky_slope),
        nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm3d(out_ch),
        activation(leaky_slope),
    )


def odd_box(kernel: tuple[int, int, int] | list[int], what: str) -> tuple[int, int, int]:
    """`kernel` as three odd positive box sides (voxels along i, j, k), or a ValueError naming `what`."""
    box = tuple(int(k) for k in kernel)
    if len(box) != 3 or any(k < 1 or k % 2 == 0 for k in box):
        raise ValueError(f"{what} kernel must be three odd positive sides (voxels), got {box}")
    return box  # type: ignore[return-value]


class LocalContrast(nn.Module):
    """(N, C, I, J, K) -> (N, 2C, I, J, K): the input, and the input over its local mean.

    SWI contrast is relative: a microbleed inside an iron-dark nucleus is as dark against
    its surround as one in white matter, but the surround is itself dark, so in absolute
    intensity the pair looks like the nucleus (a negative), not like the microbleeds seen
    in training. The ratio channel is the same for both. The local mean is a box average
    over `kernel` voxels (i, j, k) that counts only voxels inside the input (no zero
    padding), floored at `floor` (normalized intensity) so background (0) stays 0.
    Written here because it must run inside the network, on windows and tiles alike.
    """

    def __init__(self, kernel: tuple[int, int, int] | list[int], floor: float = 0.05) -> None:
        super().__init__()
        self.kernel = odd_box(kernel, "local-contrast")
        self.floor = floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The box is separable: one 1-D mean per axis, each over the voxels it finds inside the
        # input, so the product is the in-input box mean.
        mean = x
        for axis, k in enumerate(self.kernel):
            mean = box_mean_1d(mean, 2 + axis, k)
        return torch.cat([x, x / mean.clamp_min(self.floor)], dim=1)


def box_mean_1d(x: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """Mean of `x` over a centred window of `k` (odd) voxels along `dim`, counting only voxels inside `x`.

    Cumulative sums, because avg_pool3d's count_include_pad=False path is ~6x slower on a CPU
    (96x96x64 voxels, 9x9x5 box: 18.7 ms against 2.9 ms) and same values to ~1e-6.
    """
    n, r = x.shape[dim], k // 2
    sums = nn.functional.pad(x, [0, 0] * (x.dim() - 1 - dim) + [r + 1, r]).cumsum(dim)  # pad lists the last dim first
    window = sums.narrow(dim, k, n) - sums.narrow(dim, 0, n)
    index = torch.arange(n, device=x.device)
    count = (index + r).clamp(max=n - 1) - (index - r).clamp(min=0) + 1
    shape = [1] * x.dim()
    shape[dim] = n
    return window / count.to(x.dtype).view(shape)


class DarkBlobContrast(nn.Module):
    """(N, C, I, J, K) -> (N, C, I, J, K): the input over its morphological closing.

    A closing (a box max, then a box min, over `kernel` voxels) fills dark structures
    narrower than the box and keeps larger ones and their edges, so the ratio is < 1 on a
    small dark blob (a CMB, also one inside or on the rim of an iron-dark nucleus) and on
    thin veins, and ~1 on flat tissue and on the edge of a nucleus, where a local mean
    (`LocalContrast`) gives a CMB-like dip. Floored at `floor` (normalized intensity) so
    background (0) stays 0. The box counts only voxels inside the input (`box_extreme_1d`).
    Written here because it must run inside the network, on windows, tiles and
    GPUs alike (scipy.ndimage.grey_closing, the same operation, works on numpy arrays only).
    """

    def __init__(self, kernel: tuple[int, int, int] | list[int], floor: float = 0.05) -> None:
        super().__init__()
        self.kernel = odd_box(kernel, "dark-blob")
        self.floor = floor

    def _box(self, x: torch.Tensor, largest: bool) -> torch.Tensor:
        # a box maximum (minimum) is separable: one 1-D running extreme per axis
        for axis, k in enumerate(self.kernel):
            x = box_extreme_1d(x, 2 + axis, k, largest)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        closing = self._box(self._box(x, largest=True), largest=False)
        return x / closing.clamp_min(self.floor)


def box_extreme_1d(x: torch.Tensor, dim: int, k: int, largest: bool = True) -> torch.Tensor:
    """Max (or min) of `x` over a centred window of `k` (odd) voxels along `dim`, counting only voxels inside `x`.

    Doubling windows (1, 2, 4, ... voxels, each the extreme of two shifted halves: ~log2(k)
    elementwise passes), because max_pool3d on a CPU always computes argmax indices too and
    is 5-20x slower (a 9x9x5 closing of 96x96x64 voxels: 75 ms against 3 ms); same values.
    """
    if k == 1:
        return x
    extreme = torch.maximum if largest else torch.minimum
    shape = list(x.shape)
    shape[dim] = k // 2
    outside = x.new_full(shape, float("-inf") if largest else float("inf"))  # never chosen: only voxels inside count
    run, width = torch.cat([outside, x, outside], dim), 1  # run[i]: extreme over padded voxels i .. i + width - 1
    while 2 * width <= k:
        n = run.shape[dim] - width
        run, width = extreme(run.narrow(dim, 0, n), run.narrow(dim, width, n)), 2 * width
    n = x.shape[dim]  # k is odd, so width < k <= 2 * width: two overlapping windows of `width` cover k voxels
    return extreme(run.narrow(dim, 0, n), run.narrow(dim, k - width, n))


class UNet3D(nn.Module):
    """Batch-normalized 3D U-Net: (N, 1, I, J, K) -> (N, 1, I, J, K) CMB logits.

    `channels` gives the width per level; len(channels) - 1 is the number of 2x2x2
    poolings. Fully convolutional: any input whose sides divide by 2**(len(channels)-1)
    works. `receptive_field` (voxels per axis) says how far an output voxel looks; keep it
    near the 20x20x16 training window, or whole-scan tiles show a member context it never
    saw in training (conf/unet/default.yaml uses one pooling: 18 voxels of convolutions).
    `local_contrast` (a box side per axis, voxels) adds the input over its local mean as a
    channel (`LocalContrast`); `blob_contrast` likewise the input over its closing
    (`DarkBlobContrast`). `leaky_slope` > 0 replaces every ReLU by a LeakyReLU: with ReLUs the
    1x1x1 head sees only non-negative features, so a net whose head weights all turn negative
    (it marks what is *not* a CMB) can never score above sigmoid(head bias) ("capped",
    cmb/models/health.py), and no gradient reaches the features that are zero on CMBs.
    We write our own because MONAI's BasicUNet fixes four poolings (too deep for a
    16-slice window) and its UNet uses strided residual units rather than the paper's
    plain conv-BN blocks.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, channels: tuple[int, ...] | list[int] = (16, 32, 64),
                 local_contrast: tuple[int, int, int] | list[int] | None = None,
                 blob_contrast: tuple[int, int, int] | list[int] | None = None, leaky_slope: float = 0.0) -> None:
        super().__init__()
        self.local_contrast = LocalContrast(local_contrast) if local_contrast else None
        self.blob_contrast = DarkBlobContrast(blob_contrast) if blob_contrast else None
        channels = list(channels)
        if len(channels) < 2:
            raise ValueError("UNet3D needs at least two levels")
        self.channels = channels
        self.down_factor = 2 ** (len(channels) - 1)
        self.encoders = nn.ModuleList()
        prev = in_channels * (1 + (self.local_contrast is not None) + (self.blob_contrast is not None))
        for ch in channels:
            self.encoders.append(conv_block(prev, ch, leaky_slope))
            prev = ch
        self.pool = nn.MaxPool3d(2)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for ch in reversed(channels[:-1]):
            self.ups.append(nn.ConvTranspose3d(prev, ch, kernel_size=2, stride=2))
            self.decoders.append(conv_block(2 * ch, ch, leaky_slope))
            prev = ch
        self.head = nn.Conv3d(prev, out_channels, kernel_size=1)

    @property
    def receptive_field(self) -> tuple[int, int, int]:
        """Side of the input box (voxels along i, j, k) that one output voxel depends on.

        Each 3x3x3 convolution at level l (resolution 1/2**l) widens it by 2 * 2**l, each
        pooling by 2**l; the transposed convolutions (kernel = stride = 2) add nothing; the
        local-contrast box adds its side minus one, the closing (two boxes) twice that.
        """
        levels = len(self.channels)
        encoder = sum(4 * 2**level for level in range(levels))
        decoder = sum(4 * 2**level + 2**level for level in range(levels - 1))  # convs + the pooling below
        box = self.local_contrast.kernel if self.local_contrast is not None else (1, 1, 1)
        closing = self.blob_contrast.kernel if self.blob_contrast is not None else (1, 1, 1)
        return tuple(encoder + decoder + max(k - 1, 2 * (c - 1)) + 1 for k, c in zip(box, closing))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.down_factor for s in x.shape[2:]):
            raise ValueError(f"input sides {tuple(x.shape[2:])} must divide by {self.down_factor}")
        image = x
        if self.local_contrast is not None:
            x = self.local_contrast(x)  # in the input's precision: a ratio of intensities
        if self.blob_contrast is not None:
            x = torch.cat([x, self.blob_contrast(image)], dim=1)
        x = x.to(self.head.weight.dtype)  # a bf16 prediction copy (cmb.inference.unet_map.inference_net) takes fp32 scans
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.ups, self.decoders):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
