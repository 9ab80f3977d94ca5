"""The LOTCV protocol: members (U-Nets, CNNs) per fold, mining, out-of-fold detection.

Run folder (`paths.run_dir`):
    config.yaml, metadata.json, splits.json, timing.json
    fold_<k>/unet_bs20/ ... : one member each: config.yaml, metadata.json, metrics.csv,
                              model.pt (safe weights), checkpoints/last.ckpt, done.json
        (U-Nets with model.refine.steps > 0 also: hard_negatives/<scan>.csv, the member's own
        false positives on its training scans; model_before_refine.pt; refine/ (checkpoints,
        logs) and refine_metrics.csv of the hard-negative round; model.pt is the refined net)
    fold_<k>/mimics/<scan>.csv       mined stage-1 false positives (training scans of fold k)
    fold_<k>/stage1/<scan>.csv       stage-1 candidates of the held-out scans (out-of-fold): components of the
                                     combined map at inference.stage1_threshold, as infer.py extracts them
    fold_<k>/oof/<scan>.csv          every one of those candidates with its stage-2 score and CMB hits
    fold_<k>/{stage1,oof}/settings.json  the settings those files came from (other settings: recomputed)
    fold_<k>/paper_mining/<scan>.csv (mining.mode=paper only) held-out components at mining.threshold
    fold_<k>/truth/<scan>.json       the held-out scans' CMBs (count, centroids, diameters)
    fold_final/...                   the same members trained on every scan (for infer.py)
    results.json, froc.png, report.md, operating_points.csv  (cmb.eval)
Members with a done.json are skipped, so re-running resumes; an unfinished member
resumes from its last Lightning checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cmb.conf_utils import attach_run_log, instantiate_checked, write_config_and_metadata
from cmb.data.io import atomic_write_text, require_writable
from cmb.data.patches import TrainingVolume, build_training_volume
from cmb.data.preprocess import Preprocessed, preprocess_scan
from cmb.data.readers import ScanDataset
from cmb.data.scan import Scan
from cmb.data.splits import make_or_load_splits, select_fold
from cmb.errors import CMBError, ConfigError
from cmb.eval.matching import Truth, hit_sets
from cmb.eval.run_files import SETTINGS_FILE, folder_settings
from cmb.inference.candidates import Candidate, extract_candidates, read_candidates, write_candidates
from cmb.inference.stage1 import Stage1InferenceConfig, ensemble_probability, predict_probability
from cmb.inference.stage2 import score_candidates
from cmb.models.checkpoint import load_model, save_model
from cmb.models.health import ReplaySchedule, is_capped, training_cmb_peaks
from cmb.models.lightning import PatchDataModule, Stage1Module, Stage2Module, StepSeed
from cmb.progress import StepProgress, TrainingClock

log = logging.getLogger(__name__)
STAGES = ("unet", "cnn")
FINAL = "final"
RETRY_SEED_STEP = 100  # a capped U-Net's retry n is seeded with its seed + n * this
SETTINGS_SCHEMA = 2  # the rule of Experiment.member_settings; members stamped under another are refused with that reason


def scan_truth(scan: Scan) -> Truth:
    return Truth(scan.centroids_vox, scan.spacing_mm, scan.instances)


def hits_column(points: np.ndarray, truth: Truth, radius_mm: float) -> list[str]:
    return [";".join(str(h) for h in hs) for hs in hit_sets(points, truth, radius_mm)]


class MissingPrerequisite(CMBError):
    """A step needs the output of an earlier step that is not there yet."""


class Experiment:
    """One run folder and everything trained and predicted in it."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.paths.run_dir)
        self.dataset: ScanDataset = instantiate_checked(cfg.data)
        self.scan_ids = self.dataset.scan_ids()
        self.splits = make_or_load_splits(self.run_dir, self.scan_ids, int(cfg.seed), cfg.get("splits_file"), write=False)
        self._refuse_other_settings()
        self._prepared = False
        self.pre_cfg = instantiate(cfg.preprocess)
        self.cache_dir = Path(cfg.paths.cache_dir)
        self.verbose = bool(cfg.get("verbose", False))
        self.channels_last = bool(cfg.trainer.get("channels_last", False))  # a memory layout: not part of the settings hash
        self.infer_cfg = Stage1InferenceConfig.from_cfg(cfg.inference.stage1)
        if not self.verbose:  # quiet console: no bar per whole-scan pass inside the protocol
            self.infer_cfg = replace(self.infer_cfg, progress=False)
        self.device = "cuda" if cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
        self._timing_path = self.run_dir / "timing.json"
        self._volumes: dict[str, TrainingVolume] = {}
        self.clock = TrainingClock()  # training steps planned and done in this command: the ETA of the progress lines
        self._planned: set[tuple[str, str, int]] = set()

    def prepare(self) -> None:
        """Create the run folder (splits.json, config.yaml, a log file) on the first step that writes; everything
        the constructor and the entry points check comes first, so a refused command leaves no folder behind."""
        if self._prepared:
            return
        require_writable(self.run_dir, "run folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        make_or_load_splits(self.run_dir, self.scan_ids, int(self.cfg.seed), self.cfg.get("splits_file"))
        if not (self.run_dir / "config.yaml").is_file():  # parallel per-fold jobs: evaluation needs the run's settings
            write_config_and_metadata(self.run_dir, self.cfg, n_folds=self.n_folds)
        attach_run_log(self.run_dir)
        self._prepared = True

    # ---------------------------------------------------------------- folds and data
    @property
    def n_folds(self) -> int:
        return len(self.splits["folds"])

    def fold_split(self, fold: int | str) -> dict:
        if fold == FINAL:
            return {"fold": FINAL, "train": list(self.scan_ids), "test": []}
        return select_fold(self.splits, fold if isinstance(fold, int) else int(fold))

    def fold_dir(self, fold: int | str) -> Path:
        return self.run_dir / f"fold_{fold}"

    def member_dir(self, stage: str, fold: int | str, batch_size: int) -> Path:
        return self.fold_dir(fold) / f"{stage}_bs{batch_size}"

    def load_scan(self, scan_id: str) -> tuple[Scan, Preprocessed]:
        scan = self.dataset.load(scan_id)
        t = time.perf_counter()
        pre = preprocess_scan(scan, self.pre_cfg, self.cache_dir)
        self.add_time("preprocess", time.perf_counter() - t)
        return scan, pre

    def add_time(self, key: str, seconds: float, count_key: str | None = None) -> None:
        """Accumulate wall time per phase in timing.json (seconds)."""
        self.prepare()
        timing = json.loads(self._timing_path.read_text()) if self._timing_path.is_file() else {}
        timing[key] = round(timing.get(key, 0.0) + seconds, 3)
        if count_key:
            timing[count_key] = timing.get(count_key, 0) + 1
        atomic_write_text(json.dumps(timing, indent=1), self._timing_path)

    def training_volumes(self, scan_ids: list[str], mimics_dir: Path | None = None) -> list[TrainingVolume]:
        """Targets and negative pools per scan (built once per process), with the fold's mimics attached."""
        volumes = []
        uses_vessel = any(float(self.stage_cfg(s).sampling.get("vessel", 0.0)) > 0 for s in STAGES)
        vessel_contrast = float(self.cfg.data_options.vessel_contrast) if uses_vessel else None
        for scan_id in scan_ids:
            if scan_id not in self._volumes:
                scan, pre = self.load_scan(scan_id)
                self._volumes[scan_id] = build_training_volume(
                    scan, pre, point_radius_mm=float(self.cfg.data_options.point_target_radius_mm),
                    dark_threshold=float(self.cfg.data_options.dark_threshold),
                    vessel_contrast=vessel_contrast, seed=int(self.cfg.seed))
            vol = self._volumes[scan_id]
            if mimics_dir is not None and (mimics_dir / f"{scan_id}.csv").is_file():
                cands, _ = read_candidates(mimics_dir / f"{scan_id}.csv")
                vol = replace(vol, mimics=np.rint(np.array([c.voxel for c in cands])).astype(int).reshape(-1, 3))
            volumes.append(vol)
        return volumes

    # ---------------------------------------------------------------- members
    def stage_cfg(self, stage: str) -> DictConfig:
        if stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}")
        return self.cfg.model if stage == "unet" else self.cfg.cnn

    def member_settings_hash(self, stage: str, fold: int | str, batch_size: int) -> str:
        """The hash of what decides the weights a member is trained to (`member_settings`), stamped into its
        started.json and done.json; a member whose stamp differs is refused, never overwritten."""
        return hashlib.sha256(json.dumps(self.member_settings(stage, fold, batch_size), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def member_settings(self, stage: str, fold: int | str, batch_size: int) -> dict[str, Any]:
        """What decides a member's weights, by one rule (settings schema `SETTINGS_SCHEMA`):

        1. the stage's config group (`model` or `cnn`), the data (not where it is cached), the
           preprocessing, the seed, the batch size and the fold's split; CNNs also the mining
           settings (their negatives), U-Nets with a hard-negative round the matching radius (it
           decides which detections are false);
        2. minus the settings of parts that do not run (the hard-negative round at `refine.steps` 0,
           the transplant source when no sampling mix draws transplants) and of the health check
           (it keeps a healthy member as it is; a retrained one says so in done.json);
        3. minus every setting at its off value (null, false, 0, empty; `without_off`): an option that
           is off trains the same member as no option at all, so a new option whose default is off
           leaves every finished member valid.
        """
        keep = {"stage": OmegaConf.to_container(self.stage_cfg(stage), resolve=True), "data": OmegaConf.to_container(self.cfg.data, resolve=True),
                "preprocess": OmegaConf.to_container(self.cfg.preprocess, resolve=True), "seed": int(self.cfg.seed),
                "batch_size": int(batch_size), "split": self.fold_split(fold), "schema": SETTINGS_SCHEMA}
        keep["data"].pop("cache_dir", None)
        keep["stage"].pop("health", None)
        if stage == "cnn":
            keep["mining"] = OmegaConf.to_container(self.cfg.mining, resolve=True)
        if stage == "unet" and refine_steps(self.cfg.model):
            keep["match_radius_mm"] = float(self.cfg.eval.match_radius_mm)
        else:
            keep["stage"].pop("refine", None)
        mixes = [keep["stage"].get("sampling") or {}, (keep["stage"].get("refine") or {}).get("sampling") or {}]
        if not any(float(m.get("transplant") or 0.0) > 0 for m in mixes):
            keep["stage"].pop("transplant", None)
        return without_off(keep)

    def settings_stamp(self, stage: str, fold: int | str, batch_size: int) -> dict[str, Any]:
        return {"settings_hash": self.member_settings_hash(stage, fold, batch_size), "settings_schema": SETTINGS_SCHEMA}

    def _refuse_other_settings(self) -> None:
        """Before this run writes anything: every member already in the run folder, finished (done.json) or
        started (started.json), must have been trained with the current settings; otherwise refuse and leave
        every file as it is (a re-run with other settings must not rewrite config.yaml first)."""
        for stamp in sorted(self.run_dir.glob("fold_*/*_bs*/done.json")) + sorted(self.run_dir.glob("fold_*/*_bs*/started.json")):
            member = stamp.parent
            stage, _, bs = member.name.partition("_bs")
            fold = member.parent.name.removeprefix("fold_")
            if stage not in STAGES or not bs.isdigit() or not (fold == FINAL or fold.isdigit()):
                continue
            if not self._stamp_matches(stamp, stage, fold if fold == FINAL else int(fold), int(bs)):
                raise ConfigError(f"{member}: this member was trained with other settings; use a new run (name=...) or delete "
                                  "the member folder (nothing was written)")

    def _stamp_matches(self, stamp: Path, stage: str, fold: int | str, batch_size: int) -> bool:
        """Whether a member's done.json or started.json records the settings hash of the current config.
        A member stamped under another settings schema (an earlier cmb) is refused with that reason."""
        try:
            saved = json.loads(stamp.read_text())
            saved_hash, schema = saved.get("settings_hash"), saved.get("settings_schema", 1)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ConfigError(f"{stamp}: unreadable; delete the member folder {stamp.parent} to retrain it") from None
        if schema != SETTINGS_SCHEMA:
            raise ConfigError(f"{stamp.parent}: trained by an earlier cmb (settings schema {schema}, now {SETTINGS_SCHEMA}), whose "
                              "settings cannot be compared; use a new run (name=...) or delete the member folder (nothing was written)")
        return saved_hash == self.member_settings_hash(stage, fold, batch_size)

    def is_done(self, stage: str, fold: int | str, batch_size: int) -> bool:
        done = self.member_dir(stage, fold, batch_size) / "done.json"
        if not done.is_file():
            return False
        if not self._stamp_matches(done, stage, fold, batch_size):
            raise ConfigError(f"{done.parent}: this member was trained with other settings; "
                              "use a new run (name=...) or delete the member folder")
        return True

    def train_member(self, stage: str, fold: int | str, batch_size: int) -> Path:
        """Train one U-Net (`unet`) or discriminator (`cnn`) member; skipped when already done."""
        self.prepare()
        out = self.member_dir(stage, fold, batch_size)
        if self.is_done(stage, fold, batch_size):
            log.info("%s: already trained, skipping", out)
            return out
        self.plan_member(stage, fold, batch_size)
        split = self.fold_split(fold)
        started = out / "started.json"  # an unfinished member resumes only under the settings it started with
        if started.is_file() and not self._stamp_matches(started, stage, fold, batch_size):
            raise ConfigError(f"{out}: this unfinished member was started with other settings; use a new run (name=...) or delete "
                              "the member folder")
        mimics_dir = None
        if stage == "cnn":
            mimics_dir = self.fold_dir(fold) / "mimics"
            missing = [s for s in self.mined_scans(fold) if not (mimics_dir / f"{s}.csv").is_file()]
            if missing:
                raise MissingPrerequisite(f"{mimics_dir}: no mined mimics for training scan(s) {missing[:4]} of fold {fold}; "
                                          f"run `python train.py stage=mine fold={fold}` first (it needs both U-Nets of the fold)")
        scfg = self.stage_cfg(stage)
        atomic_write_text(json.dumps(self.settings_stamp(stage, fold, batch_size)), started)
        t0 = time.perf_counter()
        volumes = self.training_volumes(split["train"], mimics_dir)
        health = scfg.get("health") if stage == "unet" else None
        rejected = sorted(out.glob("rejected_attempt_*"))  # a resumed member goes on with the attempt it was at
        while True:
            seed = (int(self.cfg.seed) * 1000 + int(batch_size) + (0 if stage == "unet" else 500) + (hash_fold(fold) * 7)
                    + RETRY_SEED_STEP * len(rejected))
            net, trainer = self._train_first_round(stage, scfg, volumes, fold, int(batch_size), seed, out)
            done: dict[str, Any] = {"steps": int(trainer.global_step), "final_loss": _last_metric(out / "metrics.csv", "train/loss")}
            if not health:
                break
            peaks = training_cmb_peaks(net, volumes)
            median = float(np.median(peaks)) if len(peaks) else None
            done["training_cmb_peak_median"] = round(median, 4) if median is not None else None
            if not is_capped(peaks, float(health.min_median_peak)):
                break
            if len(rejected) >= int(health.retries):
                log.warning("%s: still capped after %d retries (median peak %.3f on its training CMBs, below %.2f); keeping it",
                            out, len(rejected), median, float(health.min_median_peak))
                done["capped"] = True
                break
            rejected.append(self._reject_attempt(out, len(rejected)))
            self.clock.plan(int(scfg.max_steps), stage)  # the retry's first round
            log.warning("%s: capped member (median peak %.3f on its own training CMBs, below %.2f); kept in %s, "
                        "training again with seed + %d", out, median, float(health.min_median_peak),
                        rejected[-1].name, RETRY_SEED_STEP * len(rejected))
        if rejected:
            done["rejected_attempts"] = [r.name for r in rejected]
        net_kwargs = OmegaConf.to_container(scfg.net, resolve=True)
        net_kwargs.pop("_target_", None)
        save = dict(stage=stage, fold=str(fold), batch_size=int(batch_size), train_scans=split["train"])
        if stage == "unet" and refine_steps(scfg):
            save_model(net, net_kwargs, out / "model_before_refine.pt", **save)
            done["refine"] = self._refine_unet(net, out, fold, int(batch_size), seed)
        save_model(net, net_kwargs, out / "model.pt", **save)
        seconds = time.perf_counter() - t0
        self.add_time("train", seconds, "n_members_trained")
        done = {**self.settings_stamp(stage, fold, batch_size), **done, "train_seconds": round(seconds, 2)}
        atomic_write_text(json.dumps(done, indent=1), out / "done.json")
        return out

    def plan_member(self, stage: str, fold: int | str, batch_size: int) -> None:
        """Count a member's training steps (first round and hard-negative round) into the ETA, once."""
        key = (stage, str(fold), int(batch_size))
        if key not in self._planned:
            self._planned.add(key)
            scfg = self.stage_cfg(stage)
            self.clock.plan(int(scfg.max_steps) + (refine_steps(scfg) if stage == "unet" else 0), stage)

    def _progress_label(self, run_name: str) -> str:
        """'unet_bs20_fold3_refine' -> 'fold 3/8 · unet_bs20 · hard-negative round'."""
        stage_bs, _, rest = run_name.partition("_fold")
        fold, _, refine = rest.partition("_")
        where = "final models" if fold == FINAL else f"fold {fold}/{self.n_folds}"
        return f"{where} · {stage_bs}" + (" · hard-negative round" if refine == "refine" else "")

    def _train_first_round(self, stage: str, scfg: DictConfig, volumes: list[TrainingVolume], fold: int | str, batch_size: int,
                           seed: int, out: Path) -> tuple[torch.nn.Module, pl.Trainer]:
        """A fresh member (seeded by `seed`) trained `max_steps` on `volumes`; resumes from `out`'s last checkpoint."""
        split = self.fold_split(fold)
        pl.seed_everything(seed, workers=True)
        net = instantiate(scfg.net)
        optimizer = instantiate(scfg.optimizer)
        max_steps = int(scfg.max_steps)
        if stage == "unet":
            module: pl.LightningModule = Stage1Module(net, instantiate(scfg.loss), optimizer, max_steps, self.channels_last)
        else:
            module = Stage2Module(net, optimizer, max_steps, label_smoothing=float(scfg.get("label_smoothing", 0.0)),
                                  channels_last=self.channels_last)
        out.mkdir(parents=True, exist_ok=True)
        write_config_and_metadata(out, self.cfg, stage=stage, fold=str(fold), batch_size=batch_size, train_scans=split["train"],
                                  heldout_scans=split["test"], training_seed=seed)
        trainer = self._fit(module, scfg, volumes, batch_size, dict(scfg.sampling), seed, out, max_steps,
                            f"{stage}_bs{batch_size}_fold{fold}", out / "metrics.csv")
        return net, trainer

    @staticmethod
    def _reject_attempt(out: Path, attempt: int) -> Path:
        """Move a rejected attempt's checkpoints and logs into `out`/rejected_attempt_<n> (kept, not deleted)."""
        dest = out / f"rejected_attempt_{attempt}"
        dest.mkdir()
        for name in ("checkpoints", "csv", "wandb", "metrics.csv", "config.yaml", "metadata.json"):
            if (out / name).exists():
                shutil.move(str(out / name), str(dest / name))
        return dest

    def _refine_unet(self, net: torch.nn.Module, out: Path, fold: int | str, batch_size: int, seed: int) -> dict[str, Any]:
        """Hard-negative round of a trained U-Net, in place: train `model.refine.steps` more steps with
        windows at its own false positives on (a seeded subset of) its training scans."""
        rcfg = self.cfg.model.refine
        train = self.fold_split(fold)["train"]
        negatives = out / "hard_negatives"
        scans = seeded_subset(train, rcfg.get("max_scans"), int(self.cfg.seed), fold)
        todo = [s for s in scans if not (negatives / f"{s}.csv").is_file()]
        for scan_id in todo:
            scan, pre = self.load_scan(scan_id)
            prob = predict_probability(net, np.asarray(pre.image), np.asarray(pre.mask), self.infer_cfg, self.device)
            false_pos = self.false_positives(prob, float(rcfg.threshold), scan)
            write_candidates(false_pos, negatives / f"{scan_id}.csv")
            log.info("%s: %d hard negatives on %s", out.name, len(false_pos), scan_id)
        volumes = self.training_volumes(train, negatives)
        optimizer = instantiate(self.cfg.model.optimizer, lr=float(rcfg.lr))
        steps = int(rcfg.steps)
        module = Stage1Module(net, instantiate(self.cfg.model.loss), optimizer, steps, self.channels_last)
        replay = rcfg.get("replay")
        names = [f"{v.scan_id}:{i}" for v in volumes for i in range(len(v.cmb_centres))]
        schedule = ReplaySchedule(net, volumes, float(replay.below), float(replay.share)) if replay else None
        net.train()  # Lightning keeps the train/eval mode it finds; this round must train batch norm too
        trainer = self._fit(module, self.cfg.model, volumes, batch_size, dict(rcfg.sampling), seed + 1, out / "refine", steps,
                            f"unet_bs{batch_size}_fold{fold}_refine", out / "refine_metrics.csv", schedule)
        n_negatives = sum(len(read_candidates(negatives / f"{s}.csv")[0]) for s in scans)
        peaks = training_cmb_peaks(net, volumes)
        record: dict[str, Any] = {"steps": int(trainer.global_step), "hard_negatives": n_negatives, "scans": scans,
                                  "final_loss": _last_metric(out / "refine_metrics.csv", "train/loss"),
                                  "training_cmb_peak_min": round(float(peaks.min()), 4) if len(peaks) else None,
                                  "training_cmbs_below_0.5": {n: round(float(p), 4) for n, p in zip(names, peaks) if p < 0.5}}
        if schedule is not None:
            record["replay_slipping_per_epoch"] = schedule.slipping_per_epoch
            record["replayed"] = [n for n, r in zip(names, schedule.replayed) if r]
        return record

    def false_positives(self, prob: np.ndarray, threshold: float, scan: Scan) -> list[Candidate]:
        """Components of `prob >= threshold` that hit no CMB of `scan` (matching rule of docs/design.md)."""
        cands = extract_candidates(prob, threshold, scan.affine, scan.scan_id)
        hits = hit_sets(np.array([c.voxel for c in cands]).reshape(-1, 3), scan_truth(scan), float(self.cfg.eval.match_radius_mm))
        return [c for c, h in zip(cands, hits) if not h]

    def _fit(self, module: pl.LightningModule, scfg: DictConfig, volumes: list[TrainingVolume], batch_size: int, mix: dict[str, float],
             seed: int, out: Path, max_steps: int, run_name: str, metrics_to: Path,
             positive_weights: Callable[[], np.ndarray | None] | None = None) -> pl.Trainer:
        """Train `module` on fresh patches of `volumes` (sampling `mix`; positives weighted per epoch by
        `positive_weights`, PatchDataModule) up to `max_steps`, resuming from `out`/checkpoints/last.ckpt;
        logs and checkpoints under `out`, the metrics CSV copied to `metrics_to`."""
        transplant = OmegaConf.to_container(scfg.transplant, resolve=True) if scfg.get("transplant") else None
        data = PatchDataModule(volumes, batch_size, int(scfg.steps_per_epoch), mix, seed=seed, max_shift=int(scfg.max_shift),
                               negative_shift=scfg.get("negative_shift"), num_workers=int(self.cfg.trainer.num_workers),
                               transplant=transplant, positive_weights=positive_weights)
        trainer = self._trainer(out, max_steps, run_name, seed)
        last = out / "checkpoints" / "last.ckpt"
        if last.is_file():
            log.info("%s: resuming from %s", out, last)
        _finish_wandb_run()  # a run left open (e.g. by an interrupted member) must not collect this model's logs
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.is_file() else None, weights_only=True)
        finally:
            _finish_wandb_run()
        merge_metrics(out / "csv", metrics_to)
        return trainer

    def _trainer(self, out: Path, max_steps: int, run_name: str, seed: int) -> pl.Trainer:
        """A Trainer that logs and checkpoints under `out`; each step's random draws come from (seed, step) (StepSeed)."""
        tcfg = self.cfg.trainer
        loggers = []
        for lg in (self.cfg.logger.values() if self.cfg.get("logger") else []):
            is_wandb = str(lg._target_).rsplit(".", 1)[-1] == "WandbLogger"
            # one wandb run per model (named by fold, stage and batch size, grouped by the run folder), never the run in progress
            extra = {"name": run_name, "group": self.run_dir.name, "job_type": run_name.split("_")[0]} if is_wandb else {}
            loggers.append(instantiate(lg, save_dir=str(out), **extra))
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                                            every_n_train_steps=int(tcfg.checkpoint_every_n_steps))
        if tcfg.get("threads"):
            torch.set_num_threads(int(tcfg.threads))
        # PatchDataModule resumes mid-epoch at the right batch (from the global step); Lightning cannot see that
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        callbacks: list[pl.Callback] = [ckpt, StepSeed(seed)]
        bar = self.verbose if tcfg.get("enable_progress_bar") is None else bool(tcfg.enable_progress_bar)
        if not self.verbose:
            callbacks.append(StepProgress(self._progress_label(run_name), self.clock, int(tcfg.get("progress_every_n_steps", 50)),
                                          kind=run_name.split("_", 1)[0]))
        return pl.Trainer(max_steps=max_steps, accelerator=tcfg.accelerator, devices=tcfg.devices, strategy=tcfg.strategy,
                          precision=tcfg.precision, logger=loggers, callbacks=callbacks, log_every_n_steps=int(tcfg.log_every_n_steps),
                          enable_progress_bar=bar, enable_model_summary=False,
                          reload_dataloaders_every_n_epochs=1, deterministic=bool(tcfg.deterministic), num_sanity_val_steps=0,
                          limit_val_batches=0)

    def members(self, stage: str, fold: int | str) -> list[torch.nn.Module]:
        nets = []
        for bs in self.stage_cfg(stage).batch_sizes:
            path = self.member_dir(stage, fold, int(bs)) / "model.pt"
            if not path.is_file():
                raise MissingPrerequisite(f"{path}: member not trained yet; run `python train.py stage={stage} fold={fold} batch_size={bs}`")
            nets.append(load_model(path, self.device, stage=stage)[0])
        return nets

    # ---------------------------------------------------------------- stage 1 use
    def stage1_map(self, nets: list[torch.nn.Module], pre: Preprocessed) -> np.ndarray:
        return ensemble_probability(nets, np.asarray(pre.image), np.asarray(pre.mask), self.infer_cfg,
                                    str(self.cfg.inference.ensemble_normalize), self.device)

    def mined_scans(self, fold: int | str) -> list[str]:
        """Training scans of the fold that mimics are mined on: all, or a seeded subset of `mining.max_scans`."""
        return seeded_subset(self.fold_split(fold)["train"], self.cfg.mining.get("max_scans"), int(self.cfg.seed), fold)

    def mine(self, fold: int | str) -> Path:
        """Save stage-1 false positives (combined map >= mining threshold) for the fold's training scans."""
        self.prepare()
        out = self.fold_dir(fold) / "mimics"
        mode = str(self.cfg.mining.mode)
        thr = float(self.cfg.mining.threshold)
        todo = [s for s in self.mined_scans(fold) if not (out / f"{s}.csv").is_file()]
        if not todo:
            return out
        nets = self.members("unet", fold) if mode == "leak_free" else None
        for scan_id in todo:
            if mode == "leak_free":
                scan, pre = self.load_scan(scan_id)
                mimics = self.false_positives(self.stage1_map(nets, pre), thr, scan)  # type: ignore[arg-type]
            elif mode == "paper":
                source = self.heldout_fold_of(scan_id)
                path = self.fold_dir(source) / "paper_mining" / f"{scan_id}.csv"
                if not path.is_file():
                    raise MissingPrerequisite(f"{path}: paper-style mining needs the out-of-fold stage-1 components of fold {source}")
                cands, rows = read_candidates(path)
                mimics = [c for c, r in zip(cands, rows) if not r["hits"]]
            else:
                raise ConfigError(f"mining.mode must be 'leak_free' or 'paper', got {mode!r}")
            write_candidates(mimics, out / f"{scan_id}.csv")
            log.info("fold %s: %d mimics mined on %s", fold, len(mimics), scan_id)
        return out

    def heldout_fold_of(self, scan_id: str) -> int:
        for f in self.splits["folds"]:
            if scan_id in f["test"]:
                return int(f["fold"])
        raise ConfigError(f"scan {scan_id} is in no fold's held-out set")

    def _fresh_output_folder(self, fold: int, folder: str) -> Path:
        """`fold_<k>/<folder>`, emptied (with a warning) when its files came from other settings, then stamped
        with the current ones: derived files are recomputed, never reported on stale settings."""
        self.prepare()
        out = self.fold_dir(fold) / folder
        settings = folder_settings(self.cfg, self.fold_dir(fold), folder)
        stamp = out / SETTINGS_FILE
        if out.is_dir() and any(out.glob("*.csv")):
            saved = json.loads(stamp.read_text()) if stamp.is_file() else None
            if saved != settings:
                log.warning("%s: out-of-fold files from other settings (%s); recomputing them with %s", out,
                            "written before candidate settings were recorded" if saved is None else saved, settings)
                for old in out.glob("*.csv"):
                    old.unlink()
        atomic_write_text(json.dumps(settings, indent=1), stamp)
        return out

    def stage1_heldout(self, fold: int) -> None:
        """Out-of-fold stage-1 candidates of the fold's held-out scans: components of the combined map at
        `inference.stage1_threshold`, exactly as infer.py extracts them (cmb.inference.candidates)."""
        out = self._fresh_output_folder(fold, "stage1")
        paper_mining = str(self.cfg.mining.mode) == "paper"
        mining_out = self._fresh_output_folder(fold, "paper_mining") if paper_mining else None
        todo = [s for s in self.fold_split(fold)["test"] if not (out / f"{s}.csv").is_file()
                or (mining_out is not None and not (mining_out / f"{s}.csv").is_file())]
        if not todo:
            return
        nets = self.members("unet", fold)
        thr = float(self.cfg.inference.stage1_threshold)
        radius = float(self.cfg.eval.match_radius_mm)
        for scan_id in todo:
            scan, pre = self.load_scan(scan_id)
            t = time.perf_counter()
            prob = self.stage1_map(nets, pre)
            cands = extract_candidates(prob, thr, scan.affine, scan_id)
            self.add_time("stage1_inference", time.perf_counter() - t, "n_stage1_scans")
            points = np.array([c.voxel for c in cands]).reshape(-1, 3)
            write_candidates(cands, out / f"{scan_id}.csv", {"hits": hits_column(points, scan_truth(scan), radius)})
            if mining_out is not None:  # the paper's mimics: held-out false positives at the mining threshold
                pool = extract_candidates(prob, float(self.cfg.mining.threshold), scan.affine, scan_id)
                pool_points = np.array([c.voxel for c in pool]).reshape(-1, 3)
                write_candidates(pool, mining_out / f"{scan_id}.csv", {"hits": hits_column(pool_points, scan_truth(scan), radius)})
            self.write_truth(fold, scan)

    def write_truth(self, fold: int, scan: Scan) -> None:
        write_truth_file(self.fold_dir(fold) / "truth" / f"{scan.scan_id}.json", scan, fold)

    def stage2_heldout(self, fold: int) -> None:
        """Score every out-of-fold stage-1 candidate with the fold's CNNs (as infer.py does; the stage-2
        threshold is applied only when evaluating or deploying)."""
        stage1 = self._fresh_output_folder(fold, "stage1")
        out = self._fresh_output_folder(fold, "oof")
        todo = [s for s in self.fold_split(fold)["test"] if not (out / f"{s}.csv").is_file()]
        if not todo:
            return
        nets = self.members("cnn", fold)
        for scan_id in todo:
            if not (stage1 / f"{scan_id}.csv").is_file():
                raise MissingPrerequisite(f"{stage1 / scan_id}.csv: no stage-1 candidates; run `python train.py stage=fold fold={fold}`")
            cands, rows = read_candidates(stage1 / f"{scan_id}.csv")
            _, pre = self.load_scan(scan_id)
            t = time.perf_counter()
            scored = score_candidates(nets, np.asarray(pre.image), cands, tta=bool(self.cfg.inference.stage2_tta), device=self.device)
            self.add_time("stage2_inference", time.perf_counter() - t, "n_stage2_scans")
            write_candidates(scored, out / f"{scan_id}.csv", {"hits": [r["hits"] for r in rows]})

    # ---------------------------------------------------------------- whole protocol
    def run_fold(self, fold: int | str) -> None:
        for bs in self.cfg.model.batch_sizes:
            self.train_member("unet", fold, int(bs))
        if fold != FINAL:
            self.stage1_heldout(int(fold))
        if str(self.cfg.mining.mode) == "leak_free" or fold == FINAL:
            self.mine(fold)
        else:
            for other in range(self.n_folds):  # paper-style mining needs every fold's stage-1 output
                for bs in self.cfg.model.batch_sizes:
                    self.train_member("unet", other, int(bs))
                self.stage1_heldout(other)
            self.mine(fold)
        for bs in self.cfg.cnn.batch_sizes:
            self.train_member("cnn", fold, int(bs))
        if fold != FINAL:
            self.stage2_heldout(int(fold))

    def run_all(self) -> dict[str, Any]:
        self.prepare()
        write_config_and_metadata(self.run_dir, self.cfg, n_folds=self.n_folds)
        t0 = time.perf_counter()
        folds = list(range(self.n_folds)) if self.cfg.get("folds") in (None, "all") else [int(f) for f in self.cfg.folds]
        for fold in folds + ([FINAL] if bool(self.cfg.protocol.train_final) else []):  # the ETA covers every member to train
            for stage in ("unet", "cnn"):
                for bs in self.stage_cfg(stage).batch_sizes:
                    if not self.is_done(stage, fold, int(bs)):
                        self.plan_member(stage, fold, int(bs))
        for fold in folds:
            log.info("=== fold %d of %d ===", fold, self.n_folds)
            self.run_fold(fold)
        if bool(self.cfg.protocol.train_final):
            log.info("=== final models on all %d scans ===", len(self.scan_ids))
            self.run_fold(FINAL)
        self.add_time("protocol_wall", time.perf_counter() - t0)
        from cmb.eval.evaluate import evaluate_run

        return evaluate_run(self.run_dir, self.cfg)


