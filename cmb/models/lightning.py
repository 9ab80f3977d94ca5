"""Thin LightningModules around the plain networks, and the patch DataModule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from cmb.data.patches import PatchDataset, TrainingVolume


class _PatchModule(pl.LightningModule):
    """Shared optimizer set-up: `optimizer` is a partial (params -> Optimizer); cosine decay to `max_steps`."""

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], max_steps: int) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.max_steps = max_steps
        self.save_hyperparameters(ignore=["net", "optimizer", "loss"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(self.net.parameters())
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.max_steps), eta_min=opt.defaults["lr"] * 0.05)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Stage1Module(_PatchModule):
    """U-Net on (N, 1, 20, 20, 16) windows against voxel targets; `loss(logits, target)`."""

    def __init__(self, net: nn.Module, loss: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], max_steps: int) -> None:
        super().__init__(net, optimizer, max_steps)
        self.loss = loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["image"])
        loss = self.loss(logits, batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss


class Stage2Module(_PatchModule):
    """Discriminator on (N, 1, 20, 20, 16) patches; labels (N,) 1 = CMB, 0 = mimic/negative."""

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], max_steps: int, label_smoothing: float = 0.0) -> None:
        super().__init__(net, optimizer, max_steps)
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["image"])
        labels = batch["label"].long()
        loss = self.loss(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        self.log("train/acc", acc, batch_size=len(logits))
        return loss


class PatchDataModule(pl.LightningDataModule):
    """Fresh random patches every epoch (`steps_per_epoch` batches), seeded by (seed, epoch).

    Use with `reload_dataloaders_every_n_epochs=1` so each epoch (and a resumed run) draws new samples.
    `transplant`: {"sites": [...], "gamma": [lo, hi]} for the mix's "transplant" windows (PatchDataset).
    `positive_weights`: called at the start of every epoch; returns the positives' draw weights
    for that epoch (PatchDataset) or None (uniform).
    """

    def __init__(self, volumes: list[TrainingVolume], batch_size: int, steps_per_epoch: int, mix: dict[str, float], seed: int = 0,
                 max_shift: int = 1, negative_shift: int | None = None, num_workers: int = 0,
                 transplant: dict[str, Any] | None = None, positive_weights: Callable[[], np.ndarray | None] | None = None) -> None:
        super().__init__()
        self.volumes, self.batch_size, self.steps_per_epoch = volumes, batch_size, steps_per_epoch
        self.mix, self.seed, self.max_shift, self.negative_shift, self.num_workers = dict(mix), seed, max_shift, negative_shift, num_workers
        self.transplant = {f"transplant_{k}": tuple(v) for k, v in (transplant or {}).items()}  # sites, gamma (PatchDataset)
        self.positive_weights = positive_weights

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        dataset = PatchDataset(self.volumes, self.steps_per_epoch * self.batch_size, self.mix, seed=self.seed,
                               max_shift=self.max_shift, negative_shift=self.negative_shift, **self.transplant,
                               positive_weights=self.positive_weights() if self.positive_weights else None)
        dataset.set_epoch(epoch)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, drop_last=True,
                          persistent_workers=False)
