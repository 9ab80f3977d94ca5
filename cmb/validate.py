"""Settings checked at the door: every value a user commonly types on the command line is checked
before anything is read or written, and a bad one is one line naming the key, the value and what
is allowed (a `ConfigError`: exit status 2).

Hydra itself refuses unknown keys and malformed overrides before `main` runs.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

from cmb.errors import ConfigError

STAGES = ("unet", "cnn", "mine", "fold", "all")
STAGE1_MODES = ("fast", "faithful")


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, DictConfig) else None
    return node


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def probability(cfg: DictConfig, key: str, *, allow_none: bool = False, open_low: bool = False) -> None:
    """`key` must be a number in [0, 1] ((0, 1] with `open_low`), or null with `allow_none`."""
    value = _get(cfg, key)
    if value is None and allow_none:
        return
    low = "(0" if open_low else "[0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not (
            (0 < value if open_low else 0 <= value) and value <= 1):
        raise ConfigError(f"{key}={value!r} is not allowed: a number in {low}, 1]{' or null' if allow_none else ''}")


def integer(cfg: DictConfig, key: str, minimum: int, why: str = "") -> None:
    value = _get(cfg, key)
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{key}={value!r} is not allowed: a whole number >= {minimum}{why}")


def positive_number(cfg: DictConfig, key: str) -> None:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ConfigError(f"{key}={value!r} is not allowed: a number > 0")


def one_of(cfg: DictConfig, key: str, allowed: tuple, allow_none: bool = False) -> None:
    value = _get(cfg, key)
    if (value is None and allow_none) or value in allowed:
        return
    raise ConfigError(f"{key}={value!r} is not allowed: one of {', '.join(map(str, allowed))}{' or null' if allow_none else ''}")


def fold_value(cfg: DictConfig, key: str = "fold", allow_none: bool = False) -> None:
    value = _get(cfg, key)
    if (value is None and allow_none) or value == "final" or (_is_int(value) and value >= 0):
        return
    raise ConfigError(f"{key}={value!r} is not allowed: a fold number (0, 1, ...) or 'final'{' or null' if allow_none else ''}")


def check_train(cfg: DictConfig) -> None:
    """The settings of `train.py` (see conf/train.yaml and its groups)."""
    one_of(cfg, "stage", STAGES)
    fold_value(cfg)
    integer(cfg, "batch_size", 2, " (batch norm needs at least 2 windows per batch)")
    integer(cfg, "seed", 0)
    for stage_key in ("model", "cnn"):
        integer(cfg, f"{stage_key}.max_steps", 1)
        integer(cfg, f"{stage_key}.steps_per_epoch", 1)
        sizes = _get(cfg, f"{stage_key}.batch_sizes")
        if not sizes or any(not _is_int(b) or b < 2 for b in sizes):
            raise ConfigError(f"{stage_key}.batch_sizes={list(sizes) if sizes else sizes!r} is not allowed: a list of whole numbers >= 2")
    probability(cfg, "inference.stage1_threshold", open_low=True)
    probability(cfg, "mining.threshold", open_low=True)
    one_of(cfg, "inference.stage1.mode", STAGE1_MODES)
    one_of(cfg, "mining.mode", ("leak_free", "paper"))
    positive_number(cfg, "eval.target_fp_per_scan")
    positive_number(cfg, "eval.match_radius_mm")


def check_infer(cfg: DictConfig) -> None:
    """The settings of `infer.py` (conf/infer.yaml)."""
    probability(cfg, "threshold", allow_none=True)
    one_of(cfg, "stage1_mode", STAGE1_MODES, allow_none=True)
    fold_value(cfg, allow_none=True)
    for key in ("overwrite", "progress"):
        if not isinstance(_get(cfg, key), bool):
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not allowed: true or false")
