"""Out-of-fold detection: each fold's members on its held-out scans, exactly as infer.py deploys them.

`unet_candidates/<scan>.csv`: components of the combined U-Net map at `inference.unet_threshold`
(cmb.inference.candidates), with the CMBs each hits (and each one's peak point where stage 2 looks there
too, `inference.stage2_window=max_far`); `cnn_scores/<scan>.csv`: the same candidates with the CNNs' score,
each at the point of the window scored (cmb.inference.cnn_scores) and with the CMBs that point hits (the
stage-2 threshold is applied only when evaluating or deploying).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cmb.data.io import atomic_write_text
from cmb.data.preprocess import Preprocessed
from cmb.data.scan import Scan
from cmb.eval.matching import Truth, hit_sets
from cmb.errors import DataError
from cmb.inference.candidates import PEAK_POINT_COLUMNS, candidate_points, extract_candidates, read_candidates, write_candidates
from cmb.inference.cnn_scores import score_candidates
from cmb.layout import SETTINGS_FILE
from cmb.protocol.mining import MissingPrerequisite, scan_truth
from cmb.protocol.scans import RunTiming

log = logging.getLogger(__name__)


def hits_column(points: np.ndarray, truth: Truth, radius_mm: float) -> list[str]:
    """Per detection (N, 3 voxel points), the CMBs it hits as 'i;j' (matching rule of docs/design.md)."""
    return [";".join(str(h) for h in hs) for hs in hit_sets(points, truth, radius_mm)]


def write_truth_file(path: Path, scan: Scan, fold: int) -> None:
    """`truth/<scan>.json`: the CMB count, centroids and, from label components, each CMB's
    equivalent-sphere diameter in mm (null for centroid-only truth)."""
    voxel_mm3 = float(np.prod(scan.spacing_mm))
    diameters = [round(float((6 * c.n_voxels * voxel_mm3 / np.pi) ** (1 / 3)), 3) if scan.instances is not None and c.n_voxels > 0
                 else None for c in scan.cmbs]
    atomic_write_text(json.dumps({"scan_id": scan.scan_id, "fold": fold, "n_cmbs": len(scan.cmbs),
                                  "centroids_vox": scan.centroids_vox.round(3).tolist(), "diameters_mm": diameters}), path)


def fresh_output_folder(out: Path, settings: dict[str, Any]) -> Path:
    """`out`, emptied (with a warning) when its files came from other settings, then stamped with `settings`:
    derived files are recomputed, never reported on stale settings."""
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


def heldout_unet_candidates(scan_ids: list[str], fold: int, load: Callable[[str], tuple[Scan, Preprocessed]],
                            unet_map: Callable[[Preprocessed], np.ndarray], threshold: float, match_radius_mm: float,
                            out: Path, truth_dir: Path, timing: RunTiming,
                            mining: tuple[Path, float] | None = None, point: str = "centroid", with_peak_point: bool = False) -> None:
    """`out/<scan>.csv` for each held-out scan: components of the combined map >= `threshold` and the CMBs
    they hit; `truth_dir/<scan>.json`. `mining` (folder, threshold): also the components at the mining
    threshold (mining.mode=paper). `point`: where each candidate is placed (`inference.candidate_point`);
    `with_peak_point`: each also carries its peak point (for `inference.stage2_window=max_far`)."""
    for scan_id in scan_ids:
        scan, pre = load(scan_id)
        t = time.perf_counter()
        prob = unet_map(pre)
        cands = extract_candidates(prob, threshold, scan.affine, scan_id, point=point, with_peak_point=with_peak_point)
        timing.add("stage1_inference", time.perf_counter() - t, "n_stage1_scans")
        points = candidate_points(cands)
        write_candidates(cands, out / f"{scan_id}.csv", {"hits": hits_column(points, scan_truth(scan), match_radius_mm)})
        if mining is not None:
            mining_out, mining_threshold = mining
            pool = extract_candidates(prob, mining_threshold, scan.affine, scan_id, point=point)
            pool_points = candidate_points(pool)
            write_candidates(pool, mining_out / f"{scan_id}.csv", {"hits": hits_column(pool_points, scan_truth(scan), match_radius_mm)})
        write_truth_file(truth_dir / f"{scan_id}.json", scan, fold)


def heldout_cnn_scores(scan_ids: list[str], candidates: Path, load: Callable[[str], tuple[Scan, Preprocessed]], nets: list[nn.Module],
                       tta: bool, device: str, out: Path, timing: RunTiming, match_radius_mm: float, fusion: str = "cnn",
                       window: str = "candidate") -> None:
    """`out/<scan>.csv`: every candidate of `candidates/<scan>.csv` with its detection score (the CNN ensemble's,
    fused with the stage-1 peak by `fusion`, looking where `window` says; cmb.inference.cnn_scores), at the point
    of the window scored, and the CMBs that point hits within `match_radius_mm` (also the `max_far` distance)."""
    for scan_id in scan_ids:
        source = candidates / f"{scan_id}.csv"
        if not source.is_file():
            raise MissingPrerequisite(f"{source}: no U-Net candidates; run `python train.py stage=fold` for this fold")
        cands, _ = read_candidates(source)
        if window != "candidate" and any(c.peak_point is None for c in cands):
            raise DataError(source, f"no peak points ({', '.join(PEAK_POINT_COLUMNS)}), which inference.stage2_window={window} needs; "
                                    "delete the fold's unet_candidates folder and re-run train.py to recompute it")
        scan, pre = load(scan_id)
        t = time.perf_counter()
        scored = score_candidates(nets, np.asarray(pre.image), cands, tta=tta, device=device, fusion=fusion, window=window,
                                  affine=scan.affine, far_mm=match_radius_mm)
        timing.add("stage2_inference", time.perf_counter() - t, "n_stage2_scans")
        write_candidates(scored, out / f"{scan_id}.csv", {"hits": hits_column(candidate_points(scored), scan_truth(scan), match_radius_mm)})
