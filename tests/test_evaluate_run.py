"""`python -m cmb.eval` on small hand-made run folders (no training): nested and in-sample operating
points, bootstrap intervals, per-scan figures, the report, and every kind of bad input file."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from cmb.eval.__main__ import main as eval_main
from cmb.eval.matching import Truth, assign, hit_sets
from cmb.eval.run_files import ScanRecord, StageDetections, folder_settings
from cmb.inference.candidates import Candidate, write_candidates

REPO = Path(__file__).resolve().parents[1]


def _config(target_fp: float) -> OmegaConf:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"eval.target_fp_per_scan={target_fp}", "eval.log=false", "eval.review=false",
                                                      "eval.bootstrap.n_resamples=200"])
    return cfg


def make_run(root: Path, scans: dict[str, dict], folds: list[list[str]], target_fp: float = 1.0) -> Path:
    """A run folder holding only what evaluation reads. `scans[id]`: centroids (N, 3), diameters,
    detections [(i, j, k, stage-1 peak, stage-2 score)]."""
    cfg = _config(target_fp)
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (root / "splits.json").write_text(json.dumps({"source": "lotcv", "seed": 0, "scan_ids": sorted(scans),
                                                  "folds": [{"fold": k, "test": t, "train": []} for k, t in enumerate(folds)]}))
    for k, test in enumerate(folds):
        fdir = root / f"fold_{k}"
        for folder in ("unet_candidates", "cnn_scores"):
            (fdir / folder).mkdir(parents=True)
            (fdir / folder / "settings.json").write_text(json.dumps(folder_settings(cfg, fdir, folder)))
        for scan_id in test:
            s = scans[scan_id]
            cents = np.array(s["centroids"], dtype=float).reshape(-1, 3)
            (fdir / "truth").mkdir(exist_ok=True)
            (fdir / "truth" / f"{scan_id}.json").write_text(json.dumps({"scan_id": scan_id, "fold": k, "n_cmbs": len(cents),
                                                                        "centroids_vox": cents.tolist(), "diameters_mm": s["diameters"]}))
            dets = s["detections"]
            points = np.array([d[:3] for d in dets], dtype=float).reshape(-1, 3)
            hits = [";".join(map(str, h)) for h in hit_sets(points, Truth(cents, (0.5, 0.5, 1.0)), 2.5)]
            stage1 = [Candidate(scan_id, *d[:3], 0.0, 0.0, 0.0, d[3], d[3], 5, d[3]) for d in dets]
            write_candidates(stage1, fdir / "unet_candidates" / f"{scan_id}.csv", {"hits": hits})
            two = [Candidate(scan_id, *d[:3], 0.0, 0.0, 0.0, d[3], d[3], 5, d[4]) for d in dets]
            write_candidates(two, fdir / "cnn_scores" / f"{scan_id}.csv", {"hits": hits})
    return root


# scan A (fold 0): its CMB scores 0.55, two FPs at 0.95 and 0.75; scan B (fold 1): its CMB 0.85, FPs at 0.65 and 0.35
TWO_SCANS = {
    "A": {"centroids": [[10, 10, 10]], "diameters": [2.0], "detections": [(10, 10, 10, 0.9, 0.55), (30, 30, 20, 0.9, 0.95), (40, 40, 20, 0.5, 0.75)]},
    "B": {"centroids": [[20, 20, 10]], "diameters": [6.0], "detections": [(20, 20, 10, 0.9, 0.85), (30, 30, 20, 0.3, 0.65), (5, 5, 5, 0.25, 0.35)]},
}


def test_the_evaluation_logs_through_the_configured_loggers_and_sweeps_the_configured_grid(tmp_path: Path) -> None:
    from cmb.eval.evaluate import evaluate_run

    run = make_run(tmp_path / "run", TWO_SCANS, [["A"], ["B"]], target_fp=1.0)
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.eval.log = True
    cfg.eval.thresholds = {"start": 0.5, "stop": 0.9, "step": 0.1}
    cfg.logger = {"csv": {"_target_": "pytorch_lightning.loggers.CSVLogger", "name": "csv"}}
    results = evaluate_run(run, cfg)
    assert [p["threshold"] for p in results["operating_points"]] == [0.5, 0.6, 0.7, 0.8, 0.9]
    logged = list((run / "logs" / "eval").glob("csv/*/metrics.csv"))
    assert len(logged) == 1
    with open(logged[0], newline="") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["eval/cpm"]) == pytest.approx(results["froc"]["cpm"])
    assert float(row["eval/nested_sensitivity"]) == results["nested_operating_point"]["sensitivity"]


def test_nested_and_in_sample_operating_points_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path / "run", TWO_SCANS, [["A"], ["B"]], target_fp=1.0)
    assert eval_main([str(run)]) == 0
    assert "nested thresholds: sensitivity 0.000" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    chosen = results["chosen_operating_point"]
    # on both scans (budget 1 FP/scan = 2 FPs): B's CMB with one FP (0.95) at thresholds up to 0.85
    assert (chosen["threshold"], chosen["sensitivity"], chosen["fp_per_scan"]) == (0.85, 0.5, 0.5)
    assert chosen["within_budget"] and chosen["selection"].startswith("in-sample")
    nested = results["nested_operating_point"]
    # fold 0 chooses on B alone: 0.85 (its CMB, no FP) -> on A: no CMB, one FP (0.95)
    # fold 1 chooses on A alone: nothing within budget finds A's CMB, highest threshold 1.0 -> on B: nothing
    assert [f["threshold"] for f in nested["per_fold"]] == [0.85, 1.0]
    assert (nested["tp"], nested["fp"], nested["sensitivity"], nested["fp_per_scan"]) == (0, 1, 0.0, 0.5)
    assert nested["selection"].startswith("nested")
    # stage 1 at its threshold keeps every candidate; both CMBs found
    assert results["stage1"]["sensitivity"] == 1.0 and results["stage1"]["fp_per_scan"] == 2.0
    assert results["stage1"]["best_at_budget"]["selection"].startswith("in-sample")
    assert results["froc"]["max_fp_per_scan_reached"] == 2.0
    by_size = results["sensitivity_by_size"]["two_stage_chosen"]
    assert by_size["< 3 mm"]["found"] == 0 and by_size["> 5 mm"]["found"] == 1
    assert [s["f1"] for s in results["per_scan"]] == [0.0, 1.0]  # at 0.85 A keeps only its FP (0.95), B only its CMB
    report = (run / "report.md").read_text()
    assert "nested (honest)" in report and "in-sample" in report and "the paper's budget" in report
    assert "VALDO" in report and "F1" in report and "bootstrap" in report
    assert (run / "froc.png").stat().st_size > 1000


def _many_scans(n: int, seed: int) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    scans = {}
    for s in range(n):
        cents = rng.uniform(10, 50, (int(rng.integers(0, 4)), 3)).round(1)
        dets = [(*c, rng.uniform(0.2, 1), rng.uniform(0.3, 1)) for c in cents if rng.uniform() < 0.85]
        dets += [(*rng.uniform(60, 90, 3).round(1), rng.uniform(0.2, 1), rng.uniform(0, 0.9)) for _ in range(int(rng.integers(0, 6)))]
        scans[f"s{s:02d}"] = {"centroids": cents.tolist(), "diameters": [float(d) for d in rng.uniform(1.5, 7, len(cents))], "detections": dets}
    return scans


def test_bootstrap_intervals_are_seeded_and_bracket_the_estimates(tmp_path: Path) -> None:
    scans = _many_scans(12, 0)
    ids = sorted(scans)
    run = make_run(tmp_path / "run", scans, [ids[i:i + 2] for i in range(0, 12, 2)], target_fp=2.0)
    assert eval_main([str(run)]) == 0
    first = json.loads((run / "results.json").read_text())
    ci = first["confidence_intervals"]
    assert ci["n_resamples"] == 200 and ci["level"] == 0.95 and ci["seed"] == 0
    for name in ("chosen_operating_point", "nested_operating_point", "stage1"):
        point = first[name]
        lo, hi = ci[name]["sensitivity"]
        assert lo <= point["sensitivity"] <= hi and lo < hi
    lo, hi = ci["froc"]["cpm"]
    assert lo <= first["froc"]["cpm"] <= hi
    assert set(ci["froc"]["sensitivity_at_fp"]) == set(first["froc"]["sensitivity_at_fp"])
    assert eval_main([str(run)]) == 0  # same seed, same intervals
    assert json.loads((run / "results.json").read_text())["confidence_intervals"] == ci


def test_bootstrap_of_identical_scans_has_no_spread() -> None:
    from cmb.eval.bootstrap import bootstrap

    status = assign(np.array([0.9, 0.4]), [[0], []])
    det = StageDetections(np.array([0.9, 0.4]), np.zeros((2, 3)), status)
    records = [ScanRecord(f"s{i}", i // 2, 1, [None], det, det) for i in range(6)]
    out = bootstrap(records, {"p": ("two_stage", [0.5] * 6)}, n_resamples=100, seed=1)
    assert out.intervals["p"]["sensitivity"] == [1.0, 1.0] and out.intervals["p"]["fp_per_scan"] == [0.0, 0.0]
    assert out.intervals["froc"]["cpm"][0] == out.intervals["froc"]["cpm"][1]


# ----------------------------------------------------------------------------- bad input


def _corrupt(run: Path, case: str) -> Path:
    oof, stage1 = run / "fold_0" / "cnn_scores" / "A.csv", run / "fold_0" / "unet_candidates" / "A.csv"
    truth = run / "fold_0" / "truth" / "A.json"
    text = oof.read_text()
    if case == "missing oof":
        oof.unlink()
        return oof
    if case == "empty oof":
        oof.write_text("")
        return oof
    if case == "truncated oof":
        oof.write_text(text[: len(text) - 25])
        return oof
    if case == "garbage stage1":
        stage1.write_bytes(os.urandom(300))
        return stage1
    if case == "garbage truth":
        truth.write_text("{not json")
        return truth
    if case == "missing truth":
        truth.unlink()
        return truth
    lines = text.splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    if case in ("non-numeric score", "NaN score", "score above 1"):
        row[header.index("score")] = {"non-numeric score": "abc", "NaN score": "nan", "score above 1": "1.5"}[case]
    elif case == "hits a CMB that does not exist":
        row[header.index("hits")] = "7"
    elif case == "oof moved a candidate":  # to a point that is neither the candidate's nor its peak point
        row[header.index("i")] = "11.0"
    elif case == "garbled stage-1 peak point":  # the peak points a max_far row may sit at are checked like positions
        stage1_lines = stage1.read_text().splitlines()
        stage1.write_text("\n".join([stage1_lines[0].replace(",hits", ",peak_i,peak_j,peak_k,hits"),
                                     *(line.replace(line.rsplit(",", 1)[0], line.rsplit(",", 1)[0] + (",abc,1,1" if n == 0 else ",1,1,1"))
                                       for n, line in enumerate(stage1_lines[1:]))]) + "\n")
        return stage1
    elif case == "oof misses a candidate":
        lines = lines[:-1]
        oof.write_text("\n".join(lines) + "\n")
        return oof
    elif case == "written before settings were recorded":
        (run / "fold_0" / "unet_candidates" / "settings.json").unlink()
        return run / "fold_0" / "unet_candidates"
    elif case == "other stage-1 threshold":
        settings = json.loads((run / "fold_0" / "cnn_scores" / "settings.json").read_text())
        (run / "fold_0" / "cnn_scores" / "settings.json").write_text(json.dumps({**settings, "unet_threshold": 0.15}))
        return run / "fold_0" / "cnn_scores"
    elif case == "a member retrained since":  # deleted and trained again: its model file is not the one the files came from
        (run / "fold_0" / "cnn_bs20").mkdir()
        (run / "fold_0" / "cnn_bs20" / "model.pt").write_bytes(b"other weights")
        return run / "fold_0" / "cnn_scores"
    oof.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    return oof


BAD_CASES = ["missing oof", "empty oof", "truncated oof", "garbage stage1", "garbage truth", "missing truth", "non-numeric score",
             "NaN score", "score above 1", "hits a CMB that does not exist", "oof moved a candidate", "garbled stage-1 peak point", "oof misses a candidate",
             "written before settings were recorded", "other stage-1 threshold", "a member retrained since"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_run_files_exit_2_naming_the_file_and_leave_outputs_alone(tmp_path: Path, case: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path / "run", TWO_SCANS, [["A"], ["B"]])
    assert eval_main([str(run)]) == 0
    before = {name: (run / name).read_bytes() for name in ("results.json", "report.md", "froc.png", "operating_points.csv")}
    capsys.readouterr()
    bad = _corrupt(run, case)
    assert eval_main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], err
    assert {name: (run / name).read_bytes() for name in before} == before


def test_stage2_scores_at_a_candidates_peak_point_count_where_that_point_hits(tmp_path: Path) -> None:
    """inference.stage2_window=max_far: a cnn_scores row may sit at its candidate's peak point (unet_candidates'
    peak_i/j/k); stage 1 is judged at the candidate's point, the two-stage result at the window scored."""
    from cmb.eval.evaluate import evaluate_run

    scans = {"A": {**TWO_SCANS["A"], "detections": [(10, 10, 14, 0.9, 0.55), *TWO_SCANS["A"]["detections"][1:]]}, "B": TWO_SCANS["B"]}
    run = make_run(tmp_path / "run", scans, [["A"], ["B"]])  # A's CMB candidate lies 4 mm off it (k=14 at 1 mm slices): a miss
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.inference.stage2_window = "max_far"
    OmegaConf.save(cfg, run / "config.yaml")
    for folder in ("unet_candidates", "cnn_scores"):
        (run / "fold_0" / folder / "settings.json").write_text(json.dumps(folder_settings(cfg, run / "fold_0", folder)))
        (run / "fold_1" / folder / "settings.json").write_text(json.dumps(folder_settings(cfg, run / "fold_1", folder)))
    stage1_file, scored_file = run / "fold_0" / "unet_candidates" / "A.csv", run / "fold_0" / "cnn_scores" / "A.csv"
    dets = scans["A"]["detections"]
    stage1 = [Candidate("A", *d[:3], 0.0, 0.0, 0.0, d[3], d[3], 5, d[3], peak_point=(10.0, 10.0, 10.0) if n == 0 else tuple(map(float, d[:3])))
              for n, d in enumerate(dets)]
    write_candidates(stage1, stage1_file, {"hits": ["", "", ""]})
    moved = [Candidate("A", 10.0, 10.0, 10.0, 0.0, 0.0, 0.0, 0.9, 0.9, 5, 0.55), *(Candidate("A", *d[:3], 0.0, 0.0, 0.0, d[3], d[3], 5, d[4])
                                                                                  for d in dets[1:])]
    write_candidates(moved, scored_file, {"hits": ["0", "", ""]})
    results = evaluate_run(run, cfg)
    assert results["stage1"]["sensitivity"] == 0.5  # B's CMB only: A's candidate point misses
    at_zero = next(p for p in results["operating_points"] if p["threshold"] == min(q["threshold"] for q in results["operating_points"]))
    assert at_zero["tp"] == 2  # the peak window finds A's CMB
    write_candidates([Candidate("A", 10.0, 10.0, 12.0, 0.0, 0.0, 0.0, 0.9, 0.9, 5, 0.55), *moved[1:]], scored_file, {"hits": ["0", "", ""]})
    with pytest.raises(Exception, match="does not score the 3 stage-1 candidates"):  # neither the candidate's point nor its peak point
        evaluate_run(run, cfg)


def test_cli_exit_status(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", TWO_SCANS, [["A"], ["B"]])
    _corrupt(run, "empty oof")
    out = subprocess.run([sys.executable, "-m", "cmb.eval", str(run)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "empty file" in out.stderr and "Traceback" not in out.stderr
    assert not (run / "results.json").exists()


def test_scores_keep_full_precision_in_candidate_files(tmp_path: Path) -> None:
    from cmb.inference.candidates import read_candidates

    cands = [Candidate("s", 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.9999996, 0.5, 3, 0.9999999),
             Candidate("s", 4.123456789, 5.0, 6.0, 0.0, 0.0, 0.0, 0.9999999, 0.5, 3, 0.99999961)]
    back, _ = read_candidates(write_candidates(cands, tmp_path / "c.csv"))
    assert [c.peak for c in back] == [0.9999996, 0.9999999] and [c.score for c in back] == [0.9999999, 0.99999961]
    assert back[1].i == 4.123456789
