"""Leave-two-out cross-validation folds, persisted as `splits.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cmb.data.io import atomic_write_text
from cmb.layout import RunLayout
from cmb.errors import ConfigError, DataError


def lotcv_folds(scan_ids: list[str], seed: int, leave_out: int = 2) -> list[dict]:
    """Seeded folds of `leave_out` held-out scans (the last fold holds the remainder).

    15 scans -> 8 folds: seven of two scans and one of one.
    """
    if len(scan_ids) < 2:
        raise ConfigError(f"cross-validation needs at least 2 scans, the dataset has {len(scan_ids)}")
    order = [scan_ids[i] for i in np.random.default_rng(seed).permutation(len(scan_ids))]
    folds = []
    for k, start in enumerate(range(0, len(order), leave_out)):
        test = sorted(order[start : start + leave_out])
        folds.append({"fold": k, "test": test, "train": sorted(s for s in scan_ids if s not in test)})
    return folds


def validate_splits(splits: dict, scan_ids: list[str], source: str | Path) -> None:
    """Held-out sets must be disjoint, cover every scan once, and name only known scans."""
    folds = splits.get("folds") if isinstance(splits, dict) else None
    if not isinstance(folds, list) or not folds:
        raise DataError(source, "splits file needs a non-empty 'folds' list (a JSON object {\"folds\": [{\"test\": [scan ids]}, ...]})")
    seen: list[str] = []
    for k, fold in enumerate(folds):
        if not isinstance(fold, dict) or "test" not in fold:
            raise DataError(source, f"fold {k} needs a 'test' list")
        if not isinstance(fold["test"], list) or not all(isinstance(s, str) for s in fold["test"]):
            raise DataError(source, f"fold {k}: 'test' must be a list of scan ids (strings), got {fold['test']!r}")
        if fold.get("fold", k) != k:
            raise DataError(source, f"fold {k} is numbered {fold['fold']!r}; folds are numbered by their place in the list (0, 1, ...)")
        unknown = sorted(set(fold["test"]) - set(scan_ids))
        if unknown:
            raise DataError(source, f"fold {k} names scans not in the dataset: {unknown}")
        fold["fold"] = k
        fold["train"] = sorted(s for s in scan_ids if s not in fold["test"])
        if not fold["train"]:
            raise DataError(source, f"fold {k} holds out every scan: nothing is left to train on")
        seen += list(fold["test"])
    duplicated = sorted({s for s in seen if seen.count(s) > 1})
    if duplicated:
        raise DataError(source, f"scans held out in more than one fold: {duplicated}")
    missing = sorted(set(scan_ids) - set(seen))
    if missing:
        raise DataError(source, f"scans never held out: {missing}")


def make_or_load_splits(run_dir: Path, scan_ids: list[str], seed: int, splits_file: str | Path | None = None,
                        write: bool = True) -> dict:
    """The run's splits: a user file if given, else `run_dir/splits.json` if present, else new
    (written to `run_dir/splits.json` unless `write` is False).

    An existing `splits.json` that disagrees with the requested splits is an error
    (never silently replaced).
    """
    if splits_file is not None:
        path = Path(splits_file)
        if not path.is_file():
            raise DataError(path, "splits file does not exist")
        splits = _read_splits_json(path, "splits file")
        validate_splits(splits, scan_ids, path)
        splits = {"seed": None, "source": str(path), "scan_ids": sorted(scan_ids), "folds": splits["folds"]}
    else:
        splits = {"seed": seed, "source": "lotcv", "scan_ids": sorted(scan_ids), "folds": lotcv_folds(sorted(scan_ids), seed)}
    target = RunLayout(run_dir).splits
    if target.is_file():
        existing = _read_splits_json(target, "the run folder's splits.json")
        if not isinstance(existing, dict) or existing.get("folds") != splits["folds"]:
            raise DataError(target, "this run folder already has different splits (other seed, data or splits file); use a new run name")
        return existing
    if write:
        atomic_write_text(json.dumps(splits, indent=1), target)
    return splits


def _read_splits_json(path: Path, what: str) -> Any:
    """The JSON value in `path`; `DataError` naming it for a file that is not JSON text (binary, garbled)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"{what} is not valid JSON ({err.__class__.__name__}: {err})") from None


def select_fold(splits: dict, fold: int) -> dict:
    n = len(splits["folds"])
    if not isinstance(fold, int) or not 0 <= fold < n:
        raise ConfigError(f"fold={fold} is out of range: this dataset has {n} folds (0..{n - 1})")
    return splits["folds"][fold]
