"""Stage-1 whole-scan inference in two modes behind one function.

- `faithful`: the paper's procedure, 20x20x16 windows at stride 3 on every axis over
  the brain's bounding box, overlapping predictions averaged (MONAI sliding window).
- `fast` (default): the same network run fully convolutionally on large overlapping
  tiles of the brain's bounding box, Gaussian-blended, batched; bf16 autocast and
  channels-last where the processor supports them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from cmb import WINDOW

log = logging.getLogger(__name__)

# overlap giving a step of exactly 3 voxels for a 20x20x16 window: int(roi * (1 - overlap)) = 3
STRIDE3_OVERLAP = (0.825, 0.825, 0.78125)


@dataclass
class Stage1InferenceConfig:
    mode: str = "fast"  # fast | faithful
    tile: tuple[int, int, int] = (256, 256, 152)  # fast mode: largest tile (voxels); see balanced_tiles
    tile_overlap: float = 0.1
    sw_batch_size: int = 1  # tiles per forward pass (fast); faithful uses 64 windows per pass
    margin: int = 8  # voxels added around the brain's bounding box
    bf16: str = "auto"  # auto | on | off
    progress: bool = True

    @classmethod
    def from_cfg(cls, node) -> "Stage1InferenceConfig":  # noqa: ANN001 (an OmegaConf node: inference.stage1)
        from omegaconf import OmegaConf

        return cls(**OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _use_bf16(setting: str, device: torch.device) -> bool:
    if setting == "off":
        return False
    if setting == "on":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_supports_bf16()


def brain_bbox(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """Bounding box of the mask (+ margin voxels), clipped to the volume."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return tuple(slice(0, s) for s in mask.shape)  # type: ignore[return-value]
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


class _Sigmoid(nn.Module):
    def __init__(self, net: nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.net, self.channels_last = net, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return torch.sigmoid(self.net(x).float())


def balanced_tiles(size: tuple[int, ...], max_tile: tuple[int, int, int], overlap: float,
                   multiple: int) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Tile side and overlap fraction per axis so that the fewest tiles cover `size` evenly.

    Fixed-size tiles waste up to a whole tile of compute when a box is a little larger than
    a multiple of the tile (e.g. 3 tiles of 256 for a 470-voxel side); here the side is split
    into n equal parts plus the overlap instead (2 tiles of 264). Sides are multiples of
    `multiple` (the U-Net's pooling factor); units are voxels.
    """
    sides, fractions = [], []
    for s, t in zip(size, max_tile):
        margin = int(round(t * overlap))
        if s <= t:
            sides.append(int(-(-s // multiple) * multiple))
            fractions.append(0.0)
            continue
        n = -(-(s - margin) // (t - margin))
        side = int(-(-(-(-s // n) + margin) // multiple) * multiple)
        sides.append(side)
        fractions.append(margin / side)
    return tuple(sides), tuple(fractions)  # type: ignore[return-value]


@torch.no_grad()
def predict_probability(net: nn.Module, image: np.ndarray, mask: np.ndarray, cfg: Stage1InferenceConfig | None = None,
                        device: str | torch.device = "cpu") -> np.ndarray:
    """CMB probability map of one U-Net over a scan.

    image: float32 (I, J, K) normalized scan; mask: bool (I, J, K) brain mask.
    Returns float32 (I, J, K) in [0, 1], 0 outside the brain mask.
    """
    cfg = cfg or Stage1InferenceConfig()
    device = torch.device(device)
    net = net.to(device).eval()
    box = brain_bbox(mask, cfg.margin)
    crop = torch.from_numpy(np.array(image[box], dtype=np.float32))[None, None].to(device)
    bf16 = _use_bf16(cfg.bf16, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if cfg.mode == "faithful":
        model, roi, overlap, mode, batch = _Sigmoid(net, False), WINDOW, STRIDE3_OVERLAP, "constant", 64
    elif cfg.mode == "fast":
        multiple = getattr(net, "down_factor", 4)
        roi, overlap = balanced_tiles(tuple(crop.shape[2:]), tuple(cfg.tile), cfg.tile_overlap, multiple)  # type: ignore[arg-type]
        model, mode, batch = _Sigmoid(net, device.type == "cpu"), "gaussian", cfg.sw_batch_size
        if device.type == "cpu":
            net.to(memory_format=torch.channels_last_3d)
    else:
        raise ValueError(f"stage-1 inference mode must be 'fast' or 'faithful', got {cfg.mode!r}")
    with autocast:
        prob = sliding_window_inference(crop, roi, batch, model, overlap=overlap, mode=mode, progress=cfg.progress,
                                        padding_mode="constant", cval=0.0)
    out = np.zeros(image.shape, dtype=np.float32)
    out[box] = prob[0, 0].float().cpu().numpy()
    out[~np.asarray(mask, dtype=bool)] = 0.0
    return out


def ensemble_probability(nets: list[nn.Module], image: np.ndarray, mask: np.ndarray, cfg: Stage1InferenceConfig,
                         normalize: str = "mean", device: str | torch.device = "cpu") -> np.ndarray:
    """The stage-1 ensemble's map: each member's map (predict_probability), combined (combine_maps)."""
    return combine_maps([predict_probability(n, image, mask, cfg, device) for n in nets], normalize)


def combine_maps(maps: list[np.ndarray], normalize: str = "mean") -> np.ndarray:
    """Ensemble of member maps, each normalized then summed.

    `mean`: members are sigmoid probabilities already in [0, 1]; the sum is divided by
    the member count so thresholds (0.2, 0.15) mean the same for any ensemble size.
    `max`: each member is divided by its own maximum over the scan first (the paper's
    wording, "normalized and added"), then the sum by the member count.
    """
    if not maps:
        raise ValueError("no maps to combine")
    if normalize == "max":
        maps = [m / max(float(m.max()), 1e-6) for m in maps]
    elif normalize != "mean":
        raise ValueError(f"normalize must be 'mean' or 'max', got {normalize!r}")
    return (np.sum(maps, axis=0) / len(maps)).astype(np.float32)
