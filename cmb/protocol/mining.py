"""Mimics: U-Net false positives that stage 2 learns to reject.

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
from cmb.inference.candidates import Candidate, extract_candidates, read_candidates, write_candidates

log = logging.getLogger(__name__)



class MissingPrerequisite(CMBError):
    """A step needs the output of an earlier step that is not there yet."""


def scan_truth(scan: Scan) -> Truth:
    return Truth(scan.centroids_vox, scan.spacing_mm, scan.instances)


def false_positives(prob: np.ndarray, threshold: float, scan: Scan, match_radius_mm: float) -> list[Candidate]:
    """Components of `prob >= threshold` (I, J, K) that hit no CMB of `scan` (matching rule of docs/design.md)."""
    cands = extract_candidates(prob, threshold, scan.affine, scan.scan_id)
    hits = hit_sets(np.array([c.voxel for c in cands]).reshape(-1, 3), scan_truth(scan), match_radius_mm)
    return [c for c, h in zip(cands, hits) if not h]


def mine_leak_free(scan_ids: list[str], load: Callable[[str], tuple[Scan, Preprocessed]],
                   unet_map: Callable[[Preprocessed], np.ndarray], threshold: float, match_radius_mm: float, out: Path) -> None:
    """`out/<scan>.csv`: the false positives of the fold's combined U-Net map (`unet_map`) at `threshold`."""
    for scan_id in scan_ids:
        scan, pre = load(scan_id)
        mimics = false_positives(unet_map(pre), threshold, scan, match_radius_mm)
        write_candidates(mimics, out / f"{scan_id}.csv")
        log.info("%d mimics mined on %s", len(mimics), scan_id)


def mine_paper(scan_ids: list[str], heldout_components: Callable[[str], Path], out: Path) -> None:
    """`out/<scan>.csv`: the components that hit no CMB among the held-out components of the fold that held
    each scan out (`heldout_components(scan_id)` -> its paper_mining CSV)."""
    for scan_id in scan_ids:
        path = heldout_components(scan_id)
        if not path.is_file():
            raise MissingPrerequisite(f"{path}: paper-style mining needs the out-of-fold U-Net components of the fold that held "
                                      f"{scan_id} out")
        cands, rows = read_candidates(path)
        mimics = [c for c, r in zip(cands, rows) if not r["hits"]]
        write_candidates(mimics, out / f"{scan_id}.csv")
        log.info("%d mimics mined on %s", len(mimics), scan_id)
