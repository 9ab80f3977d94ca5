"""The LOTCV protocol over one run folder: per fold, the U-Nets, mining, the CNNs and out-of-fold detection;
then the final members on every scan and the evaluation.

This class is the protocol's config builder and its order of steps; each step lives in its own
module (`members`, `mining`, `detection`) and takes plain arguments. Members with a done.json are
skipped, so re-running resumes; an unfinished member resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch import nn

from cmb.conf_utils import attach_run_log, instantiate_checked, write_config_and_metadata
from cmb.data.io import require_writable
from cmb.data.readers import ScanDataset
from cmb.data.splits import make_or_load_splits, select_fold
from cmb.errors import CMBError, ConfigError
from cmb.eval.run_files import folder_settings, member_digests
from cmb.inference.candidates import candidate_point, stage2_window
from cmb.inference.unet_map import UNetMapConfig, ensemble_probability
from cmb.layout import CNN_SCORES, FINAL, MIMICS, PAPER_MINING, STAGE1_HITS, STAGES, TRUTH, UNET_CANDIDATES, RunLayout, member_name
from cmb.mixes import stage_draws
from cmb.models.checkpoint import load_model
from cmb.progress import TrainingClock
from cmb.protocol import detection, mining
from cmb.protocol.members import MemberJob, TrainingContext, planned_steps, train_member
from cmb.protocol.mining import MissingPrerequisite
from cmb.protocol.recipes import MemberRecipe, member_recipe
from cmb.protocol.scans import RunTiming, ScanStore, VolumeOptions, median_spacing
from cmb.protocol.settings import member_settings, seeded_subset, settings_hash, settings_stamp, stamp_matches
from cmb.protocol.trainer import device_for, trainer_factory
from cmb.validate import MINING_MODES

log = logging.getLogger(__name__)


class Protocol:
    """One run folder (`paths.run_dir`) and everything trained and predicted in it."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.layout = RunLayout(Path(cfg.paths.run_dir))
        self.layout.refuse_foreign()
        self.dataset: ScanDataset = instantiate_checked(cfg.data)
        self.scan_ids = self.dataset.scan_ids()
        if cfg.preprocess.get("spacing") == "median":  # resolved once, and written into the run's config.yaml as numbers
            with open_dict(cfg):
                cfg.preprocess.spacing = median_spacing(self.dataset, self.scan_ids)
            log.info("working voxel size: %s mm (the median of the run's scans)", list(cfg.preprocess.spacing))
        self.splits = make_or_load_splits(self.layout.root, self.scan_ids, int(cfg.seed), cfg.get("splits_file"), write=False)
        self._refuse_other_settings()
        self._prepared = False
        self.timing = RunTiming(self.layout.timing)
        uses_vessel = any(stage_draws(cfg[s], "vessel") for s in STAGES)  # either round of either stage
        options = VolumeOptions(float(cfg.data_options.point_target_radius_mm), float(cfg.data_options.dark_threshold),
                                float(cfg.data_options.vessel_contrast) if uses_vessel else None, int(cfg.seed))
        self.store = ScanStore(self.dataset, instantiate(cfg.preprocess), Path(cfg.paths.cache_dir), options, self.timing)
        self.unet_map_cfg = UNetMapConfig.from_cfg(cfg.inference.unet)
        if not bool(cfg.get("verbose", False)):  # quiet console: no bar per whole-scan pass inside the protocol
            self.unet_map_cfg = replace(self.unet_map_cfg, progress=False)
        self.device = device_for(cfg.trainer)
        self.clock = TrainingClock()  # training steps planned and done in this command: the ETA of the progress lines
        self._planned: set[tuple[str, str, int]] = set()
        self.recipes: dict[str, MemberRecipe] = {s: member_recipe(cfg, s) for s in STAGES}
        self.context = TrainingContext(self.store, trainer_factory(cfg, self.layout.root.name, self.clock), self.unet_map_cfg,
                                       self.device, float(cfg.eval.match_radius_mm), self.clock,
                                       lambda folder, **extra: write_config_and_metadata(folder, cfg, **extra),
                                       candidate_point(cfg))

    def prepare(self) -> None:
        """Create the run folder (splits.json, config.yaml, a log file) on the first step that writes; everything
        the constructor and the entry points check comes first, so a refused command leaves no folder behind."""
        if self._prepared:
            return
        root = self.layout.root
        require_writable(root, "run folder")
        root.mkdir(parents=True, exist_ok=True)
        make_or_load_splits(root, self.scan_ids, int(self.cfg.seed), self.cfg.get("splits_file"))
        if not self.layout.config.is_file():  # parallel per-fold jobs: evaluation needs the run's settings
            write_config_and_metadata(root, self.cfg, n_folds=self.n_folds)
        attach_run_log(root)
        self._prepared = True

    # ---------------------------------------------------------------- folds
    @property
    def n_folds(self) -> int:
        return len(self.splits["folds"])

    def fold_split(self, fold: int | str) -> dict:
        """The fold's held-out scans and the scans its members train on: all the others, or a seeded subset of
        `protocol.train_scans` of them (the held-out scans never change)."""
        split = {"fold": FINAL, "train": list(self.scan_ids), "test": []} if fold == FINAL else \
            select_fold(self.splits, fold if isinstance(fold, int) else int(fold))
        limit = self.cfg.protocol.get("train_scans")
        if limit is None:
            return split
        return {**split, "train": seeded_subset(split["train"], int(limit), int(self.cfg.seed), fold)}

    def folds_to_run(self) -> list[int | str]:
        folds: list[int | str] = list(range(self.n_folds)) if self.cfg.get("folds") in (None, "all") else [int(f) for f in self.cfg.folds]
        return folds + ([FINAL] if bool(self.cfg.protocol.train_final) else [])

    # ---------------------------------------------------------------- members
    def member_settings_hash(self, stage: str, fold: int | str, batch_size: int) -> str:
        return settings_hash(member_settings(self.cfg, stage, self.fold_split(fold), batch_size))

    def settings_stamp(self, stage: str, fold: int | str, batch_size: int) -> dict[str, Any]:
        return settings_stamp(member_settings(self.cfg, stage, self.fold_split(fold), batch_size))

    def _refuse_other_settings(self) -> None:
        """Before this run writes anything: every member already in the run folder, finished (done.json) or
        started (started.json), must have been trained with the current settings; otherwise refuse and leave
        every file as it is (a re-run with other settings must not rewrite config.yaml first)."""
        for stamp, stage, fold, bs in self.layout.member_stamps():
            if not stamp_matches(stamp, self.member_settings_hash(stage, fold, bs)):
                raise ConfigError(f"{stamp.parent}: this member was trained with other settings; use a new run (name=...) or delete "
                                  "the member folder (nothing was written)")

    def is_done(self, stage: str, fold: int | str, batch_size: int) -> bool:
        done = self.layout.member(stage, fold, batch_size).done
        if not done.is_file():
            return False
        if not stamp_matches(done, self.member_settings_hash(stage, fold, batch_size)):
            raise ConfigError(f"{done.parent}: this member was trained with other settings; use a new run (name=...) or delete "
                              "the member folder")
        return True

    def _plan(self, stage: str, fold: int | str, batch_size: int) -> None:
        """Count a member's training steps into the ETA, once."""
        key = (stage, str(fold), int(batch_size))
        if key not in self._planned:
            self._planned.add(key)
            self.clock.plan(planned_steps(self.recipes[stage]), stage)

    def mined_scans(self, fold: int | str) -> list[str]:
        """Training scans of the fold that mimics are mined on: all, or a seeded subset of `mining.max_scans`."""
        return seeded_subset(self.fold_split(fold)["train"], self.cfg.mining.get("max_scans"), int(self.cfg.seed), fold)

    def train_member(self, stage: str, fold: int | str, batch_size: int) -> Path:
        """Train one U-Net (`unet`) or CNN (`cnn`) member; skipped when already done."""
        self.prepare()
        files = self.layout.member(stage, fold, batch_size)
        if self.is_done(stage, fold, batch_size):
            log.info("%s: already trained, skipping", files.root)
            return files.root
        stamp = self.settings_stamp(stage, fold, batch_size)
        if files.started.is_file() and not stamp_matches(files.started, stamp["settings_hash"]):
            raise ConfigError(f"{files.root}: this unfinished member was started with other settings; use a new run (name=...) or "
                              "delete the member folder")
        mimics_dir = hits_dir = None
        if stage == "cnn":
            mimics_dir = self.layout.fold_folder(fold, MIMICS)
            hits_dir = self.layout.fold_folder(fold, STAGE1_HITS) if self.draws_stage1_hits else None
            needed = [(mimics_dir, "mined mimics")] + ([(hits_dir, "mined stage-1 hits")] if hits_dir is not None else [])
            for folder, what in needed:
                missing = [s for s in self.mined_scans(fold) if not (folder / f"{s}.csv").is_file()]
                if missing:
                    raise MissingPrerequisite(f"{folder}: no {what} for training scan(s) {missing[:4]} of fold {fold}; "
                                              f"run `python train.py stage=mine fold={fold}` first (it needs both U-Nets of the fold)")
        split = self.fold_split(fold)
        if not any(len(v.cmb_centres) for v in self.store.training_volumes(split["train"])):
            shown = ", ".join(split["train"][:4]) + (", ..." if len(split["train"]) > 4 else "")
            raise CMBError(f"{'final models' if fold == FINAL else f'fold {fold}'}: none of its {len(split['train'])} training scans "
                           f"({shown}) has a CMB in its truth, and a detector cannot learn CMBs from no example; check the "
                           "label maps (all zero?) or annotations.csv")
        self._plan(stage, fold, batch_size)
        where = "final models" if fold == FINAL else f"fold {fold}/{self.n_folds}"
        job = MemberJob(stage, fold, int(batch_size), split["train"], split["test"], int(self.cfg.seed), files, stamp,
                        f"{where} · {member_name(stage, batch_size)}", mimics_dir, hits_dir)
        train_member(self.recipes[stage], job, self.context)
        return files.root

    def members(self, stage: str, fold: int | str) -> list[nn.Module]:
        nets = []
        for bs in self.cfg[stage].batch_sizes:
            path = self.layout.member(stage, fold, int(bs)).model
            if not path.is_file():
                raise MissingPrerequisite(f"{path}: member not trained yet; run `python train.py stage={stage} fold={fold} batch_size={bs}`")
            nets.append(load_model(path, self.device, stage=stage)[0])
        return nets

    def unet_map(self, nets: list[nn.Module]):  # noqa: ANN201 - a closure: Preprocessed -> (I, J, K) combined map
        normalize = str(self.cfg.inference.ensemble_normalize)
        return lambda pre: ensemble_probability(nets, np.asarray(pre.image), np.asarray(pre.mask), self.unet_map_cfg, normalize, self.device)

    # ---------------------------------------------------------------- mining and out-of-fold detection
    def heldout_fold_of(self, scan_id: str) -> int:
        for f in self.splits["folds"]:
            if scan_id in f["test"]:
                return int(f["fold"])
        raise ConfigError(f"scan {scan_id} is in no fold's held-out set")

    @property
    def draws_stage1_hits(self) -> bool:
        """Whether the CNNs' sampling mix draws "hit" windows (then mining also keeps the stage-1 hits)."""
        return stage_draws(self.cfg.cnn, "hit")

    def mine(self, fold: int | str) -> Path:
        """Save U-Net false positives (combined map >= mining threshold) for the fold's training scans, and the
        components that hit a CMB (`stage1_hits/`; needed when the CNNs draw "hit" windows)."""
        self.prepare()
        # stamped like the out-of-fold folders: mimics of other mining settings or of retrained U-Nets are mined again
        out, hits_out = self.fresh_output_folder(fold, MIMICS), self.fresh_output_folder(fold, STAGE1_HITS)
        todo = [s for s in self.mined_scans(fold) if not (out / f"{s}.csv").is_file()
                or (self.draws_stage1_hits and not (hits_out / f"{s}.csv").is_file())]
        mode = str(self.cfg.mining.mode)
        if not todo:
            return out
        if mode == "leak_free":
            mining.mine_leak_free(todo, self.store.load, self.unet_map(self.members("unet", fold)), float(self.cfg.mining.threshold),
                                  float(self.cfg.eval.match_radius_mm), out, hits_out, self.context.candidate_point)
        elif mode == "paper":
            mining.mine_paper(todo, lambda s: self.layout.scan_file(self.heldout_fold_of(s), PAPER_MINING, s), out, hits_out)
        else:
            raise ConfigError(f"mining.mode must be one of {MINING_MODES}, got {mode!r}")
        return out

    def fresh_output_folder(self, fold: int | str, folder: str) -> Path:
        """`fold_<k>/<folder>`, emptied when its files came from other settings or members, and stamped."""
        self.prepare()
        paper_mined = folder in (MIMICS, STAGE1_HITS) and str(self.cfg.mining.mode) == "paper"
        settings = folder_settings(self.cfg, self.layout.fold_dir(fold), folder, self.paper_mining_members(fold) if paper_mined else None)
        return detection.fresh_output_folder(self.layout.fold_folder(fold, folder), settings)

    def paper_mining_members(self, fold: int | str) -> dict[str, str]:
        """{fold_<j>/<member>: digest} of the U-Nets whose held-out components the fold's mimics are taken from
        (mining.mode=paper: each mined scan's from the fold that held it out), not the fold's own U-Nets."""
        sources = sorted({self.heldout_fold_of(s) for s in self.mined_scans(fold)})
        return {f"fold_{j}/{member}": digest for j in sources
                for member, digest in member_digests(self.layout.fold_dir(j), PAPER_MINING).items()}

    def unet_candidates(self, fold: int) -> None:
        """The held-out scans' U-Net candidates, exactly as infer.py extracts them (and, mining.mode=paper,
        the components at the mining threshold)."""
        out = self.fresh_output_folder(fold, UNET_CANDIDATES)
        paper = str(self.cfg.mining.mode) == "paper"
        mining_out = self.fresh_output_folder(fold, PAPER_MINING) if paper else None
        todo = [s for s in self.fold_split(fold)["test"] if not (out / f"{s}.csv").is_file()
                or (mining_out is not None and not (mining_out / f"{s}.csv").is_file())]
        if todo:
            detection.heldout_unet_candidates(todo, fold, self.store.load, self.unet_map(self.members("unet", fold)),
                                              float(self.cfg.inference.unet_threshold), float(self.cfg.eval.match_radius_mm), out,
                                              self.layout.fold_folder(fold, TRUTH), self.timing,
                                              (mining_out, float(self.cfg.mining.threshold)) if mining_out else None,
                                              self.context.candidate_point, stage2_window(self.cfg) != "candidate")

    def cnn_scores(self, fold: int) -> None:
        """Every held-out U-Net candidate scored by the fold's CNNs (as infer.py does)."""
        candidates = self.fresh_output_folder(fold, UNET_CANDIDATES)
        out = self.fresh_output_folder(fold, CNN_SCORES)
        todo = [s for s in self.fold_split(fold)["test"] if not (out / f"{s}.csv").is_file()]
        if todo:
            detection.heldout_cnn_scores(todo, candidates, self.store.load, self.members("cnn", fold), bool(self.cfg.inference.cnn_tta),
                                         self.device, out, self.timing, float(self.cfg.eval.match_radius_mm),
                                         str(self.cfg.inference.get("score_fusion", "cnn")), stage2_window(self.cfg))

    # ---------------------------------------------------------------- whole protocol
    def run_fold(self, fold: int | str) -> None:
        self._train_unets(fold)
        if fold != FINAL:
            self.unet_candidates(int(fold))
        if str(self.cfg.mining.mode) == "paper" and fold != FINAL:
            for other in range(self.n_folds):  # paper-style mining needs every fold's held-out components
                self._train_unets(other)
                self.unet_candidates(other)
        self.mine(fold)
        for bs in self.cfg.cnn.batch_sizes:
            self.train_member("cnn", fold, int(bs))
        if fold != FINAL:
            self.cnn_scores(int(fold))

    def _train_unets(self, fold: int | str) -> None:
        for bs in self.cfg.unet.batch_sizes:
            self.train_member("unet", fold, int(bs))

    def run_all(self) -> dict[str, Any]:
        self.prepare()
        write_config_and_metadata(self.layout.root, self.cfg, n_folds=self.n_folds)
        t0 = time.perf_counter()
        for fold in self.folds_to_run():  # the ETA covers every member to train
            for stage in STAGES:
                for bs in self.cfg[stage].batch_sizes:
                    if not self.is_done(stage, fold, int(bs)):
                        self._plan(stage, fold, int(bs))
        for fold in self.folds_to_run():
            log.info("=== final models on all %d scans ===" if fold == FINAL else "=== fold %d of %d ===",
                     *((len(self.scan_ids),) if fold == FINAL else (fold, self.n_folds)))
            self.run_fold(fold)
        self.timing.add("protocol_wall", time.perf_counter() - t0)
        from cmb.eval.evaluate import evaluate_run

        return evaluate_run(self.layout.root, self.cfg)
