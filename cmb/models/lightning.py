"""Thin LightningModules around the plain networks, and the patch DataModule."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torchmetrics.classification import MulticlassAccuracy

from cmb import WINDOW
from cmb.data.patches import PatchDataset, TrainingVolume
from cmb.data.synthetic_cmb import SyntheticCMBConfig


LRSchedule = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


def cosine_schedule(optimizer: torch.optim.Optimizer, max_steps: int, final_lr_fraction: float = 0.05) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay per step from the optimizer's learning rate to `final_lr_fraction` of it at `max_steps`
    (the `lr_schedule` of conf/unet and conf/cnn)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_steps), eta_min=optimizer.defaults["lr"] * final_lr_fraction)


class _PatchModule(pl.LightningModule):
    """Shared optimizer set-up: `optimizer` is a partial (params -> Optimizer), `lr_schedule` a partial
    (optimizer, max_steps) -> scheduler stepped every training step.

    `channels_last`: train in the channels-last 3D memory layout (weights and batches), which
    oneDNN's CPU convolutions run ~1.6x faster for the U-Net (benchmarks/RESULTS.md); the
    values are the same up to floating-point summation order.
    """

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], max_steps: int, lr_schedule: LRSchedule | None = None,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.net = net.to(memory_format=self.memory_format)
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule or cosine_schedule
        self.max_steps = max_steps
        self.save_hyperparameters(ignore=["net", "optimizer", "loss", "lr_schedule"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def batch_images(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's (N, C, D, H, W) windows in the module's memory layout."""
        return batch["image"].contiguous(memory_format=self.memory_format)

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(self.net.parameters())
        sched = self.lr_schedule(opt, self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class UNetModule(_PatchModule):
    """U-Net on (N, 1, 20, 20, 16) windows against voxel targets; `loss(logits, target)`."""

    def __init__(self, net: nn.Module, loss: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], max_steps: int,
                 lr_schedule: LRSchedule | None = None, channels_last: bool = False) -> None:
        super().__init__(net, optimizer, max_steps, lr_schedule, channels_last)
        self.loss = loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.net(self.batch_images(batch))
        loss = self.loss(logits, batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss


class CNNModule(_PatchModule):
    """Discriminator on (N, 1, 20, 20, 16) patches; labels (N,) 1 = CMB, 0 = mimic/negative."""

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], max_steps: int, lr_schedule: LRSchedule | None = None,
                 label_smoothing: float = 0.0, channels_last: bool = False) -> None:
        super().__init__(net, optimizer, max_steps, lr_schedule, channels_last)
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes=2, average="micro")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.net(self.batch_images(batch))
        labels = batch["label"].long()
        loss = self.loss(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        self.log("train/acc", self.train_acc, batch_size=len(logits))
        return loss


class PatchDataModule(pl.LightningDataModule):
    """Fresh random patches every epoch (`steps_per_epoch` batches), seeded by (seed, epoch).

    Use with `reload_dataloaders_every_n_epochs=1` so each epoch (and a resumed run) draws new samples.
    `transplant`: {"sites": [...], "gamma": [lo, hi]} for the mix's "transplant" windows (PatchDataset).
    `synthetic`: the settings of the mix's "synthetic" windows (cmb.data.synthetic_cmb.SyntheticCMBConfig; None: defaults).
    `window`: the window each sample is cut to (the network's, `cmb.input_window`).
    `positive_weights`: called once at the start of every epoch; returns the positives' draw weights
    for that epoch (PatchDataset) or None (uniform). If it has `state_dict`/`load_state_dict`
    (e.g. `cmb.models.health.ReplaySchedule`), that state travels with the checkpoint.

    Resume is exact: samples are a pure function of (seed, epoch, index), a loader built for a run
    resumed mid-epoch starts at the first batch not yet trained on (from the restored global step),
    and the epoch's positive weights are stored in the checkpoint (`state_dict`), not recomputed
    from the half-trained net.
    """

    def __init__(self, volumes: list[TrainingVolume], batch_size: int, steps_per_epoch: int, mix: dict[str, float], seed: int = 0,
                 max_shift: int = 1, negative_shift: int | None = None, num_workers: int = 0,
                 transplant: dict[str, Any] | None = None, positive_weights: Callable[[], np.ndarray | None] | None = None,
                 synthetic: dict[str, Any] | None = None, window: tuple[int, int, int] = WINDOW,
                 zoom: tuple[float, float, float] | None = None, contrast: tuple[float, float, float, float] | None = None) -> None:
        super().__init__()
        self.zoom = zoom  # (share, low, high) of PatchDataset, None: off
        self.contrast = contrast  # (share, low, high, anchor) of PatchDataset, None: off
        self.volumes, self.batch_size, self.steps_per_epoch, self.window = volumes, batch_size, steps_per_epoch, tuple(window)
        self.mix, self.seed, self.max_shift, self.negative_shift, self.num_workers = dict(mix), seed, max_shift, negative_shift, num_workers
        self.transplant = {f"transplant_{k}": tuple(v) for k, v in (transplant or {}).items()}  # sites, gamma (PatchDataset)
        self.synthetic = SyntheticCMBConfig.from_dict(synthetic) if float(self.mix.get("synthetic", 0.0)) > 0 else None
        self.positive_weights = positive_weights
        self._epoch_weights: tuple[int, np.ndarray | None] | None = None  # (epoch, its positive weights)

    def _weights_for(self, epoch: int) -> np.ndarray | None:
        """The positives' draw weights of `epoch`, computed once per epoch (a loader may be built twice for one)."""
        if self.positive_weights is None:
            return None
        if self._epoch_weights is None or self._epoch_weights[0] != epoch:
            self._epoch_weights = (epoch, self.positive_weights())
        return self._epoch_weights[1]

    def _first_batch(self, epoch: int) -> int:
        """Index of the first batch of `epoch` not yet trained on: > 0 only in a run resumed mid-epoch
        (one device; several devices restart the epoch, as Lightning does)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size > 1:
            return 0
        done = int(trainer.global_step) - epoch * self.steps_per_epoch
        return done if 0 < done < self.steps_per_epoch else 0

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        n_samples = self.steps_per_epoch * self.batch_size
        dataset = PatchDataset(self.volumes, n_samples, self.mix, seed=self.seed,
                               max_shift=self.max_shift, negative_shift=self.negative_shift, **self.transplant,
                               positive_weights=self._weights_for(epoch), synthetic=self.synthetic, window=self.window,
                               zoom=self.zoom, contrast=self.contrast)
        dataset.set_epoch(epoch)
        first = self._first_batch(epoch)
        sampler = ResumeSampler(n_samples, first * self.batch_size) if first else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler, num_workers=self.num_workers,
                          drop_last=True, persistent_workers=False)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self._epoch_weights is not None:
            epoch, weights = self._epoch_weights
            state["epoch_weights"] = {"epoch": int(epoch), "weights": None if weights is None else [float(w) for w in weights]}
        if hasattr(self.positive_weights, "state_dict"):
            state["positive_weights"] = self.positive_weights.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("epoch_weights")
        if saved is not None:
            weights = saved["weights"]
            self._epoch_weights = (int(saved["epoch"]), None if weights is None else np.asarray(weights, dtype=float))
        if "positive_weights" in state_dict and hasattr(self.positive_weights, "load_state_dict"):
            self.positive_weights.load_state_dict(state_dict["positive_weights"])


class ResumeSampler(Sampler[int]):
    """Indices `first`..`n_samples`-1 in order, while claiming the full length `n_samples`.

    Lightning restores a mid-epoch run's batch counter and ends the epoch after `len(loader)`
    batches in all, so the loader of the resumed epoch keeps the epoch's length and yields only
    the batches not yet trained on (written here: torch has no sampler that starts at an offset).
    """

    def __init__(self, n_samples: int, first: int) -> None:
        self.n_samples, self.first = int(n_samples), int(first)

    def __len__(self) -> int:
        return self.n_samples

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.n_samples))


class StepSeed(pl.Callback):
    """Seeds torch (every device), numpy and `random` before each training step from (seed, global step).

    Whatever a step draws (dropout masks) is then a function of the seed and the step alone, so a
    member killed at any step and resumed from its checkpoint trains exactly as an uninterrupted
    one, whatever else consumed random numbers in between (data-loader start-up, a rebuilt loader).
    The seed is stored in the checkpoint; resuming under another seed is refused.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step_seed = int(np.random.SeedSequence([self.seed, int(trainer.global_step)]).generate_state(1)[0])
        torch.manual_seed(step_seed)
        np.random.seed(step_seed)
        random.seed(step_seed)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if int(state_dict.get("seed", self.seed)) != self.seed:
            raise ValueError(f"this checkpoint was trained with seed {state_dict['seed']}, not {self.seed}; it cannot be resumed "
                             "under another seed")