def without_off(value: Any) -> Any:
    """`value` with every mapping entry at its off value (None, False, 0, "", empty list or mapping) left out,
    recursively (member_settings, rule 3). Lists keep their items as they are."""
    if isinstance(value, dict):
        kept = {k: without_off(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if not _is_off(v)}
    return value


def _is_off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0) \
        or (isinstance(value, (str, list, dict)) and len(value) == 0)


def write_truth_file(path: Path, scan: Scan, fold: int) -> None:
    """`fold_<k>/truth/<scan>.json`: the CMB count, centroids and, from label components, each CMB's
    equivalent-sphere diameter in mm (null for centroid-only truth)."""
    voxel_mm3 = float(np.prod(scan.spacing_mm))
    diameters = [round(float((6 * c.n_voxels * voxel_mm3 / np.pi) ** (1 / 3)), 3) if scan.instances is not None and c.n_voxels > 0
                 else None for c in scan.cmbs]
    atomic_write_text(json.dumps({"scan_id": scan.scan_id, "fold": fold, "n_cmbs": len(scan.cmbs),
                                  "centroids_vox": scan.centroids_vox.round(3).tolist(), "diameters_mm": diameters}), path)


def hash_fold(fold: int | str) -> int:
    return 99 if fold == FINAL else int(fold)


