"""Config builders: a stage's config group (`unet`, `cnn`) as plain recipes the protocol's steps take.

Only this module and `cmb.protocol.run` read the Hydra config; training, mining and out-of-fold
detection take these dataclasses, paths and numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cmb.data.patches import TargetOptions
from cmb.models.lightning import CNNModule, UNetModule


@dataclass(frozen=True)
class Sampling:
    """How a training round draws its windows (cmb.models.lightning.PatchDataModule)."""

    mix: dict[str, float]  # share of windows per kind (positive, random, dark, vessel, mimic, transplant, synthetic)
    steps_per_epoch: int
    max_shift: int  # positives: CMB at the window centre +- this many voxels
    negative_shift: int | None
    transplant: dict[str, Any] | None  # {"sites": [...], "gamma": [lo, hi]} for "transplant" windows
    num_workers: int
    synthetic: dict[str, Any] | None = None  # cmb.data.synthetic_cmb.SyntheticCMBConfig's fields for "synthetic" windows
    zoom: tuple[float, float, float] | None = None  # (share, low, high): windows enlarged about their centre (PatchDataset)
    contrast: tuple[float, float, float, float] | None = None  # (share, low, high, anchor): log-contrast scaled (PatchDataset)


@dataclass(frozen=True)
class HealthCheck:
    """A first round whose median peak on its own training CMBs is below `min_median_peak` is trained again."""

    min_median_peak: float
    retries: int


@dataclass(frozen=True)
class RefineRound:
    """The U-Net's hard-negative round: `steps` more steps with windows at its own false positives."""

    steps: int
    threshold: float  # false-positive components of the member's map at this threshold
    max_scans: int | None  # a seeded subset of the training scans (None: all)
    lr: float  # the round's starting learning rate (cosine decay over its steps)
    sampling: Sampling
    replay: tuple[float, float] | None  # (below, share) of cmb.models.health.ReplaySchedule, None: off


@dataclass(frozen=True)
class MemberRecipe:
    """How to train one member of a stage: build the network and its LightningModule, and the rounds."""

    stage: str
    max_steps: int
    sampling: Sampling
    make_net: Callable[[], nn.Module]
    make_module: Callable[[nn.Module, int, float | None], pl.LightningModule]  # (net, steps, lr or None) -> module
    net_kwargs: dict[str, Any]  # saved with the weights (cmb.models.checkpoint)
    health: HealthCheck | None = None
    refine: RefineRound | None = None
    target: TargetOptions = TargetOptions()  # U-Nets: what they mark (unet.centroid_target, unet.bloom); CNNs: the default


def _sampling(mix: Any, stage_cfg: DictConfig, num_workers: int, anchor: float) -> Sampling:
    """`anchor`: the normalized histogram peak (preprocess.target_peak) about which `<stage>.contrast` scales."""
    transplant = OmegaConf.to_container(stage_cfg.transplant, resolve=True) if stage_cfg.get("transplant") else None
    synthetic = OmegaConf.to_container(stage_cfg.synthetic, resolve=True) if stage_cfg.get("synthetic") else None
    zoom = (float(stage_cfg.zoom.share), *(float(f) for f in stage_cfg.zoom.factors)) if stage_cfg.get("zoom") else None
    contrast = (float(stage_cfg.contrast.share), *(float(g) for g in stage_cfg.contrast.gamma), float(anchor)) \
        if stage_cfg.get("contrast") else None
    return Sampling({str(k): float(v) for k, v in dict(mix).items()}, int(stage_cfg.steps_per_epoch), int(stage_cfg.max_shift),
                    None if stage_cfg.get("negative_shift") is None else int(stage_cfg.negative_shift), transplant, num_workers, synthetic,
                    zoom, contrast)  # type: ignore[arg-type]


def member_recipe(cfg: DictConfig, stage: str) -> MemberRecipe:
    """The recipe of `stage` ('unet' or 'cnn') from its config group and `runtime`."""
    scfg = cfg[stage]
    channels_last = bool(cfg.runtime.get("channels_last", False))
    num_workers = int(cfg.runtime.get("num_workers", 0))
    anchor = float(cfg.preprocess.get("target_peak", 0.5))

    def make_module(net: nn.Module, steps: int, lr: float | None) -> pl.LightningModule:
        optimizer = instantiate(scfg.optimizer, **({"lr": float(lr)} if lr is not None else {}))
        schedule = instantiate(scfg.lr_schedule)
        if stage == "unet":
            return UNetModule(net, instantiate(scfg.loss), optimizer, steps, schedule, channels_last)
        return CNNModule(net, optimizer, steps, schedule, label_smoothing=float(scfg.get("label_smoothing", 0.0)),
                         channels_last=channels_last)

    net_kwargs = OmegaConf.to_container(scfg.net, resolve=True)
    net_kwargs.pop("_target_", None)
    health = refine = None
    if stage == "unet" and scfg.get("health"):
        health = HealthCheck(float(scfg.health.min_median_peak), int(scfg.health.retries))
    if stage == "unet" and scfg.get("refine") and scfg.refine.get("steps"):
        r = scfg.refine
        replay = (float(r.replay.below), float(r.replay.share)) if r.get("replay") else None
        refine = RefineRound(int(r.steps), float(r.threshold), None if r.get("max_scans") is None else int(r.max_scans),
                             float(r.lr), _sampling(r.sampling, scfg, num_workers, anchor), replay)
    return MemberRecipe(stage, int(scfg.max_steps), _sampling(scfg.sampling, scfg, num_workers, anchor), lambda: instantiate(scfg.net),
                        make_module, net_kwargs, health, refine, unet_target(scfg) if stage == "unet" else TargetOptions())


def unet_target(unet_cfg: DictConfig) -> TargetOptions:
    """`unet.centroid_target` and `unet.bloom` ({ratio, radius_mm} or null) as TargetOptions."""
    bloom = unet_cfg.get("bloom")
    return TargetOptions(bool(unet_cfg.get("centroid_target", False)),
                         None if not bloom else float(bloom.ratio), 4.0 if not bloom else float(bloom.radius_mm))

