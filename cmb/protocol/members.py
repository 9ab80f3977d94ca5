"""Training one member: the first round, the health check's retries, and the U-Net's hard-negative round.

A member is resumable: an unfinished round restarts from its last Lightning checkpoint, a finished
member (done.json) is never trained again, and each round's random draws are a function of its seed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from cmb import input_window
from cmb.data.io import atomic_write_text
from cmb.data.patches import TrainingVolume
from cmb.inference.candidates import read_candidates, write_candidates
from cmb.inference.unet_map import UNetMapConfig, predict_probability
from cmb.layout import MemberFiles, last_checkpoint
from cmb.loggers import finish_wandb_run
from cmb.models.checkpoint import save_model
from cmb.models.health import ReplaySchedule, is_capped, training_cmb_peaks
from cmb.models.lightning import PatchDataModule
from cmb.progress import TrainingClock
from cmb.protocol.mining import false_positives
from cmb.protocol.recipes import MemberRecipe, Sampling
from cmb.protocol.scans import ScanStore
from cmb.protocol.settings import member_seed, seeded_subset
from cmb.protocol.trainer import TrainerFactory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberJob:
    """One member to train: which, on what, and where."""

    stage: str
    fold: int | str
    batch_size: int
    train_scans: list[str]
    heldout_scans: list[str]
    run_seed: int
    files: MemberFiles
    stamp: dict[str, Any]  # the settings stamp (cmb.protocol.settings) written into started.json and done.json
    label: str  # progress lines: 'fold 3/8 · unet_bs20'
    mimics_dir: Path | None = None  # CNNs: the fold's mined mimics
    hits_dir: Path | None = None  # CNNs drawing "hit" windows: the fold's mined stage-1 hits


@dataclass
class TrainingContext:
    """What every member of a run shares."""

    store: ScanStore
    trainers: TrainerFactory
    unet_map: UNetMapConfig  # whole-scan inference of the hard-negative round
    device: str
    match_radius_mm: float  # a U-Net detection within this of a CMB is not a false positive
    clock: TrainingClock
    record_config: Callable[..., None]  # (folder, **metadata): config.yaml and metadata.json of a member
    candidate_point: str = "centroid"  # where a stage-1 component is placed (inference.candidate_point)


def planned_steps(recipe: MemberRecipe) -> int:
    """Training steps of one member (first round and hard-negative round): the ETA's unit."""
    return recipe.max_steps + (recipe.refine.steps if recipe.refine else 0)


def train_member(recipe: MemberRecipe, job: MemberJob, ctx: TrainingContext) -> dict[str, Any]:
    """Train the member of `job` into `job.files` (model.pt, done.json); returns done.json's record.

    The first round's member is checked (recipe.health): a capped one is moved to rejected_attempt_<n>/
    and trained again with the next attempt's seed. A U-Net with a hard-negative round saves its first
    round as model_before_refine.pt.
    """
    files = job.files
    atomic_write_text(json.dumps(job.stamp), files.started)
    t0 = time.perf_counter()
    volumes = ctx.store.training_volumes(job.train_scans, job.mimics_dir, job.hits_dir, recipe.target)
    rejected = files.rejected_attempts()  # a resumed member goes on with the attempt it was at
    while True:
        seed = member_seed(job.run_seed, job.stage, job.fold, job.batch_size, attempt=len(rejected))
        net, trainer = _first_round(recipe, job, ctx, volumes, seed)
        done: dict[str, Any] = {"steps": int(trainer.global_step), "final_loss": last_metric(files.metrics, "train/loss")}
        health = recipe.health
        if health is None:
            break
        peaks = training_cmb_peaks(net, volumes)
        median = float(np.median(peaks)) if len(peaks) else None
        done["training_cmb_peak_median"] = round(median, 4) if median is not None else None
        if not is_capped(peaks, health.min_median_peak):
            break
        if len(rejected) >= health.retries:
            log.warning("%s: still capped after %d retries (median peak %.3f on its training CMBs, below %.2f); keeping it",
                        files.root, len(rejected), median, health.min_median_peak)
            done["capped"] = True
            break
        rejected.append(reject_attempt(files, len(rejected)))
        ctx.clock.plan(recipe.max_steps, job.stage)  # the retry's first round
        log.warning("%s: capped member (median peak %.3f on its own training CMBs, below %.2f); kept in %s, training again "
                    "(attempt %d)", files.root, median, health.min_median_peak, rejected[-1].name, len(rejected))
    if rejected:
        done["rejected_attempts"] = [r.name for r in rejected]
    save = dict(stage=job.stage, fold=str(job.fold), batch_size=int(job.batch_size), train_scans=job.train_scans,
                training_voxel_mm=voxel_size_range(volumes))
    if recipe.refine is not None:
        save_model(net, recipe.net_kwargs, files.model_before_refine, **save)
        refine_seed = member_seed(job.run_seed, job.stage, job.fold, job.batch_size, attempt=len(rejected), round_=1)
        done["refine"] = _refine_round(recipe, job, ctx, net, refine_seed)
    save_model(net, recipe.net_kwargs, files.model, **save)
    seconds = time.perf_counter() - t0
    ctx.store.timing.add("train", seconds, "n_members_trained")
    done = {**job.stamp, **done, "train_seconds": round(seconds, 2)}
    atomic_write_text(json.dumps(done, indent=1), files.done)
    return done


