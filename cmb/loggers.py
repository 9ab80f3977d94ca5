"""Loggers built from the `logger` config group (CSV always, wandb offline by default)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from pytorch_lightning.loggers import Logger, WandbLogger


def build_loggers(logger_cfg: Any, save_dir: Path, run_name: str, group: str) -> list[Logger]:
    """One logger per entry of `logger_cfg` (a mapping of `_target_` nodes, or None), saving under `save_dir`.
    A wandb logger gets its own run named `run_name` in `group` (never the run in progress), so each model and
    each evaluation is one wandb run."""
    loggers: list[Logger] = []
    for node in (logger_cfg.values() if logger_cfg else []):
        extra: dict[str, Any] = {}
        if issubclass(get_class(str(node._target_)), WandbLogger):
            extra = {"name": run_name, "group": group, "job_type": run_name.split("_")[0]}
        logger = instantiate(node, save_dir=str(save_dir), **extra)
        if isinstance(logger, WandbLogger):  # Lightning passes anonymous=None, and wandb >= 0.19 warns on every run that it does nothing
            getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        loggers.append(logger)
    return loggers


def finish_wandb_run() -> None:
    """Close the wandb run in progress, if wandb is imported and one is open (never import wandb just to close nothing)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
