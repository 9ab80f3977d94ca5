"""Read a run folder's out-of-fold files for evaluation, checking every value on the way in.

Per held-out scan: `fold_<k>/truth/<scan>.json`, `fold_<k>/unet_candidates/<scan>.csv` (stage-1
candidates, scored by their peak) and `fold_<k>/cnn_scores/<scan>.csv` (the same candidates with
stage-2 scores; names from `cmb.layout`). A missing, empty, truncated or garbled file, a non-numeric, NaN or
out-of-range score, a `hits` entry naming a CMB the truth does not have, or files written
under other candidate settings raise `DataError` naming the file, before anything is written.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmb.errors import DataError
from cmb.eval.matching import assign
from cmb.inference.candidates import PEAK_POINT_COLUMNS, candidate_point, point_description, stage2_window
from cmb.layout import CNN_SCORES, FOLDER_MEMBERS, MIMICS, PAPER_MINING, SETTINGS_FILE, STAGE1_HITS, TRUTH, UNET_CANDIDATES, RunLayout

POSITION_COLUMNS = ("i", "j", "k")
CANDIDATE_DEFINITION = "26-connected components of the combined stage-1 map >= unet_threshold, score-weighted centroid, peak"


def candidate_definition(cfg: Any) -> str:
    """`CANDIDATE_DEFINITION` with the run's `inference.candidate_point` (unchanged at the default, so out-of-fold
    files stamped before the option stay valid)."""
    return CANDIDATE_DEFINITION.replace("score-weighted centroid", point_description(candidate_point(cfg)))


def candidate_settings(cfg: Any, folder: str) -> dict[str, Any]:
    """Settings that a run's out-of-fold files in `folder` (unet_candidates, cnn_scores, paper_mining, mimics, stage1_hits) depend
    on, besides its members (`folder_settings` adds those)."""
    inf = cfg.inference
    stage1_map = {"ensemble_normalize": str(inf.ensemble_normalize), "unet_mode": str(inf.unet.mode),
                  "match_radius_mm": float(cfg.eval.match_radius_mm)}
    if folder in (MIMICS, STAGE1_HITS):  # mined on training scans at the mining threshold, not at unet_threshold
        max_scans = cfg.mining.get("max_scans")
        return {"mining": {"mode": str(cfg.mining.mode), "threshold": float(cfg.mining.threshold),
                           "max_scans": None if max_scans is None else int(max_scans)},
                **stage1_map, "candidates": candidate_definition(cfg).replace("unet_threshold", "mining.threshold")}
    settings: dict[str, Any] = {"unet_threshold": float(inf.unet_threshold), **stage1_map, "candidates": candidate_definition(cfg)}
    window = stage2_window(cfg)
    if window != "candidate" and folder in (UNET_CANDIDATES, CNN_SCORES):  # left out at the default: files stamped before the option stay valid
        settings["stage2_window"] = window  # unet_candidates then carry peak points, cnn_scores the window scored
    if folder == CNN_SCORES:
        settings["cnn_tta"] = bool(inf.cnn_tta)
        settings["score_fusion"] = str(inf.get("score_fusion", "cnn"))
    if folder == PAPER_MINING:
        settings["mining_threshold"] = float(cfg.mining.threshold)
    return settings


def member_digests(fold_dir: Path, folder: str) -> dict[str, str]:
    """{member folder: SHA-256 (16 hex digits) of its model.pt} for the members `folder`'s files come from,
    so files made by members that were since retrained (deleted and trained again) are recognized as stale."""
    import hashlib

    digests = {}
    for stage in FOLDER_MEMBERS[folder]:
        for model in sorted(Path(fold_dir).glob(f"{stage}_bs*/model.pt")):
            digests[model.parent.name] = hashlib.sha256(model.read_bytes()).hexdigest()[:16]
    return digests


def folder_settings(cfg: Any, fold_dir: Path, folder: str, members: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything a fold's out-of-fold files in `folder` depend on: the candidate settings and the members' files
    (`members`, where the files come from other members than the fold's own; else `member_digests(fold_dir, folder)`)."""
    return {**candidate_settings(cfg, folder), "members": member_digests(fold_dir, folder) if members is None else members}


