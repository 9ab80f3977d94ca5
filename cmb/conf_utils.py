"""Shared plumbing for the Hydra entry points (train.py, infer.py, python -m ...)."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cmb.errors import CMBError, exit_on_user_error

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
log = logging.getLogger("cmb")


def hydra_entry(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a Hydra task: user errors become one line on stderr and exit status 2 (`exit_on_user_error`)."""
    return exit_on_user_error(fn)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CONFIG_DIR.parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(cfg: DictConfig | None = None, **extra: Any) -> dict:
    """Versions, git commit, seed and host facts for a run folder's metadata.json."""
    import monai
    import numpy
    import pytorch_lightning
    import torch

    import cmb

    meta = {
        "cmb": cmb.__version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lightning": pytorch_lightning.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "command": " ".join(sys.argv),
    }
    if cfg is not None and "seed" in cfg:
        meta["seed"] = int(cfg.seed)
    meta.update(extra)
    return meta


def write_config_and_metadata(folder: Path, cfg: DictConfig, **extra: Any) -> None:
    from cmb.data.io import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), folder / "config.yaml")
    atomic_write_text(json.dumps(run_metadata(cfg, **extra), indent=1), folder / "metadata.json")


def require_cache_folder(cfg: DictConfig) -> None:
    """Refuse up front a cache folder (`paths.cache_dir`, set by CMB_CACHE) that is a file or cannot be written: every
    train.py and infer.py command may write to it (synthetic data, preprocessed scans)."""
    from cmb.data.io import require_writable

    require_writable(Path(str(cfg.paths.cache_dir)).expanduser(), "cache folder (paths.cache_dir, or CMB_CACHE)")


def instantiate_checked(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` that lets our own `CMBError` through unwrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, CMBError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


# what a saved run folder's config may name as `data._target_` (benchmarks rebuild the run's dataset)
DATASET_TARGETS = ("cmb.data.readers.NiftiDataset", "cmb.data.readers.ValdoDataset", "cmb.data.readers.DouDataset",
                   "cmb.data.readers.SyntheticDataset")


def names_target(value: Any) -> bool:
    """Whether a config value (or anything nested in it) carries a `_target_` key."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(value, (dict, DictConfig)):
        return "_target_" in value or any(names_target(v) for v in value.values())
    if isinstance(value, (list, tuple, ListConfig)):
        return any(names_target(v) for v in value)
    return False


def refuse_code(node: Any, key: str, allowed: tuple[str | None, ...], allowed_what: str, source: str | Path) -> None:
    """A saved config node may name only an allow-listed `_target_` and no nested one: a run folder is data,
    never code. Raises `DataError` naming `source`."""
    from cmb.errors import DataError

    target = node.get("_target_")
    if target not in allowed:
        raise DataError(source, f"{key}._target_ {target!r} is not allowed: it is not one of {allowed_what} "
                                f"{[a for a in allowed if a]}")
    if any(names_target(node[k]) for k in node if k != "_target_"):
        raise DataError(source, f"a nested _target_ in the {key} settings is not allowed (a run folder is data, not code)")


def dataset_from_run_config(node: Any, source: Path) -> Any:
    """The dataset of a saved run config, built only from an allow-listed reader class with plain values:
    a run folder is data, never code, so nothing else it names is imported or called."""
    from omegaconf import DictConfig

    from cmb.errors import DataError

    if not isinstance(node, DictConfig):
        raise DataError(source, f"data settings {node!r} are not a mapping")
    refuse_code(node, "data", DATASET_TARGETS, "the dataset readers", source)
    return instantiate_checked(node)


def attach_run_log(run_dir: Path) -> Path:
    """Also write this process's log records to `run_dir/logs/<script>-<time>-<pid>.log` (once per folder)."""
    import time

    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == (run_dir / "logs").resolve():
            return Path(handler.baseFilename)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = run_dir / "logs" / f"{Path(sys.argv[0]).stem or 'cmb'}-{time.strftime('%Y-%m-%d_%H-%M-%S')}-{os.getpid()}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
    return path
