"""What decides a member's weights: the settings hash stamped into started.json/done.json, and seeds.

A member whose stamp differs from the current settings is refused, never overwritten; a member
stamped under another `SETTINGS_SCHEMA` (an earlier cmb) is refused with that reason.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cmb.errors import ConfigError
from cmb.inference.candidates import candidate_point
from cmb.layout import FINAL, STAGES
from cmb.mixes import stage_draws

# 3: per-member seeds from a hash of (seed, stage, fold, batch size, attempt, round); stage groups `unet`/`cnn`
# 4: `data_options` (training targets and negative pools) count too; schema 3 left them out
SETTINGS_SCHEMA = 4


def member_settings(cfg: DictConfig, stage: str, split: dict, batch_size: int) -> dict[str, Any]:
    """What decides a member's weights, by one rule (settings schema `SETTINGS_SCHEMA`):

    1. the stage's config group (`unet` or `cnn`), the data (not where it is cached), the
       preprocessing, `data_options` (targets and negative pools), the seed, the batch size and the fold's split; CNNs also the mining
       settings (their negatives), U-Nets with a hard-negative round the matching radius (it
       decides which detections are false); both also `inference.candidate_point` when it is not `centroid`
       (where those negatives lie);
    2. minus the settings of parts that do not run (the hard-negative round at `refine.steps` 0,
       the transplant source and the synthetic-CMB settings when no sampling mix draws them) and of the health check
       (it keeps a healthy member as it is; a retrained one says so in done.json);
    3. minus every setting at its off value (null, false, 0, empty; `without_off`): an option that
       is off trains the same member as no option at all, so a new option whose default is off
       leaves every finished member valid.
    """
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}")
    keep = {"stage": OmegaConf.to_container(cfg[stage], resolve=True), "data": OmegaConf.to_container(cfg.data, resolve=True),
            "preprocess": OmegaConf.to_container(cfg.preprocess, resolve=True),
            "data_options": OmegaConf.to_container(cfg.data_options, resolve=True), "seed": int(cfg.seed),
            "batch_size": int(batch_size), "split": split, "schema": SETTINGS_SCHEMA}
    keep["data"].pop("cache_dir", None)
    keep["stage"].pop("health", None)
    if stage == "cnn":
        keep["mining"] = OmegaConf.to_container(cfg.mining, resolve=True)
    refine = keep["stage"].get("refine") or {}
    hard_negatives = stage == "unet" and bool(refine.get("steps"))
    if hard_negatives:
        keep["match_radius_mm"] = float(cfg.eval.match_radius_mm)
    else:
        keep["stage"].pop("refine", None)
    point = candidate_point(cfg)
    if point != "centroid" and (stage == "cnn" or hard_negatives):  # where the mimics or hard negatives lie; left out at the default
        keep["candidate_point"] = point
    for kind in ("transplant", "synthetic"):  # a kind's settings count only when a mix draws it
        if not stage_draws(keep["stage"], kind):
            keep["stage"].pop(kind, None)
    return without_off(keep)


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_stamp(settings: dict[str, Any]) -> dict[str, Any]:
    """What started.json and done.json record of the settings a member was trained with."""
    return {"settings_hash": settings_hash(settings), "settings_schema": SETTINGS_SCHEMA}


def stamp_matches(stamp: Path, expected_hash: str) -> bool:
    """Whether a member's done.json or started.json records `expected_hash`. A member stamped under another
    settings schema (an earlier cmb) is refused with that reason; an unreadable stamp is refused too."""
    try:
        saved = json.loads(stamp.read_text())
        saved_hash, schema = saved.get("settings_hash"), saved.get("settings_schema", 1)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ConfigError(f"{stamp}: unreadable; delete the member folder {stamp.parent} to retrain it") from None
    if schema != SETTINGS_SCHEMA:
        raise ConfigError(f"{stamp.parent}: trained by an earlier cmb (settings schema {schema}, now {SETTINGS_SCHEMA}), whose "
                          "settings cannot be compared; use a new run (name=...) or delete the member folder (nothing was written)")
    return saved_hash == expected_hash


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


def fold_key(fold: int | str) -> list[int]:
    """A fold as seed entropy: [0, k] for fold k, [1] for the final models (distinct for every fold count)."""
    return [1] if fold == FINAL else [0, int(fold)]


def member_seed(run_seed: int, stage: str, fold: int | str, batch_size: int, attempt: int = 0, round_: int = 0) -> int:
    """The seed of one training round of one member: a hash of (run seed, stage, fold, batch size, health-check
    attempt, round: 0 first, 1 hard-negative), so no two members, attempts or rounds of any run share a seed."""
    entropy = [int(run_seed), STAGES.index(stage), int(batch_size), int(attempt), int(round_), *fold_key(fold)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seeded_subset(scans: list[str], limit: int | None, seed: int, fold: int | str) -> list[str]:
    """All `scans`, or `limit` of them drawn by (seed, fold), sorted."""
    if limit is None or int(limit) >= len(scans):
        return list(scans)
    order = np.random.default_rng([int(seed), *fold_key(fold)]).permutation(len(scans))
    return sorted(scans[i] for i in order[: int(limit)])