def voxel_size_range(volumes: list[TrainingVolume]) -> dict[str, list[float]]:
    """The smallest and largest voxel size (mm along i, j, k, on the working grid) of the training scans: saved with each
    member, so infer.py can say when a scan's voxels are far from what the member saw."""
    sizes = np.array([v.spacing_mm for v in volumes], dtype=float).reshape(-1, 3)
    return {"min": [round(float(x), 4) for x in sizes.min(axis=0)], "max": [round(float(x), 4) for x in sizes.max(axis=0)]}


def _first_round(recipe: MemberRecipe, job: MemberJob, ctx: TrainingContext, volumes: list[TrainingVolume],
                 seed: int) -> tuple[torch.nn.Module, pl.Trainer]:
    """A fresh member (seeded by `seed`) trained `recipe.max_steps` on `volumes`; resumes from its last checkpoint."""
    pl.seed_everything(seed, workers=True)
    net = recipe.make_net()
    module = recipe.make_module(net, recipe.max_steps, None)
    job.files.root.mkdir(parents=True, exist_ok=True)
    ctx.record_config(job.files.root, stage=job.stage, fold=str(job.fold), batch_size=job.batch_size, train_scans=job.train_scans,
                      heldout_scans=job.heldout_scans, training_seed=seed)
    trainer = fit(module, volumes, job.batch_size, recipe.sampling, seed, job.files.root, recipe.max_steps, ctx.trainers,
                  f"{job.stage}_bs{job.batch_size}_fold{job.fold}", job.label, job.stage, job.files.metrics)
    return net, trainer


def reject_attempt(files: MemberFiles, attempt: int) -> Path:
    """Move a rejected attempt's checkpoints and logs into rejected_attempt_<n>/ (kept, not deleted)."""
    dest = files.rejected_attempt(attempt)
    dest.mkdir()
    for name in ("checkpoints", "csv", "wandb", "metrics.csv", "config.yaml", "metadata.json"):
        if (files.root / name).exists():
            shutil.move(str(files.root / name), str(dest / name))
    return dest


