"""Each CNN member's score of a finished run's held-out candidates, and the CMBs stage 2 drops.

    python benchmarks/cnn_members.py runs/lotcv [runs/physics_demo ...] [--cache-dir DIR]

For every fold, the fold's CNN members are loaded and each held-out candidate of
`cnn_scores/<scan>.csv` is scored by one member at a time (cmb.inference.cnn_scores.score_points,
with the run's test-time flips), so their mean reproduces the stored ensemble score. Writes
`<run>/cnn_member_scores.csv` (one row per candidate: fold, scan, hits, stage-1 peak, ensemble
score, one column per member) and prints every CMB that stage 1 found and the nested operating
point drops (its fold's threshold from results.json), with each member's score. No training.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf, open_dict

from cmb.inference.candidates import candidate_points, read_candidates
from cmb.inference.cnn_scores import score_points
from cmb.layout import CNN_SCORES, member_name
from cmb.protocol.run import Protocol


def member_scores(run: Path, cache_dir: str | None) -> list[dict]:
    """One row per held-out candidate of `run` with each CNN member's score."""
    cfg = OmegaConf.load(run / "config.yaml")
    with open_dict(cfg):
        cfg.paths.run_dir = str(run)
        if cache_dir:
            cfg.paths.cache_dir = cache_dir
    protocol = Protocol(cfg)
    names = [member_name("cnn", int(bs)) for bs in cfg.cnn.batch_sizes]
    rows = []
    for fold in range(protocol.n_folds):
        nets = protocol.members("cnn", fold)
        for scan_id in protocol.fold_split(fold)["test"]:
            cands, raw = read_candidates(protocol.layout.scan_file(fold, CNN_SCORES, scan_id))
            _, pre = protocol.store.load(scan_id)
            points = candidate_points(cands)
            per_member = [score_points([net], np.asarray(pre.image), points, tta=bool(cfg.inference.cnn_tta)) for net in nets]
            for n, (cand, row) in enumerate(zip(cands, raw)):
                rows.append({"fold": fold, "scan_id": scan_id, "hits": row["hits"], "peak": round(cand.peak, 4),
                             "score": round(cand.score, 4), **{name: round(float(s[n]), 4) for name, s in zip(names, per_member)}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--cache-dir", default=None, help="the preprocessing cache the runs used (default: their config's)")
    args = parser.parse_args()
    for run in args.runs:
        run = run.resolve()
        rows = member_scores(run, args.cache_dir)
        with open(run / "cnn_member_scores.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        members = [k for k in rows[0] if k.startswith("cnn_")]
        gap = max(abs(float(np.mean([r[m] for m in members])) - r["score"]) for r in rows)
        thresholds = {f["fold"]: f["threshold"] for f in json.loads((run / "results.json").read_text())["nested_operating_point"]["per_fold"]}
        print(f"{run.name}: {len(rows)} candidates; |member mean - stored score| <= {gap:.1e}; nested thresholds {thresholds}")
        for r in rows:
            if r["hits"] and r["score"] < thresholds[r["fold"]]:
                print(f"  dropped: fold {r['fold']} {r['scan_id']} CMB {r['hits']} peak {r['peak']:.2f} score {r['score']:.3f} "
                      + " ".join(f"{m} {r[m]:.3f}" for m in members))


if __name__ == "__main__":
    main()
