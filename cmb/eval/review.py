"""`review/` of a finished run: for each held-out scan, pictures of the CMBs the two stages miss
at the chosen threshold and of the highest-scoring false positives, so a researcher sees at once
what fools the detector (veins, nuclei, calcifications, or a CMB stage 1 never found).

The scans are read through the run's own dataset settings (allow-listed readers only); the
marks are the out-of-fold files' positions (canonical RAS voxels) and the truth centroids.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cmb.errors import CMBError
from cmb.eval.matching import FP
from cmb.eval.run_files import ScanRecord
from cmb.eval.scan_metrics import found_cmbs
from cmb.data.resample import working_scan
from cmb.layout import TRUTH, RunLayout

log = logging.getLogger("cmb")

N_FALSE_POSITIVES = 8  # highest-scoring false positives pictured per scan


def review_tiles(record: ScanRecord, centroids: np.ndarray, threshold: float, n_false_positives: int = N_FALSE_POSITIVES) -> list:
    """Tiles of one held-out scan: its missed CMBs (red; with the best stage-1 peak and stage-2 score of a
    candidate on it, if stage 1 found it at all), then its top false positives at `threshold` (yellow)."""
    from cmb.pictures import Tile

    two = record.two_stage
    found = found_cmbs(two.scores, two.status, threshold)
    tiles = []
    for cmb in range(record.n_cmbs):
        if cmb in found:
            continue
        on_it = two.status == cmb  # the candidate matched to it over the whole sweep (stage 1 found it)
        size = record.diameters_mm[cmb] if cmb < len(record.diameters_mm) else None
        why = (f"stage 2 score {float(two.scores[on_it].max()):.3f} < {threshold:g}" if on_it.any()
               else "not a stage-1 candidate")
        tiles.append(Tile(centroids[cmb], f"missed CMB {cmb}" + (f", {size:.1f} mm" if size else "") + f"\n{why}", "red"))
    false_pos = np.flatnonzero((two.scores >= threshold) & (two.status == FP))
    false_pos = false_pos[np.argsort(-two.scores[false_pos], kind="stable")][:n_false_positives]
    for n in false_pos:
        tiles.append(Tile(two.points[n], f"false positive\nscore {float(two.scores[n]):.3f}", "yellow"))
    return tiles


def write_review(run_dir: Path, cfg: Any, records: list[ScanRecord], threshold: float) -> Path | None:
    """Write `run_dir`/review/<scan>.png and review/index.html; None (with a warning) when the run's scans
    cannot be read any more (moved or deleted data): the evaluation itself does not need them."""
    import json

    from cmb.conf_utils import dataset_from_run_config
    from cmb.data.preprocess import PreprocessConfig
    from cmb.pictures import write_index, write_tiles

    layout = RunLayout(run_dir)
    out = layout.review
    try:
        dataset = dataset_from_run_config(cfg.data, layout.config)
        spacing = PreprocessConfig.from_settings(cfg.preprocess, layout.config).spacing  # the grid the run's files are on
    except (CMBError, OSError) as err:
        log.warning("review/ not written: the run's scans cannot be read (%s)", err)
        return None
    rows = []
    for record in records:
        truth = json.loads(layout.scan_file(record.fold, TRUTH, record.scan_id).read_text())
        centroids = np.asarray(truth["centroids_vox"], dtype=float).reshape(-1, 3)
        tiles = review_tiles(record, centroids, threshold)
        try:
            scan = working_scan(dataset.load(record.scan_id), spacing)
        except (CMBError, OSError) as err:
            log.warning("review/%s.png not written: %s", record.scan_id, err)
            continue
        n_missed = sum(t.colour == "red" for t in tiles)
        write_tiles(np.asarray(scan.image), scan.spacing_mm, tiles, out / f"{record.scan_id}.png",
                    f"{record.scan_id} (fold {record.fold}) at threshold {threshold:g}: {n_missed} of {record.n_cmbs} CMBs missed, "
                    f"{len(tiles) - n_missed} highest-scoring false positives")
        rows.append((record.scan_id, len(tiles), None, f"{record.scan_id}.png"))
    write_index(out, rows, f"missed CMBs and top false positives at threshold {threshold:g}: {Path(run_dir).name}",
                count_name="pictured (missed + false positives)")
    return out