def seeded_subset(scans: list[str], limit: int | None, seed: int, fold: int | str) -> list[str]:
    """All `scans`, or `limit` of them drawn by (seed, fold), sorted."""
    if limit is None or int(limit) >= len(scans):
        return list(scans)
    order = np.random.default_rng([seed, hash_fold(fold)]).permutation(len(scans))
    return sorted(scans[i] for i in order[: int(limit)])


def refine_steps(stage_cfg: DictConfig) -> int:
    """Steps of the U-Net's hard-negative round (model.refine.steps; 0 or absent: none)."""
    refine = stage_cfg.get("refine")
    return int(refine.steps) if refine is not None and refine.get("steps") else 0


def _finish_wandb_run() -> None:
    """Close the wandb run in progress, if wandb is installed and one is open."""
    import sys

    wandb = sys.modules.get("wandb")  # only if a logger has imported it: never import wandb just to close nothing
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def merge_metrics(log_dir: Path, dest: Path) -> None:
    """Write to `dest` the whole metrics history of a member from the CSVLogger versions under `log_dir`.

    Each resume writes a new `version_<n>/metrics.csv` that starts at the resumed step; rows of
    earlier versions at or after that step (trained again after the kill) are dropped.
    """
    import csv
    import io

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


def _last_metric(path: Path, name: str) -> float | None:
    import csv

    if not path.is_file():
        return None
    value = None
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get(name):
                value = float(row[name])
    return value
