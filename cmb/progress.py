"""A quiet console: one line per phase with counts and the time left, the details in the run's log file.

`quiet_console` lets only `cmb`'s own records (and errors from anything) reach the console; the
libraries' info lines (Lightning's tips and device lines), captured Python warnings and wandb's
banners still go to the run's log file (`<run>/logs/`). `StepProgress` prints a member's
progress every few steps with an estimate of the training time left for the whole protocol
(`TrainingClock`). `verbose=true` on the command line brings everything back.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger("cmb")


class _OwnRecordsOnly(logging.Filter):
    """Console filter: `cmb` records, and ERROR or worse from anything."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "cmb" or record.name.startswith("cmb.") or record.levelno >= logging.ERROR


def quiet_console(verbose: bool) -> None:
    """Route everything but `cmb`'s own lines away from the console (to the run's log file), unless `verbose`."""
    if verbose:
        return
    os.environ.setdefault("WANDB_SILENT", "true")  # wandb's banners; an explicit setting wins
    logging.captureWarnings(True)  # dependency warnings become log records (py.warnings): file, not console
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            if not any(isinstance(f, _OwnRecordsOnly) for f in handler.filters):
                handler.addFilter(_OwnRecordsOnly())


class TrainingClock:
    """Training steps planned and done in this command per kind of member ("unet", "cnn": their steps cost
    differently), and the seconds they took: the time left at each kind's pace so far."""

    def __init__(self) -> None:
        self.planned: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def plan(self, steps: int, kind: str = "unet") -> None:
        self.planned[kind] = self.planned.get(kind, 0) + int(steps)

    def record(self, steps: int, seconds: float, kind: str = "unet") -> None:
        self.done[kind] = self.done.get(kind, 0) + int(steps)
        self.seconds[kind] = self.seconds.get(kind, 0.0) + float(seconds)

    def seconds_left(self) -> float | None:
        """Estimated seconds of training left (None before any step); a kind not timed yet takes the mean pace."""
        total_done = sum(self.done.values())
        if total_done <= 0:
            return None
        mean_pace = sum(self.seconds.values()) / total_done
        left = 0.0
        for kind, planned in self.planned.items():
            done = self.done.get(kind, 0)
            pace = self.seconds[kind] / done if done > 0 else mean_pace
            left += max(0, planned - done) * pace
        return left


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA …"
    minutes = seconds / 60
    return f"ETA {seconds:.0f} s" if seconds < 90 else f"ETA {minutes:.0f} min" if minutes < 90 else f"ETA {minutes / 60:.1f} h"


class StepProgress(pl.Callback):
    """Every `every` steps and at the end of training, one line: `<label> · step s/n · ETA ...` (logger `cmb`);
    the member's steps are timed as `kind` on the clock."""

    def __init__(self, label: str, clock: TrainingClock, every: int = 50, kind: str = "unet") -> None:
        self.label, self.clock, self.every, self.kind = label, clock, max(1, int(every)), kind
        self._last_step, self._last_time = 0, 0.0  # set by on_train_start (the resumed step, if resumed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step, self._last_time = int(trainer.global_step), time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, total = int(trainer.global_step), int(trainer.max_steps)
        now = time.perf_counter()
        self.clock.record(step - self._last_step, now - self._last_time, self.kind)
        self._last_step, self._last_time = step, now
        if step % self.every == 0 or step >= total:
            log.info("%s · step %d/%d · %s (training left in this command)", self.label, step, total,
                     format_eta(self.clock.seconds_left()))
