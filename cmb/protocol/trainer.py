"""The Lightning Trainer of one training round, built from the `trainer`, `callbacks` and `logger` groups.

Every key of `conf/trainer` is a `pytorch_lightning.Trainer` argument, so any Trainer flag works from
the command line (`trainer.fast_dev_run=true`, `trainer.gradient_clip_val=1`,
`trainer.accumulate_grad_batches=2`, `trainer.precision=bf16-mixed`). The protocol passes what is
its own: `max_steps`, the checkpoint folder, the loggers' folder and names, and the step seeding.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from cmb.layout import checkpoint_dir
from cmb.loggers import build_loggers
from cmb.models.lightning import StepSeed
from cmb.progress import StepProgress, TrainingClock

# the protocol's own Trainer arguments: one fresh draw of windows per epoch, no validation loop
PROTOCOL_TRAINER_ARGS = {"reload_dataloaders_every_n_epochs": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0,
                         "enable_model_summary": False}


@dataclass
class TrainerFactory:
    """Builds the Trainer of one training round from the config groups (`make(out, max_steps, ...)`)."""

    trainer_cfg: DictConfig
    callbacks_cfg: DictConfig | None
    logger_cfg: DictConfig | None
    group: str  # wandb group: the run folder's name
    verbose: bool
    progress_every: int
    clock: TrainingClock

    def make(self, out: Path, max_steps: int, run_name: str, seed: int, label: str, kind: str) -> pl.Trainer:
        """A Trainer that logs and checkpoints under `out`; each step's random draws come from (seed, step)
        (StepSeed); quiet console: a progress line (`label`, ETA from the clock) every few steps."""
        callbacks: list[pl.Callback] = [StepSeed(seed)]
        for node in (self.callbacks_cfg.values() if self.callbacks_cfg else []):
            extra: dict[str, Any] = {}
            if issubclass(get_class(str(node._target_)), pl.callbacks.ModelCheckpoint):
                extra = {"dirpath": checkpoint_dir(out)}  # a resumed member restarts from its last.ckpt
            callbacks.append(instantiate(node, **extra))
        if not self.verbose:
            callbacks.append(StepProgress(label, self.clock, self.progress_every, kind=kind))
        bar = self.trainer_cfg.get("enable_progress_bar")
        # PatchDataModule resumes mid-epoch at the right batch (from the global step); Lightning cannot see that
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        return instantiate(self.trainer_cfg, max_steps=int(max_steps), callbacks=callbacks,
                           logger=build_loggers(self.logger_cfg, out, run_name, self.group),
                           enable_progress_bar=self.verbose if bar is None else bool(bar), **PROTOCOL_TRAINER_ARGS)


def trainer_factory(cfg: DictConfig, group: str, clock: TrainingClock) -> TrainerFactory:
    """The run's TrainerFactory; also sets torch's CPU threads (`runtime.threads`)."""
    if cfg.runtime.get("threads"):
        torch.set_num_threads(int(cfg.runtime.threads))
    return TrainerFactory(cfg.trainer, cfg.get("callbacks"), cfg.get("logger"), group, bool(cfg.get("verbose", False)),
                          int(cfg.runtime.get("progress_every_n_steps", 50)), clock)


def device_for(trainer_cfg: DictConfig) -> str:
    """Where the protocol's own whole-scan inference runs (mining, out-of-fold detection): the Trainer's accelerator."""
    return "cuda" if str(trainer_cfg.accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