def _refine_round(recipe: MemberRecipe, job: MemberJob, ctx: TrainingContext, net: torch.nn.Module, seed: int) -> dict[str, Any]:
    """Hard-negative round of a trained U-Net, in place: `refine.steps` more steps with windows at its own
    false positives on (a seeded subset of) its training scans."""
    rnd = recipe.refine
    assert rnd is not None
    files = job.files
    scans = seeded_subset(job.train_scans, rnd.max_scans, job.run_seed, job.fold)
    for scan_id in [s for s in scans if not (files.hard_negatives / f"{s}.csv").is_file()]:
        scan, pre = ctx.store.load(scan_id)
        prob = predict_probability(net, np.asarray(pre.image), np.asarray(pre.mask), ctx.unet_map, ctx.device)
        found = false_positives(prob, rnd.threshold, scan, ctx.match_radius_mm, ctx.candidate_point)
        write_candidates(found, files.hard_negatives / f"{scan_id}.csv")
        log.info("%s: %d hard negatives on %s", files.root.name, len(found), scan_id)
    volumes = ctx.store.training_volumes(job.train_scans, files.hard_negatives, target=recipe.target)
    module = recipe.make_module(net, rnd.steps, rnd.lr)
    names = [f"{v.scan_id}:{i}" for v in volumes for i in range(len(v.cmb_centres))]
    schedule = ReplaySchedule(net, volumes, *rnd.replay) if rnd.replay else None
    net.train()  # Lightning keeps the train/eval mode it finds; this round must train batch norm too
    trainer = fit(module, volumes, job.batch_size, rnd.sampling, seed, files.refine_dir, rnd.steps, ctx.trainers,
                  f"unet_bs{job.batch_size}_fold{job.fold}_refine", f"{job.label} · hard-negative round", job.stage,
                  files.refine_metrics, schedule)
    n_negatives = sum(len(read_candidates(files.hard_negatives / f"{s}.csv")[0]) for s in scans)
    peaks = training_cmb_peaks(net, volumes)
    record: dict[str, Any] = {"steps": int(trainer.global_step), "hard_negatives": n_negatives, "scans": scans,
                              "final_loss": last_metric(files.refine_metrics, "train/loss"),
                              "training_cmb_peak_min": round(float(peaks.min()), 4) if len(peaks) else None,
                              "training_cmbs_below_0.5": {n: round(float(p), 4) for n, p in zip(names, peaks) if p < 0.5}}
    if schedule is not None:
        record["replay_slipping_per_epoch"] = schedule.slipping_per_epoch
        record["replayed"] = [n for n, r in zip(names, schedule.replayed) if r]
    return record


def fit(module: pl.LightningModule, volumes: list[TrainingVolume], batch_size: int, sampling: Sampling, seed: int, out: Path,
        max_steps: int, trainers: TrainerFactory, run_name: str, label: str, kind: str, metrics_to: Path,
        positive_weights: Callable[[], np.ndarray | None] | None = None) -> pl.Trainer:
    """Train `module` on fresh windows of `volumes` (drawn by `sampling`; positives weighted per epoch by
    `positive_weights`) up to `max_steps`, resuming from `out`'s last checkpoint; logs and checkpoints under
    `out`, the metrics history merged into `metrics_to`."""
    data = PatchDataModule(volumes, batch_size, sampling.steps_per_epoch, sampling.mix, seed=seed, max_shift=sampling.max_shift,
                           negative_shift=sampling.negative_shift, num_workers=sampling.num_workers,
                           transplant=sampling.transplant, positive_weights=positive_weights, synthetic=sampling.synthetic,
                           window=input_window(module.net), zoom=sampling.zoom, contrast=sampling.contrast)
    trainer = trainers.make(out, max_steps, run_name, seed, label, kind)
    last = last_checkpoint(out)
    if last.is_file():
        log.info("%s: resuming from %s", out, last)
    finish_wandb_run()  # a run left open (e.g. by an interrupted member) must not collect this model's logs
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.is_file() else None, weights_only=True)
    finally:
        finish_wandb_run()
    merge_metrics(out / "csv", metrics_to)
    return trainer


def merge_metrics(log_dir: Path, dest: Path) -> None:
    """Write to `dest` the whole metrics history of a member from the CSVLogger versions under `log_dir`.

    Each resume writes a new `version_<n>/metrics.csv` that starts at the resumed step; rows of
    earlier versions at or after that step (trained again after the kill) are dropped.
    """

    def version(path: Path) -> int:
        name = path.parent.name
        return int(name.rsplit("_", 1)[-1]) if name.rsplit("_", 1)[-1].isdigit() else -1

    rows: list[dict[str, str]] = []
    columns: list[str] = []
    for path in sorted(log_dir.glob("**/metrics.csv"), key=version):
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            new_rows = list(reader)
            columns += [c for c in reader.fieldnames or [] if c not in columns]
        steps = [int(r["step"]) for r in new_rows if r.get("step", "").isdigit()]
        if steps:
            rows = [r for r in rows if not r.get("step", "").isdigit() or int(r["step"]) < min(steps)]
        rows += new_rows
    if not columns:
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(text.getvalue(), dest)


def last_metric(path: Path, name: str) -> float | None:
    """The last logged value of `name` in a metrics CSV (None if absent)."""
    if not path.is_file():
        return None
    value = None
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get(name):
                value = float(row[name])
    return value
