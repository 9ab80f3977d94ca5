"""Stage-1 whole-scan inference in two modes behind one function.

- `faithful`: the paper's procedure, 20x20x16 windows at stride 3 on every axis over
  the brain's bounding box, overlapping predictions averaged (MONAI sliding window).
- `fast` (default): the same network run fully convolutionally on large overlapping
  tiles of the brain's bounding box, Gaussian-blended, batched; channels-last on CPU.

Both run the same prediction copy of the network (`inference_net`: batch norm folded
into the convolutions; bf16 weights where the processor supports bf16).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cmb import WINDOW

log = logging.getLogger(__name__)

# overlap giving a step of exactly 3 voxels for a 20x20x16 window: int(roi * (1 - overlap)) = 3
STRIDE3_OVERLAP = (0.825, 0.825, 0.78125)


@dataclass
class UNetMapConfig:
    mode: str = "fast"  # fast | faithful
    tile: tuple[int, int, int] = (256, 256, 152)  # fast mode: largest tile (voxels); see balanced_tiles
    tile_overlap: float = 0.1
    sw_batch_size: int = 1  # tiles per forward pass (fast); faithful uses 64 windows per pass
    margin: int = 8  # voxels added around the brain's bounding box
    bf16: str = "auto"  # auto | on | off
    progress: bool = True

    @classmethod
    def from_cfg(cls, node) -> "UNetMapConfig":  # noqa: ANN001 (an OmegaConf node: inference.unet)
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
    mask = np.asarray(mask, dtype=bool)
    box = []
    for axis in range(3):  # one projection per axis: no list of every brain voxel (~10 M on a 512x512x150 scan)
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(along) == 0:
            return tuple(slice(0, s) for s in mask.shape)  # type: ignore[return-value]
        box.append(slice(max(int(along[0]) - margin, 0), min(int(along[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


class _Sigmoid(nn.Module):
    def __init__(self, net: nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.net, self.channels_last = net, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return torch.sigmoid(self.net(x).float())


def inference_net(net: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> nn.Module:
    """An eval-mode copy of `net` for prediction (the caller's net is left as it is).

    Each Conv3d followed by a BatchNorm3d in an nn.Sequential becomes one convolution
    (torch's fuse_conv_bn_eval: the same function, one pass fewer over every feature map);
    weights are cast to `dtype` once instead of at every call as autocast would. Networks
    cast their input to their weights' dtype after any parameter-free input layer (UNet3D).
    A copy made with the same settings is returned as it is, so callers that predict many
    scans or regions with one net can prepare it once.
    """
    key = (dtype, channels_last)
    if getattr(net, "inference_copy", None) == key:
        return net
    net = copy.deepcopy(net).eval()
    for block in net.modules():
        if isinstance(block, nn.Sequential):
            for i in range(len(block) - 1):
                if isinstance(block[i], nn.Conv3d) and isinstance(block[i + 1], nn.BatchNorm3d):
                    block[i], block[i + 1] = fuse_conv_bn_eval(block[i], block[i + 1]), nn.Identity()
    net = net.to(dtype)
    net.inference_copy = key
    return net.to(memory_format=torch.channels_last_3d) if channels_last else net


def inference_settings(cfg: UNetMapConfig, device: torch.device) -> tuple[torch.dtype, bool]:
    """(weights dtype, channels-last) of the prediction copy that `predict_probability` runs for `cfg`."""
    dtype = torch.bfloat16 if _use_bf16(cfg.bf16, device) else torch.float32
    return dtype, cfg.mode == "fast" and device.type == "cpu"


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
def predict_probability(net: nn.Module, image: np.ndarray, mask: np.ndarray, cfg: UNetMapConfig | None = None,
                        device: str | torch.device = "cpu") -> np.ndarray:
    """CMB probability map of one U-Net over a scan.

    image: float32 (I, J, K) normalized scan; mask: bool (I, J, K) brain mask.
    Returns float32 (I, J, K) in [0, 1], 0 outside the brain mask.
    """
    cfg = cfg or UNetMapConfig()
    device = torch.device(device)
    box = brain_bbox(mask, cfg.margin)
    crop = torch.from_numpy(np.array(image[box], dtype=np.float32))[None, None].to(device)
    if cfg.mode == "faithful":
        roi, overlap, mode, batch = WINDOW, STRIDE3_OVERLAP, "constant", 64
    elif cfg.mode == "fast":
        multiple = getattr(net, "down_factor", 4)
        roi, overlap = balanced_tiles(tuple(crop.shape[2:]), tuple(cfg.tile), cfg.tile_overlap, multiple)  # type: ignore[arg-type]
        mode, batch = "gaussian", cfg.sw_batch_size
    else:
        raise ValueError(f"stage-1 inference mode must be 'fast' or 'faithful', got {cfg.mode!r}")
    dtype, channels_last = inference_settings(cfg, device)
    model = _Sigmoid(inference_net(net, dtype, channels_last).to(device), channels_last)
    prob = sliding_window_inference(crop, roi, batch, model, overlap=overlap, mode=mode, progress=cfg.progress,
                                    padding_mode="constant", cval=0.0)
    out = np.zeros(image.shape, dtype=np.float32)
    out[box] = prob[0, 0].float().cpu().numpy()
    out[~np.asarray(mask, dtype=bool)] = 0.0
    return out


def ensemble_probability(nets: list[nn.Module], image: np.ndarray, mask: np.ndarray, cfg: UNetMapConfig,
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