@dataclass
class StageDetections:
    """One scan's detections of one stage: scores (N,), canonical voxel positions (N, 3), matching status (N,),
    and the components' peak points (N, 3) where the file has them (`PEAK_POINT_COLUMNS`), else None."""

    scores: np.ndarray
    points: np.ndarray
    status: np.ndarray
    peak_points: np.ndarray | None = None


@dataclass
class ScanRecord:
    """Everything evaluation needs of one held-out scan."""

    scan_id: str
    fold: int
    n_cmbs: int
    diameters_mm: list[float | None]
    stage1: StageDetections
    two_stage: StageDetections
    extra: dict[str, Any] = field(default_factory=dict)


def read_truth(path: Path) -> tuple[int, list[float | None]]:
    """(number of CMBs, diameters in mm or None per CMB) from a truth JSON file."""
    if not path.is_file():
        raise DataError(path, "truth file missing; is the run finished?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"truth file is not valid JSON ({err.__class__.__name__}: {err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("n_cmbs"), int) or data["n_cmbs"] < 0:
        raise DataError(path, "truth file has no non-negative integer n_cmbs")
    n = int(data["n_cmbs"])
    cents = data.get("centroids_vox")
    if not isinstance(cents, list) or len(cents) != n:
        raise DataError(path, f"truth file lists {0 if not isinstance(cents, list) else len(cents)} centroids for n_cmbs={n}")
    diameters = data.get("diameters_mm")
    if diameters is None:
        diameters = [None] * n
    if not isinstance(diameters, list) or len(diameters) != n or not all(
            d is None or (isinstance(d, (int, float)) and math.isfinite(d) and d > 0) for d in diameters):
        raise DataError(path, f"truth file's diameters_mm is not a list of {n} positive numbers (or nulls)")
    return n, [None if d is None else float(d) for d in diameters]


def _number(text: str | None, path: Path, line: int, column: str) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(path, f"line {line}: {column} is not a number ({text!r})") from None
    if not math.isfinite(value):
        raise DataError(path, f"line {line}: {column} is {value}")
    return value


def read_detections(path: Path, score_column: str, n_cmbs: int) -> tuple[np.ndarray, np.ndarray, list[list[int]], np.ndarray | None]:
    """(scores (N,), positions (N, 3) canonical voxels, hits per detection, peak points (N, 3) voxels or None
    where the file has no `PEAK_POINT_COLUMNS`) of one candidates CSV.

    Scores must lie in [0, 1]; `hits` entries (';'-separated CMB indices) must name CMBs
    0..n_cmbs-1 of the scan's truth. A header without rows is a scan without candidates.
    """
    if not path.is_file():
        raise DataError(path, "out-of-fold file missing; is the run finished?")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(path, "not a text CSV file") from None
    if not text.strip():
        raise DataError(path, "empty file (not even a header); delete it and re-run train.py to recompute it")
    reader = csv.reader(text.splitlines())
    header = next(reader)
    needed = [*POSITION_COLUMNS, score_column, "hits"]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(path, f"not a candidates file: missing column(s) {', '.join(missing)}")
    peak_columns = list(PEAK_POINT_COLUMNS) if all(c in header for c in PEAK_POINT_COLUMNS) else []
    index = {c: header.index(c) for c in [*needed, *peak_columns]}
    scores, points, hits, peak_points = [], [], [], []
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(path, f"line {line}: {len(row)} fields, expected {len(header)} (truncated or garbled file)")
        score = _number(row[index[score_column]], path, line, score_column)
        if not 0.0 <= score <= 1.0:
            raise DataError(path, f"line {line}: {score_column} {score} is outside [0, 1]")
        scores.append(score)
        points.append([_number(row[index[c]], path, line, c) for c in POSITION_COLUMNS])
        peak_points.append([_number(row[index[c]], path, line, c) for c in peak_columns])
        found = []
        for part in row[index["hits"]].split(";"):
            if part == "":
                continue
            if not part.strip().isdigit() or int(part) >= n_cmbs:
                raise DataError(path, f"line {line}: hits names CMB {part!r}, but the scan's truth has {n_cmbs} CMB(s) (0..{n_cmbs - 1})")
            found.append(int(part))
        hits.append(found)
    return (np.array(scores, dtype=float), np.array(points, dtype=float).reshape(-1, 3), hits,
            np.array(peak_points, dtype=float).reshape(-1, 3) if peak_columns else None)


def check_settings(folder: Path, expected: dict[str, Any] | None) -> None:
    """Refuse out-of-fold files written under other candidate settings than the run's config."""
    if expected is None:
        return
    stamp = folder / SETTINGS_FILE
    if not stamp.is_file():
        raise DataError(folder, "out-of-fold files without settings.json (written by an older cmb, whose out-of-fold candidates were "
                                "not the ones infer.py deploys); re-run `python train.py` with the run's settings to recompute them")
    try:
        saved = json.loads(stamp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(stamp, "not valid JSON") from None
    if saved != expected:
        diff = {k: (saved.get(k), expected.get(k)) for k in sorted(set(saved) | set(expected))
                 if saved.get(k) != expected.get(k) and k != "members"}
        what = [f"{k}: {a!r} here, {b!r} in config" for k, (a, b) in diff.items()]
        saved_members = saved.get("members") or {}
        changed = sorted(m for m in set(saved_members) | set(expected.get("members", {}))
                         if saved_members.get(m) != expected.get("members", {}).get(m))
        if changed:
            what.append(f"made by other model files than the run's {', '.join(changed)} (retrained since)")
        raise DataError(folder, f"out-of-fold files were written with other settings ({'; '.join(what)}); "
                                "re-run `python train.py` with the run's settings to recompute them")


def scores_the_candidates(scored_points: np.ndarray, stage1: StageDetections) -> bool:
    """Whether each row of a cnn_scores file ((N, 3) voxels) lies at its stage-1 candidate's point or, where stage 2
    took the peak window (`inference.stage2_window=max_far`), at that candidate's peak point."""
    moved = ~np.all(np.isclose(scored_points, stage1.points), axis=1)
    if not moved.any():
        return True
    return stage1.peak_points is not None and bool(np.allclose(scored_points[moved], stage1.peak_points[moved]))


def _stage(path: Path, score_column: str, n_cmbs: int) -> StageDetections:
    scores, points, hits, peak_points = read_detections(path, score_column, n_cmbs)
    return StageDetections(scores, points, assign(scores, hits, points), peak_points)


def read_run(run_dir: Path, splits: dict, cfg: Any | None = None) -> list[ScanRecord]:
    """One record per held-out scan of every fold (fold order, then the fold's test order); with the run's
    `cfg`, files written under other settings or by other model files are refused (`folder_settings`)."""
    records = []
    layout = RunLayout(run_dir)
    for fold in splits["folds"]:
        k = fold["fold"]
        for folder in (UNET_CANDIDATES, CNN_SCORES):
            check_settings(layout.fold_folder(k, folder), None if cfg is None else folder_settings(cfg, layout.fold_dir(k), folder))
        for scan_id in fold["test"]:
            n_cmbs, diameters = read_truth(layout.scan_file(k, TRUTH, scan_id))
            candidates, scored = layout.scan_file(k, UNET_CANDIDATES, scan_id), layout.scan_file(k, CNN_SCORES, scan_id)
            stage1 = _stage(candidates, "peak", n_cmbs)
            two_stage = _stage(scored, "score", n_cmbs)
            if len(two_stage.scores) != len(stage1.scores) or not scores_the_candidates(two_stage.points, stage1):
                raise DataError(scored, f"does not score the {len(stage1.scores)} stage-1 candidates of {candidates}; delete it and "
                                "re-run train.py to recompute it")
            records.append(ScanRecord(scan_id, int(fold["fold"]), n_cmbs, diameters, stage1, two_stage))
    return records
