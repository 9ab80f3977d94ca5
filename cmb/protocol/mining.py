"""Mimics: U-Net false positives that stage 2 learns to reject; and stage-1 hits, the U-Net components
that hit a training CMB, where the U-Nets place them (stage 2's "hit" windows, a positive kind).

leak_free: fold k's own U-Nets on fold k's training scans (a seeded subset of `max_scans`), at the
mining threshold. paper (Rau et al.): each training scan's mimics are the false positives of the
fold that held it out, read from that fold's `paper_mining/` components (`cmb.validate.MINING_MODES`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cmb.data.preprocess import Preprocessed
from cmb.data.scan import Scan
from cmb.errors import CMBError
from cmb.eval.matching import Truth, hit_sets
from cmb.inference.candidates import Candidate, candidate_points, extract_candidates, read_candidates, write_candidates

log = logging.getLogger(__name__)



class MissingPrerequisite(CMBError):
    """A step needs the output of an earlier step that is not there yet."""


def scan_truth(scan: Scan) -> Truth:
    return Truth(scan.centroids_vox, scan.spacing_mm, scan.instances)


def split_components(prob: np.ndarray, threshold: float, scan: Scan, match_radius_mm: float,
                     point: str = "centroid") -> tuple[list[Candidate], list[Candidate]]:
    """Components of `prob >= threshold` (I, J, K), placed by `point` (`inference.candidate_point`): (those that
    hit no CMB of `scan`, those that hit one), by the matching rule of docs/design.md."""
    cands = extract_candidates(prob, threshold, scan.affine, scan.scan_id, point=point)
    hits = hit_sets(candidate_points(cands), scan_truth(scan), match_radius_mm)
    return [c for c, h in zip(cands, hits) if not h], [c for c, h in zip(cands, hits) if h]


def false_positives(prob: np.ndarray, threshold: float, scan: Scan, match_radius_mm: float, point: str = "centroid") -> list[Candidate]:
    """Components of `prob >= threshold` (I, J, K) that hit no CMB of `scan` (matching rule of docs/design.md)."""
    return split_components(prob, threshold, scan, match_radius_mm, point)[0]


def mine_leak_free(scan_ids: list[str], load: Callable[[str], tuple[Scan, Preprocessed]],
                   unet_map: Callable[[Preprocessed], np.ndarray], threshold: float, match_radius_mm: float, out: Path,
                   hits_out: Path, point: str = "centroid") -> None:
    """`out/<scan>.csv`: the false positives of the fold's combined U-Net map (`unet_map`) at `threshold`;
    `hits_out/<scan>.csv`: its components that hit a CMB, where the U-Nets place them (the "hit" windows of
    stage 2). A file already there is kept (`_write_missing`)."""
    hits_out.mkdir(parents=True, exist_ok=True)
    for scan_id in scan_ids:
        scan, pre = load(scan_id)
        mimics, hits = split_components(unet_map(pre), threshold, scan, match_radius_mm, point)
        _write_missing(scan_id, (mimics, out), (hits, hits_out))


def mine_paper(scan_ids: list[str], heldout_components: Callable[[str], Path], out: Path, hits_out: Path) -> None:
    """`out/<scan>.csv`: the components that hit no CMB among the held-out components of the fold that held
    each scan out (`heldout_components(scan_id)` -> its paper_mining CSV); `hits_out/<scan>.csv`: those that hit one.
    A file already there is kept (`_write_missing`)."""
    hits_out.mkdir(parents=True, exist_ok=True)
    for scan_id in scan_ids:
        path = heldout_components(scan_id)
        if not path.is_file():
            raise MissingPrerequisite(f"{path}: paper-style mining needs the out-of-fold U-Net components of the fold that held "
                                      f"{scan_id} out")
        cands, rows = read_candidates(path)
        mimics = [c for c, r in zip(cands, rows) if not r["hits"]]
        _write_missing(scan_id, (mimics, out), ([c for c, r in zip(cands, rows) if r["hits"]], hits_out))


def _write_missing(scan_id: str, mimics: tuple[list[Candidate], Path], hits: tuple[list[Candidate], Path]) -> None:
    """Write one scan's mimics and stage-1 hits, each into its folder unless its file is already there (mined by
    the same U-Nets on the same scan: the same components; a run from before stage-1 hits were kept lacks only those)."""
    for found, folder in (mimics, hits):
        if not (folder / f"{scan_id}.csv").is_file():
            write_candidates(found, folder / f"{scan_id}.csv")
    log.info("%d mimics and %d stage-1 hits mined on %s", len(mimics[0]), len(hits[0]), scan_id)
