"""The protocol end to end on a tiny synthetic dataset (2 folds, a handful of steps), and infer.py."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["debug=smoke", "data.preset=tiny", "inference.unet.tile=[32,32,32]"]


def run_cli(args: list[str], cache: Path, timeout: int = 300, script: str = "train.py") -> subprocess.CompletedProcess:
    env = {**os.environ, "CMB_CACHE": str(cache), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_synthetic_module: Path) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    out = run_cli(["experiment=lotcv", *SMOKE, f"paths.runs_dir={runs}", "name=e2e", "runtime.progress_every_n_steps=2"],
                  tiny_synthetic_module)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "report:" in out.stdout and "FROC plot:" in out.stdout
    (runs / "console.txt").write_text(out.stdout + out.stderr)  # what the user saw
    return runs / "e2e"


@pytest.fixture(scope="module")
def tiny_synthetic_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cmb.data.synthetic import ensure_synthetic_dataset

    cache = tmp_path_factory.mktemp("cache")
    ensure_synthetic_dataset("tiny", 0, cache)
    return cache


@pytest.mark.slow
def test_trainer_flags_from_the_command_line_reach_lightning_and_fast_dev_run_runs_the_whole_protocol(tmp_path: Path,
                                                                                                     tiny_synthetic: Path) -> None:
    out = run_cli(["experiment=lotcv", *SMOKE, f"paths.runs_dir={tmp_path}", "name=fast", "trainer.fast_dev_run=true",
                   "trainer.gradient_clip_val=1.0"], tiny_synthetic)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "fast"
    members = sorted(run.glob("fold_*/*_bs*/done.json"))
    assert len(members) == 4 * 3  # 2 folds + final, 2 U-Nets + 2 CNNs each
    for done in members:  # fast_dev_run: one step per round, whatever max_steps says
        record = json.loads(done.read_text())
        assert record["steps"] == 1 and record.get("refine", {"steps": 1})["steps"] == 1
    assert json.loads((run / "results.json").read_text())["dataset"]["n_scans"] == 4


@pytest.mark.slow
def test_protocol_writes_a_self_describing_run(finished_run: Path) -> None:
    run = finished_run
    for name in ("config.yaml", "metadata.json", "splits.json", "timing.json", "results.json", "report.md", "froc.png", "operating_points.csv"):
        assert (run / name).is_file(), name
    splits = json.loads((run / "splits.json").read_text())
    assert len(splits["folds"]) == 2 and splits["seed"] == 0
    meta = json.loads((run / "metadata.json").read_text())
    assert {"torch", "monai", "git_commit", "seed"} <= set(meta)
    for fold in ("fold_0", "fold_1", "fold_final"):
        for member in ("unet_bs20", "unet_bs30", "cnn_bs20", "cnn_bs30"):
            mdir = run / fold / member
            for name in ("model.pt", "config.yaml", "metadata.json", "metrics.csv", "done.json", "checkpoints/last.ckpt"):
                assert (mdir / name).is_file(), mdir / name
        assert sorted(p.stem for p in (run / fold / "mimics").glob("*.csv"))
    from cmb.models.checkpoint import load_model

    saved = load_model(run / "fold_0" / "unet_bs20" / "model.pt")[1]  # what infer.py compares a scan's voxel size with
    assert saved["training_voxel_mm"] == {"min": [0.45, 0.45, 0.9], "max": [0.45, 0.45, 0.9]}
    member_meta = json.loads((run / "fold_0" / "unet_bs30" / "metadata.json").read_text())
    assert member_meta["batch_size"] == 30 and member_meta["heldout_scans"] == splits["folds"][0]["test"]
    assert not set(member_meta["heldout_scans"]) & set(member_meta["train_scans"])
    for fold in ("fold_0", "fold_1"):  # the U-Nets' hard-negative round (on by default): own training scans only
        for member in ("unet_bs20", "unet_bs30"):
            mdir = run / fold / member
            assert (mdir / "model_before_refine.pt").is_file() and (mdir / "refine_metrics.csv").is_file()
            negatives = {p.stem for p in (mdir / "hard_negatives").glob("*.csv")}
            assert negatives and negatives <= set(json.loads((mdir / "metadata.json").read_text())["train_scans"])
            assert json.loads((mdir / "done.json").read_text())["refine"]["steps"] == 2
    results = json.loads((run / "results.json").read_text())
    assert results["dataset"] == {"name": "synthetic:tiny", "n_scans": 4, "n_cmbs": results["dataset"]["n_cmbs"]}
    assert results["protocol"]["n_folds"] == 2 and results["protocol"]["unet_batch_sizes"] == [20, 30]
    assert set(results["froc"]["sensitivity_at_fp"]) == {"0.125", "0.25", "0.5", "1", "2", "4", "8"}
    thresholds = [p["threshold"] for p in results["operating_points"]]
    assert thresholds == sorted(thresholds) and len(thresholds) == 101
    assert sorted(p["scan_id"] for p in results["per_scan"]) == sorted(splits["scan_ids"])
    assert results["timing_s"]["train"] > 0
    assert "Rau et al." in (run / "report.md").read_text()
    review = sorted(p.name for p in (run / "review").iterdir())  # a picture per held-out scan, and their index
    assert review == sorted([f"{s}.png" for s in splits["scan_ids"]] + ["index.html"])


@pytest.mark.slow
def test_the_console_shows_progress_lines_and_the_log_file_the_details(finished_run: Path) -> None:
    console = (finished_run.parent / "console.txt").read_text()
    assert "fold 0/2 · unet_bs20 · step 2/4 · ETA" in console and "=== fold 1 of 2 ===" in console
    for noise in ("Tip:", "GPU available", "Seed set to", "Warning", "wandb:"):  # Lightning, warnings, wandb: log file only
        assert noise not in console, noise
    logs = "".join(p.read_text() for p in (finished_run / "logs").glob("*.log"))
    assert "GPU available" in logs and "step 2/4" in logs


@pytest.mark.slow
def test_eval_cli_recomputes_results(finished_run: Path, tmp_path: Path) -> None:
    before = json.loads((finished_run / "results.json").read_text())
    out = subprocess.run([sys.executable, "-m", "cmb.eval", str(finished_run)], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr
    after = json.loads((finished_run / "results.json").read_text())
    assert after["operating_points"] == before["operating_points"] and after["froc"] == before["froc"]
    bad = subprocess.run([sys.executable, "-m", "cmb.eval", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a run folder" in bad.stderr


@pytest.mark.slow
def test_rerun_skips_finished_members(finished_run: Path, tiny_synthetic_module: Path) -> None:
    done = finished_run / "fold_0" / "unet_bs20" / "done.json"
    stamp = done.stat().st_mtime_ns
    out = run_cli(["experiment=lotcv", *SMOKE, f"paths.runs_dir={finished_run.parent}", "name=e2e"], tiny_synthetic_module)
    assert out.returncode == 0, out.stderr[-2000:]
    assert done.stat().st_mtime_ns == stamp
    assert "already trained, skipping" in out.stdout + out.stderr
    def snapshot() -> dict[str, bytes]:  # every file but Hydra's own per-invocation log folders
        return {str(p.relative_to(finished_run)): p.read_bytes() for p in sorted(finished_run.rglob("*"))
                if p.is_file() and "logs" not in p.relative_to(finished_run).parts}

    before = snapshot()
    changed = run_cli(["experiment=lotcv", *SMOKE, f"paths.runs_dir={finished_run.parent}", "name=e2e", "unet.max_steps=6"], tiny_synthetic_module)
    assert changed.returncode == 2 and "trained with other settings" in changed.stderr
    assert snapshot() == before  # a refused re-run changes nothing (config.yaml included)


@pytest.mark.slow
def test_killed_protocol_resumes(tmp_path: Path, tiny_synthetic_module: Path) -> None:
    args = ["experiment=lotcv", *SMOKE, f"paths.runs_dir={tmp_path}", "name=killed", "unet.max_steps=8", "unet.steps_per_epoch=4",
            "protocol.train_final=false"]
    env = {**os.environ, "CMB_CACHE": str(tiny_synthetic_module), "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "fold_0" / "unet_bs20" / "done.json"
    deadline = time.time() + 240
    while not first.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.is_file(), "the first member never finished"
    assert not (tmp_path / "killed" / "results.json").exists()
    stamp = first.stat().st_mtime_ns
    out = run_cli(args, tiny_synthetic_module)
    assert out.returncode == 0, out.stderr[-2000:]
    assert first.stat().st_mtime_ns == stamp  # not retrained
    assert (tmp_path / "killed" / "results.json").is_file()


def test_train_rejects_bad_fold_and_unknown_dataset(tmp_path: Path, tiny_synthetic: Path) -> None:
    out = run_cli(["fold=7", *SMOKE, f"paths.runs_dir={tmp_path}"], tiny_synthetic)
    assert out.returncode == 2 and "fold=7 is out of range: this dataset has 2 folds (0..1)" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli(["data=nosuchlayout", f"paths.runs_dir={tmp_path}"], tiny_synthetic)
    assert out.returncode == 2 and "data=nosuchlayout: Could not find 'data/nosuchlayout'; available: dou, nifti" in out.stderr
    out = run_cli(["data=nifti", f"data.root={tmp_path}/missing", f"paths.runs_dir={tmp_path}"], tiny_synthetic)
    assert out.returncode == 2 and "missing: data root does not exist" in out.stderr


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "batch_size=0 is not allowed: a whole number >= 2"),
    ("batch_size=1", "batch_size=1 is not allowed: a whole number >= 2 (batch norm"),
    ("batch_size=25", "batch_size=25 is not a member of the unet ensemble (unet.batch_sizes=[20, 30])"),
    ("seed=abc", "seed='abc' is not allowed"),
    ("inference.unet_threshold=2", "inference.unet_threshold=2 is not allowed: a number in (0, 1]"),
    ("inference.unet.mode=bogus", "inference.unet.mode='bogus' is not allowed: one of fast, faithful"),
    ("fold=9", "fold=9 is out of range"),
    ("batch_sze=30", "batch_sze=30: train.py has no setting 'batch_sze'; did you mean batch_size"),
    ("unet.max_step=3", "unet.max_step=3: train.py has no setting 'unet.max_step'; did you mean unet.max_steps"),
    ("experiment=lotvc", "experiment=lotvc: Could not find 'experiment/lotvc'; available: lotcv, paper"),
    ("fold=0,1", "fold=0,1: a comma-separated value needs -m"),
    ("fold=[0", "cannot read the command line"),
    ("preprocess.mask=bogus", "preprocess.mask='bogus' is not allowed: one of auto, user, deepbet, hdbet, threshold"),
    ("preprocess.mask=hdbet", "preprocess.mask=hdbet: HD-BET is not installed; pip install -e '.[hdbet]'"),
    ("name=", "name='' is not allowed: the run folder's name under paths.runs_dir, e.g. name=my_run"),  # the runs folder itself
    ("name=../escape", "name='../escape' is not allowed"),  # a folder outside paths.runs_dir
    ("cnn.zoom={share:2,factors:[1.0,1.5]}", "cnn.zoom={'share': 2, 'factors': [1.0, 1.5]} is not allowed: null or {share: s, factors:"),
    ("unet.zoom={share:0.5,factors:[0.2,1.5]}", "unet.zoom={'share': 0.5, 'factors': [0.2, 1.5]} is not allowed"),
    ("cnn.zoom=3", "cnn.zoom=3 is not allowed"),
])
def test_bad_values_are_refused_at_the_door_before_any_folder_exists(tmp_path: Path, tiny_synthetic: Path, override: str,
                                                                      message: str) -> None:
    out = run_cli([*SMOKE, f"paths.runs_dir={tmp_path}", "name=door", override], tiny_synthetic)
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and errors == [f"error: {message}" + errors[0].split(message, 1)[-1]] and message in errors[0]
    assert list(tmp_path.iterdir()) == []  # no run folder, no Hydra log folder


@pytest.mark.parametrize("override, message", [
    ("threshold=2", "threshold=2 is not allowed: a number in [0, 1] or null"),
    ("threshold=nan", "threshold=nan is not allowed"),
    ("threshold=abc", "threshold='abc' is not allowed"),
    ("unet_mode=bogus", "unet_mode='bogus' is not allowed: one of fast, faithful or null"),
    ("treshold=0.5", "treshold=0.5: infer.py has no setting 'treshold'; did you mean threshold?"),
])
def test_bad_infer_values_are_refused_before_any_work(tmp_path: Path, tiny_synthetic: Path, override: str, message: str) -> None:
    out = run_cli([f"model_dir={tmp_path}", f"input={tmp_path}", f"output={tmp_path / 'out'}", override], tiny_synthetic, script="infer.py")
    assert out.returncode == 2 and out.stderr.strip() == f"error: {message}" + out.stderr.strip().split(message, 1)[-1]
    assert not (tmp_path / "out").exists()


def test_infer_refuses_an_output_folder_inside_the_run_it_deploys(tmp_path: Path, tiny_synthetic: Path) -> None:
    """Before: detections, maps and index.html were written among the run's own files (results.json, fold_*/)."""
    run = tmp_path / "run"
    run.mkdir()
    for output in (run, run / "detections"):
        out = run_cli([f"model_dir={run}", f"input={tmp_path}", f"output={output}"], tiny_synthetic, script="infer.py")
        assert out.returncode == 2 and out.stderr.strip() == (f"error: output={output} lies inside the run folder model_dir={run}: "
                                                              "choose an output folder outside it")
    assert list(run.iterdir()) == []


def test_a_cache_folder_that_is_a_file_is_refused_in_one_line(tmp_path: Path, tiny_synthetic: Path) -> None:
    """Before: a Hydra instantiation error (train.py) or an "unexpected NotADirectoryError" per scan (infer.py)."""
    (tmp_path / "cache.txt").write_text("not a folder")
    out = run_cli([*SMOKE, f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache.txt'}"], tiny_synthetic)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'cache.txt'}: is a file, not a folder: the cache folder (paths.cache_dir, or CMB_CACHE) "
        f"({tmp_path / 'cache.txt'}) must be a folder, new or existing"]
    assert not (tmp_path / "runs").exists()


def test_cnn_member_says_what_is_missing(tmp_path: Path, tiny_synthetic: Path) -> None:
    out = run_cli(["stage=cnn", "fold=1", "batch_size=20", *SMOKE, f"paths.runs_dir={tmp_path}"], tiny_synthetic)
    assert out.returncode == 2
    assert "no mined mimics" in out.stderr and "stage=mine fold=1" in out.stderr


# ----------------------------------------------------------------------------- infer.py


def _lps_scan_with_cmb(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A phantom scan stored LPS (flipped i, j) with its first CMB; returns (CMB voxel in file grid, affine)."""
    from cmb.data.phantom import PRESETS, PhantomGenerator

    scan = PhantomGenerator(PRESETS["tiny"], seed=5).generate(0)
    assert scan.info["n_cmbs"] >= 1
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(scan.image.shape[:2]) - 1
    affine = scan.affine @ flip  # same world, array flipped along i and j
    image = scan.image[::-1, ::-1, :].copy()
    nib.save(nib.Nifti1Image(image, affine), str(path))
    cmb = scan.centroids_vox[0].copy()
    cmb[:2] = np.array(scan.image.shape[:2]) - 1 - cmb[:2]
    return cmb, affine


def _known_stage_outputs(monkeypatch) -> None:  # noqa: ANN001 (pytest fixture)
    """The smoke-trained networks cannot detect yet: stage 1 becomes a dark-spot detector (the
    normalized image's local mean below 0.3) and stage 2 scores candidates 0.99 down to 0.5 in order."""
    from scipy import ndimage

    from cmb.inference import cnn_scores, unet_map

    def dark_spot_map(net, image, mask, cfg=None, device="cpu"):
        local = ndimage.uniform_filter(image, size=(5, 5, 3))
        return np.where(mask, 1 / (1 + np.exp((local - 0.3) * 40)), 0).astype(np.float32)

    monkeypatch.setattr(unet_map, "predict_probability", dark_spot_map)
    monkeypatch.setattr(cnn_scores, "score_points", lambda nets, image, points, **kw: np.linspace(0.99, 0.5, len(points)).astype(np.float32))


@pytest.mark.slow
def test_infer_outputs_map_back_to_the_planted_cmb(finished_run: Path, tmp_path: Path, monkeypatch) -> None:
    """The smoke-trained networks cannot detect yet, so the stage-1 map and stage-2 scores are
    replaced by known functions; everything else (preprocessing, reorientation, candidates,
    output writing) is the real path infer.py uses."""
    from cmb.inference import predictor as pred

    cmb_vox, affine = _lps_scan_with_cmb(tmp_path / "new.nii.gz")
    _known_stage_outputs(monkeypatch)
    predictor = pred.Predictor(finished_run, threshold=0.0, cache_dir=tmp_path / "cache", progress=False)
    det = predictor.predict_scan(tmp_path / "new.nii.gz")
    written = pred.write_outputs(det, tmp_path / "out")
    assert [p.name for p in written] == ["new_detections.csv", "new_stage1_prob.nii.gz", "new_detections.mrk.json",
                                         "new_detections.png"]
    rows = np.genfromtxt(written[0], delimiter=",", names=True, dtype=None, encoding=None)
    rows = np.atleast_1d(rows)
    vox = np.stack([rows["i"], rows["j"], rows["k"]], axis=1)
    nearest = np.argmin(np.linalg.norm((vox - cmb_vox) * [0.45, 0.45, 0.9], axis=1))
    assert np.linalg.norm((vox[nearest] - cmb_vox) * [0.45, 0.45, 0.9]) < 1.5  # mm, in the file's own grid
    mm = np.array([rows["x_mm"][nearest], rows["y_mm"][nearest], rows["z_mm"][nearest]])
    np.testing.assert_allclose(mm, (affine @ np.r_[vox[nearest], 1])[:3], atol=0.02)
    prob = nib.load(str(written[1]))
    np.testing.assert_allclose(prob.affine, affine)
    assert prob.shape == (64, 64, 32)
    assert np.asanyarray(prob.dataobj)[tuple(np.rint(cmb_vox).astype(int))] > 0.5  # the map is on the input grid
    markups = json.loads(written[2].read_text())
    points = markups["markups"][0]["controlPoints"]
    assert markups["markups"][0]["coordinateSystem"] == "RAS" and len(points) == len(rows)
    np.testing.assert_allclose(points[nearest]["position"], mm, atol=0.01)
    with pytest.raises(Exception, match="output exists already"):
        pred.write_outputs(det, tmp_path / "out")


@pytest.mark.slow
def test_infer_places_candidates_by_the_point_rule_of_the_run_it_deploys(finished_run: Path, tmp_path: Path, monkeypatch) -> None:
    """Evaluation equals deployment for `inference.candidate_point`: infer.py places candidates as the run's
    out-of-fold candidates were placed (its config.yaml), not by the current default."""
    import shutil

    from omegaconf import OmegaConf

    from cmb.inference import candidates as cand_module
    from cmb.inference import predictor as pred

    _lps_scan_with_cmb(tmp_path / "new.nii.gz")
    _known_stage_outputs(monkeypatch)
    used: list[str] = []

    def spy(*args, **kwargs):
        used.append(kwargs.get("point", "centroid"))
        return cand_module.extract_candidates(*args, **kwargs)

    monkeypatch.setattr(pred, "extract_candidates", spy)
    peak_run = tmp_path / "peak_run"
    shutil.copytree(finished_run, peak_run, ignore=shutil.ignore_patterns("review", "*.png"))
    cfg = OmegaConf.load(peak_run / "config.yaml")
    cfg.inference.candidate_point = "peak"
    OmegaConf.save(cfg, peak_run / "config.yaml")
    for run, expected in ((finished_run, "centroid"), (peak_run, "peak")):
        det = pred.Predictor(run, threshold=0.0, cache_dir=tmp_path / "cache", progress=False).predict_scan(tmp_path / "new.nii.gz")
        assert used[-1] == expected and len(det.scores) > 0


@pytest.mark.slow
def test_infer_on_a_dicom_series_equals_infer_on_the_same_scan_as_nifti(finished_run: Path, tmp_path: Path, monkeypatch,
                                                                       tiny_synthetic_module: Path) -> None:
    """A DICOM series folder goes the same way as a NIfTI file of the same voxels and geometry: same
    detections (voxels of the series grid, RAS mm), and each row names its slice's SOP Instance UID.
    The stage-1 map and stage-2 scores are known functions, as in the test above."""
    import csv

    from test_dicom import SERIES, write_series

    from cmb.inference import predictor as pred

    cmb_vox, affine = _lps_scan_with_cmb(tmp_path / "scan.nii.gz")
    image = np.rint(np.asanyarray(nib.load(str(tmp_path / "scan.nii.gz")).dataobj)).astype(np.int16)  # DICOM stores integers
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "scan.nii.gz"))
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    write_series(image, tmp_path / "scan_dicom", spacing=tuple(spacing), origin=tuple(lps[:, 3]),
                 direction=tuple((lps[:3, :3] / spacing).ravel()))

    _known_stage_outputs(monkeypatch)
    predictor = pred.Predictor(finished_run, threshold=0.0, cache_dir=tmp_path / "cache", progress=False)
    assert pred.list_inputs(tmp_path / "scan_dicom") == [tmp_path / "scan_dicom"]
    tables = {}
    for name in ("scan.nii.gz", "scan_dicom"):
        det = predictor.predict_scan(tmp_path / name)
        written = pred.write_outputs(det, tmp_path / "out")
        tables[name] = list(csv.DictReader(written[0].open()))
        np.testing.assert_allclose(nib.load(str(written[1])).affine, affine, atol=1e-5)  # the map on the series' own grid
    nifti, dicom = tables["scan.nii.gz"], tables["scan_dicom"]
    assert len(dicom) == len(nifti) >= 1 and "sop_instance_uid" not in nifti[0]
    for a, b in zip(nifti, dicom):
        assert [a[k] for k in ("i", "j", "k", "x_mm", "y_mm", "z_mm", "score")] == [b[k] for k in ("i", "j", "k", "x_mm", "y_mm", "z_mm", "score")]
        assert b["sop_instance_uid"] == f"{SERIES}.{int(round(float(b['k']))) + 1}"
    nearest = min(dicom, key=lambda r: np.linalg.norm((np.array([float(r[k]) for k in "ijk"]) - cmb_vox) * [0.45, 0.45, 0.9]))
    assert nearest["sop_instance_uid"] == f"{SERIES}.{int(round(cmb_vox[2])) + 1}"  # the slice a PACS viewer jumps to holds the CMB
    out = run_cli([f"model_dir={finished_run}", f"input={tmp_path / 'scan_dicom'}", f"output={tmp_path / 'cli'}", "progress=false"],
                  tiny_synthetic_module, script="infer.py")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "DICOM series" in out.stdout + out.stderr
    assert (tmp_path / "cli" / "scan_dicom_detections.csv").read_text().splitlines()[0].endswith(",sop_instance_uid")


@pytest.mark.slow
def test_infer_cli_skips_a_bad_file_and_keeps_the_others(finished_run: Path, tmp_path: Path, tiny_synthetic_module: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    _lps_scan_with_cmb(inputs / "good.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti")
    nib.save(nib.Nifti1Image(np.full((40, 40, 24), 100.0, np.float32), np.eye(4)), str(inputs / "constant.nii.gz"))
    out = run_cli([f"model_dir={finished_run}", f"input={inputs}", f"output={tmp_path / 'out'}", "progress=false"],
                  tiny_synthetic_module, script="infer.py")
    assert out.returncode == 2
    assert "broken.nii.gz: cannot read image" in out.stderr and "2 of 3 scans failed" in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and any("constant.nii.gz" in line for line in errors) and "Traceback" not in out.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["good_detections.csv", "good_detections.mrk.json", "good_detections.png", "good_stage1_prob.nii.gz", "index.html"]
    assert nib.load(tmp_path / "out" / "good_stage1_prob.nii.gz").header.get_xyzt_units()[0] == "mm"  # its affine is in mm
    index = (tmp_path / "out" / "index.html").read_text()
    assert "good_detections.png" in index and "constant" not in index
    again = run_cli([f"model_dir={finished_run}", f"input={inputs / 'good.nii.gz'}", f"output={tmp_path / 'out'}"],
                    tiny_synthetic_module, script="infer.py")
    assert again.returncode == 2 and "output exists already" in again.stderr


@pytest.mark.slow
def test_infer_on_heldout_scans_writes_exactly_their_out_of_fold_detections(finished_run: Path, tmp_path: Path,
                                                                            tiny_synthetic_module: Path) -> None:
    """Evaluation equals deployment: infer.py with fold k's members on the scans fold k held out writes the rows
    of each scan's out-of-fold CSV whose stage-2 score reaches the threshold (the run's chosen one, and 0 for
    every candidate): same positions, stage-1 peaks and stage-2 scores, none added, none lost."""
    import csv

    splits = json.loads((finished_run / "splits.json").read_text())
    chosen = json.loads((finished_run / "results.json").read_text())["chosen_operating_point"]["threshold"]
    root = next((tiny_synthetic_module / "synthetic").glob("tiny-seed0-*"))
    checked = 0
    for fold in splits["folds"]:
        inputs = tmp_path / f"heldout_{fold['fold']}"
        inputs.mkdir()
        for scan_id in fold["test"]:
            (inputs / f"{scan_id}.nii.gz").symlink_to(root / "images" / f"{scan_id}.nii.gz")
        for threshold, args in ((chosen, []), (0.0, ["threshold=0.0"])):
            out_dir = tmp_path / f"out_{fold['fold']}_{threshold}"
            out = run_cli([f"model_dir={finished_run}", f"fold={fold['fold']}", f"input={inputs}", f"output={out_dir}", "progress=false", *args],
                          tiny_synthetic_module, script="infer.py")
            assert out.returncode == 0, out.stderr[-2000:]
            for scan_id in fold["test"]:
                with open(finished_run / f"fold_{fold['fold']}" / "cnn_scores" / f"{scan_id}.csv", newline="") as handle:
                    oof = list(csv.DictReader(handle))
                with open(out_dir / f"{scan_id}_detections.csv", newline="") as handle:
                    deployed = list(csv.DictReader(handle))
                expected = sorted((r for r in oof if float(r["score"]) >= threshold), key=lambda r: -float(r["score"]))
                assert len(deployed) == len(expected), (scan_id, threshold)
                for d, e in zip(deployed, expected):
                    assert float(d["score"]) == float(e["score"]) and float(d["stage1_score"]) == float(e["peak"])
                    for axis in ("x_mm", "y_mm", "z_mm"):
                        assert float(d[axis]) == pytest.approx(float(e[axis]), abs=1e-3)
                checked += len(deployed)
    assert checked > 0


@pytest.mark.slow
def test_a_finished_run_scores_another_family_as_infer_py_would(finished_run: Path, tmp_path: Path, tiny_synthetic_module: Path) -> None:
    """stage=score: the run's final models on every scan of another labelled dataset (the physics phantom),
    a one-fold run folder evaluated like any other, the run's own threshold reported unchanged, and the
    scored candidates the ones infer.py writes for the same scan."""
    import csv

    runs = tmp_path / "runs"
    args = ["stage=score", f"model_dir={finished_run}", "data.preset=physics_tiny", "inference.unet.tile=[32,32,32]",
            f"paths.runs_dir={runs}", "name=on_physics"]
    out = run_cli(args, tiny_synthetic_module)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(the scored run's own threshold)" in out.stdout and "(another run's final models, scans they never saw)" in out.stdout
    scored = runs / "on_physics"
    results = json.loads((scored / "results.json").read_text())
    own = json.loads((finished_run / "results.json").read_text())["chosen_operating_point"]["threshold"]
    assert results["protocol"]["cv"] == "transfer" and results["dataset"]["name"] == "synthetic:physics_tiny"
    assert results["transfer_operating_point"]["threshold"] == own and results["nested_operating_point"] is None
    assert "transfer (honest)" in (scored / "report.md").read_text()
    ids = json.loads((scored / "splits.json").read_text())["folds"][0]["test"]
    assert len(ids) == 4 and all((scored / "fold_0" / "cnn_scores" / f"{i}.csv").is_file() for i in ids)
    again = run_cli(["cmb.eval", str(scored)], tiny_synthetic_module, script="-m")  # python -m cmb.eval re-evaluates it alike
    assert again.returncode == 0 and json.loads((scored / "results.json").read_text())["froc"] == results["froc"]
    fusion = subprocess.run([sys.executable, str(REPO / "benchmarks" / "score_fusion.py"), str(scored), "--out", str(tmp_path / "f.json")],
                            capture_output=True, text=True, timeout=120)
    assert fusion.returncode == 0, fusion.stderr[-2000:]
    rows = {r["fusion"]: r for r in json.loads((tmp_path / "f.json").read_text())}  # re-scored at the transfer point
    assert rows["cnn"]["point"] == "transfer" and rows["cnn"]["cpm"] == results["froc"]["cpm"]
    assert rows["cnn"]["nested_tp"] == results["transfer_operating_point"]["tp"]
    image = next((tiny_synthetic_module / "synthetic").glob("physics_tiny-seed0-*")) / "images" / f"{ids[0]}.nii.gz"
    infer = run_cli([f"model_dir={finished_run}", f"input={image}", f"output={tmp_path / 'det'}", "threshold=0.0", "progress=false"],
                    tiny_synthetic_module, script="infer.py")
    assert infer.returncode == 0, infer.stderr[-2000:]
    with open(scored / "fold_0" / "cnn_scores" / f"{ids[0]}.csv", newline="") as handle:
        oof = sorted(csv.DictReader(handle), key=lambda r: -float(r["score"]))
    with open(tmp_path / "det" / f"{ids[0]}_detections.csv", newline="") as handle:
        deployed = list(csv.DictReader(handle))
    assert [float(d["score"]) for d in deployed] == [float(e["score"]) for e in oof]
    other = run_cli([*args[:2], "data.preset=tiny", *args[3:]], tiny_synthetic_module)  # the same name for another dataset
    assert other.returncode == 2 and "holds another run or another scoring" in other.stderr
    lotcv = runs / "a_lotcv_run"  # the name of a LOTCV run (no transfer block): refused in one line, before a traceback
    lotcv.mkdir()
    shutil.copy(finished_run / "config.yaml", lotcv / "config.yaml")
    into_lotcv = run_cli([*args[:-1], "name=a_lotcv_run"], tiny_synthetic_module)
    assert into_lotcv.returncode == 2 and "holds another run or another scoring" in into_lotcv.stderr and "Traceback" not in into_lotcv.stderr
    assert sorted(p.name for p in lotcv.iterdir()) == ["config.yaml"]
    (scored / "fold_0" / "cnn_scores" / f"{ids[0]}.csv").unlink()  # resumed after an interruption: one scan left to score
    resumed = run_cli(args, tiny_synthetic_module)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    timing = json.loads((scored / "timing.json").read_text())
    assert timing["n_stage1_scans"] == 5 and timing["stage1_inference"] > 0  # four scans, then the one left: all counted
    stamp = scored / "fold_0" / "cnn_scores" / "settings.json"  # files of other settings (the scored run's window changed since)
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "stage2_window": "candidate"}))
    rescored = run_cli(args, tiny_synthetic_module)
    assert rescored.returncode == 0 and "out-of-fold files from other settings" in rescored.stdout + rescored.stderr, rescored.stderr[-2000:]
    assert json.loads((scored / "timing.json").read_text())["n_stage1_scans"] == 9  # every scan scored again, none re-stamped
    assert json.loads(stamp.read_text())["stage2_window"] == "max_far"


def test_score_without_a_run_is_refused_at_the_door(tmp_path: Path, tiny_synthetic: Path) -> None:
    out = run_cli(["stage=score", f"paths.runs_dir={tmp_path}"], tiny_synthetic)
    assert out.returncode == 2 and "stage=score needs model_dir=RUN_DIR" in out.stderr and not any(tmp_path.iterdir())


def _stage2_points_module():  # noqa: ANN202 - the benchmark script as a module
    import importlib.util

    spec = importlib.util.spec_from_file_location("stage2_points", REPO / "benchmarks" / "stage2_points.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_point_variants_take_the_peak_window_only_where_they_say() -> None:
    pick = _stage2_points_module().pick_points
    centroid = np.array([[10.0, 10, 10], [20, 20, 20], [30, 30, 30]])
    peak = centroid + np.array([[0.0, 0, 1], [0, 0, 2], [0, 0, 0.5]])  # 2, 4 and 1 mm away on a 1x1x2 mm grid
    c_score, p_score = np.array([0.9, 0.2, 0.3]), np.array([0.5, 0.8, 0.6])
    points, scores = pick(centroid, peak, c_score, p_score, (1.0, 1.0, 2.0), "centroid", 2.5)
    assert np.array_equal(points, centroid) and np.array_equal(scores, c_score)
    points, scores = pick(centroid, peak, c_score, p_score, (1.0, 1.0, 2.0), "peak", 2.5)
    assert np.array_equal(points, peak) and np.array_equal(scores, p_score)
    points, scores = pick(centroid, peak, c_score, p_score, (1.0, 1.0, 2.0), "max", 2.5)  # the higher window of each
    assert np.array_equal(points, np.stack([centroid[0], peak[1], peak[2]])) and np.array_equal(scores, [0.9, 0.8, 0.6])
    points, scores = pick(centroid, peak, c_score, p_score, (1.0, 1.0, 2.0), "max_far", 2.5)  # and only beyond 2.5 mm
    assert np.array_equal(points, np.stack([centroid[0], peak[1], centroid[2]])) and np.array_equal(scores, [0.9, 0.8, 0.3])
    with pytest.raises(ValueError, match="variant must be one of"):
        pick(centroid, peak, c_score, p_score, (1.0, 1.0, 2.0), "mean", 2.5)


def test_the_two_point_benchmark_refuses_an_unfinished_run_before_any_work(tmp_path: Path) -> None:
    running = tmp_path / "running"
    (running / "fold_0").mkdir(parents=True)
    (running / "config.yaml").write_text("name: running\n")
    (running / "splits.json").write_text("{}")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stage2_points.py"), str(running), "--out", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"{running}: not a finished LOTCV run (no results.json)" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "p.json").exists() and "| run |" not in out.stdout


@pytest.mark.slow
def test_the_two_point_benchmark_reproduces_the_run_at_its_own_points(finished_run: Path, tmp_path: Path,
                                                                       tiny_synthetic_module: Path) -> None:
    """benchmarks/stage2_points.py re-detects the held-out scans with each fold's members: the row of the run's own
    window (`max_far`, the default) must give the run's CPM and nested point exactly, and the centroid row stage 1 at
    the candidates' points, as the run judges it; every variant is evaluated on every held-out scan."""
    from omegaconf import OmegaConf

    env = {**os.environ, "CMB_CACHE": str(tiny_synthetic_module), "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stage2_points.py"), str(finished_run), "--out", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["points"]: r for r in json.loads((tmp_path / "p.json").read_text())}
    own = json.loads((finished_run / "results.json").read_text())
    assert OmegaConf.load(finished_run / "config.yaml").inference.stage2_window == "max_far"
    assert set(rows) == {"centroid", "peak", "max", "max_far"} and rows["max_far"]["equals_run"] is True
    assert "equals_run" not in rows["centroid"]
    assert rows["max_far"]["cpm"] == own["froc"]["cpm"] and rows["max_far"]["nested_tp"] == own["nested_operating_point"]["tp"]
    assert rows["centroid"]["stage1_sensitivity"] == own["stage1"]["sensitivity"]
    assert all(r["n_cmbs"] == own["dataset"]["n_cmbs"] for r in rows.values())

@pytest.mark.slow
def test_the_stage1_reach_benchmark_counts_the_hits_the_run_reports(finished_run: Path, tmp_path: Path, tiny_synthetic_module: Path) -> None:
    """benchmarks/stage1_reach.py maps the held-out scans again: the CMBs a candidate's point hits are the run's stage-1
    hits; one whose map stays below the threshold near it and is hit by no point is "lost to the map"."""
    env = {**os.environ, "CMB_CACHE": str(tiny_synthetic_module), "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stage1_reach.py"), str(finished_run), "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())
    own = json.loads((finished_run / "results.json").read_text())
    assert len(rows) == own["dataset"]["n_cmbs"] and sum(r["point"] for r in rows) == own["stage1"]["tp"]
    assert all(0.0 <= r["map_max"] <= 1.0 and isinstance(r["peak"], bool) for r in rows)  # max_far runs carry peak points
    lost = [r for r in rows if not r["point"]]
    assert out.stdout.count("lost to ") == len(lost)
    unfinished = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stage1_reach.py"), str(tmp_path)], capture_output=True, text=True,
                                timeout=120, env=env)
    assert unfinished.returncode == 2 and "not a finished LOTCV run" in unfinished.stderr and "Traceback" not in unfinished.stderr


# ----------------------------------------------------------------------------- stage-1 hard-negative round


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.slow
def test_refine_round_learns_from_its_own_false_positives_on_training_scans_only(tmp_path: Path, tiny_synthetic: Path) -> None:
    from cmb.inference.candidates import read_candidates
    from cmb.inference.unet_map import predict_probability
    from cmb.models.checkpoint import load_model
    from cmb.models.health import training_cmb_peaks
    from cmb.protocol.run import Protocol

    mimic_only = [f"unet.refine.sampling.{k}={1.0 if k == 'mimic' else 0.0}" for k in ("positive", "random", "dark", "vessel", "mimic")]
    cfg = _compose([*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=refine", "logger=csv",
                    "unet.max_steps=40", "unet.steps_per_epoch=10", "unet.refine.steps=40", "unet.refine.threshold=0.2", "unet.refine.lr=0.003",
                    "unet.refine.max_scans=null", "unet.refine.replay={below: 0.5, share: 0.5}", *mimic_only])
    exp = Protocol(cfg)
    member = exp.train_member("unet", 0, 20)
    split = exp.fold_split(0)
    files = sorted(p.stem for p in (member / "hard_negatives").glob("*.csv"))
    assert files == sorted(split["train"])  # every training scan (max_scans=null), never a held-out one
    done = json.loads((member / "done.json").read_text())
    assert done["refine"]["steps"] == 40 and done["refine"]["hard_negatives"] > 0
    assert (member / "refine_metrics.csv").is_file()
    assert len(done["refine"]["replay_slipping_per_epoch"]) == 4  # scored at the start of each of the round's epochs

    before, _ = load_model(member / "model_before_refine.pt")
    after, _ = load_model(member / "model.pt")
    scores_before, scores_after = [], []
    for scan_id in split["train"]:
        negatives, _ = read_candidates(member / "hard_negatives" / f"{scan_id}.csv")
        if not negatives:
            continue
        scan, pre = exp.store.load(scan_id)
        centres = tuple(np.rint(np.array([c.voxel for c in negatives])).astype(int).T)
        for net, scores in ((before, scores_before), (after, scores_after)):
            scores.extend(predict_probability(net, np.asarray(pre.image), np.asarray(pre.mask), exp.unet_map_cfg)[centres])
        # a hard negative is a false positive: no CMB of the scan within the matching radius
        for c in negatives:
            assert np.min(np.linalg.norm((scan.centroids_vox - c.voxel) * scan.spacing_mm, axis=1)) > cfg.eval.match_radius_mm
    assert min(scores_before) >= 0.2 - 1e-6
    # 40 steps on windows at those false positives only lower the member's score there
    assert np.mean(scores_after) < np.mean(scores_before) - 0.03
    weights = [(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()) if a.is_floating_point()]
    assert not all(torch.allclose(a, b) for a, b in weights)
    # done.json's record of the training CMBs after the round is the refined member's own score
    peaks = training_cmb_peaks(after, exp.store.training_volumes(split["train"]))
    assert done["refine"]["training_cmb_peak_min"] == pytest.approx(float(peaks.min()), abs=1e-3)
    assert len(done["refine"]["training_cmbs_below_0.5"]) == int((peaks < 0.5).sum())


def test_the_vessel_pool_is_built_when_any_round_of_either_stage_draws_vessel_windows(tmp_path: Path, tiny_synthetic: Path) -> None:
    from cmb.protocol.run import Protocol

    args = [*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=vessel", "unet.sampling.vessel=0"]

    def vessel_contrast(*extra: str) -> float | None:
        return Protocol(_compose([*args, *extra])).store.options.vessel_contrast

    # only the hard-negative round draws vessel windows: before, its vessel share silently drew nothing
    assert vessel_contrast("unet.refine.sampling.vessel=0.1") is not None
    assert vessel_contrast("unet.refine.sampling.vessel=0") is None
    assert vessel_contrast("unet.refine.sampling.vessel=0.1", "unet.refine.steps=0") is None  # the round does not run
    assert vessel_contrast("unet.refine.sampling.vessel=0", "+cnn.sampling.vessel=0.1") is not None


def test_a_run_is_never_written_into_a_folder_that_holds_something_else(tmp_path: Path, tiny_synthetic: Path) -> None:
    from cmb.errors import DataError
    from cmb.layout import RunLayout
    from cmb.protocol.run import Protocol
    from cmb.protocol.transfer import score_run

    (tmp_path / "my_data").mkdir()
    (tmp_path / "my_data" / "notes.txt").write_text("mine")
    args = [*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}"]
    with pytest.raises(DataError, match=r"my_data: not a run folder and not empty \(notes.txt\); a run needs its own folder"):
        Protocol(_compose([*args, "name=my_data"]))
    with pytest.raises(DataError, match="my_data: not a run folder and not empty"):
        score_run(_compose([*args, "name=my_data", "stage=score", f"model_dir={tmp_path / 'any_run'}"]))
    assert [p.name for p in (tmp_path / "my_data").iterdir()] == ["notes.txt"]
    # an empty folder, a new one and a run folder (one with splits.json copied in, say) are runs' folders
    (tmp_path / "empty").mkdir()
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / "splits.json").write_text(json.dumps({"seed": 0, "folds": []}))
    for name in ("empty", "new", "copied"):
        RunLayout(tmp_path / name).refuse_foreign()


def test_a_fold_whose_training_scans_hold_no_cmb_is_refused_before_a_member_trains(tmp_path: Path, tiny_synthetic: Path) -> None:
    """Label maps that are all zero used to train every member on negatives alone, without a word."""
    from cmb.errors import CMBError
    from cmb.protocol.run import Protocol

    source = next((tiny_synthetic / "synthetic").glob("tiny-seed0-*"))
    for image in sorted((source / "images").glob("*.nii.gz")):
        (tmp_path / "data" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "images" / image.name).write_bytes(image.read_bytes())
        img = nib.load(str(image))
        save_zero = nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine)
        (tmp_path / "data" / "labels").mkdir(exist_ok=True)
        nib.save(save_zero, str(tmp_path / "data" / "labels" / image.name))
    smoke = [o for o in SMOKE if not o.startswith("data.")]
    exp = Protocol(_compose([*smoke, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path / 'runs'}", "name=empty",
                             "data=nifti", f"data.root={tmp_path / 'data'}"]))
    with pytest.raises(CMBError, match=r"fold 0: none of its 2 training scans \(synth\d+, synth\d+\) has a CMB in its truth"):
        exp.train_member("unet", 0, 20)
    assert not exp.layout.member("unet", 0, 20).root.exists()


def test_paper_mining_takes_the_heldout_components_at_the_mining_threshold_that_hit_no_cmb(tmp_path: Path, tiny_synthetic: Path) -> None:
    from cmb.inference.candidates import Candidate, read_candidates, write_candidates
    from cmb.protocol.run import Protocol

    cfg = _compose([*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=paper_mining", "mining.mode=paper"])
    exp = Protocol(cfg)
    for scan_id in exp.mined_scans(0):
        source = exp.heldout_fold_of(scan_id)
        assert source != 0  # fold 0's training scans were held out by other folds
        cands = [Candidate(scan_id, 5.0 + n, 6.0, 7.0, 0.0, 0.0, 0.0, 0.16 + 0.1 * n, 0.1, 4) for n in range(3)]
        write_candidates(cands, exp.layout.fold_dir(source) / "paper_mining" / f"{scan_id}.csv", {"hits": ["", "0", ""]})
    out = exp.mine(0)
    for scan_id in exp.mined_scans(0):
        mimics, _ = read_candidates(out / f"{scan_id}.csv")
        assert [m.i for m in mimics] == [5.0, 7.0]  # the component hitting CMB 0 is not a mimic


def test_paper_mode_mimics_are_stamped_with_the_unets_that_made_them_and_mined_again_when_those_are_retrained(
        tmp_path: Path, tiny_synthetic: Path) -> None:
    """mining.mode=paper takes a fold's mimics from the folds that held its training scans out, so the mimics'
    stamp names those folds' U-Nets: retraining one of them mines the mimics again, retraining the fold's own does not."""
    from cmb.inference.candidates import Candidate, read_candidates, write_candidates
    from cmb.protocol.run import Protocol

    exp = Protocol(_compose([*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=paper_stamp",
                             "mining.mode=paper"]))
    exp.prepare()
    sources = sorted({exp.heldout_fold_of(s) for s in exp.mined_scans(0)})
    for fold in [0, *sources]:
        member = exp.layout.member_dir("unet", fold, 20)
        member.mkdir(parents=True)
        (member / "model.pt").write_bytes(f"fold {fold} weights".encode())

    def write_paper_mining(i: float) -> None:
        for scan_id in exp.mined_scans(0):
            cands = [Candidate(scan_id, i, 6.0, 7.0, 0.0, 0.0, 0.0, 0.3, 0.1, 4)]
            write_candidates(cands, exp.layout.fold_dir(exp.heldout_fold_of(scan_id)) / "paper_mining" / f"{scan_id}.csv", {"hits": [""]})

    def mined_i() -> set[float]:
        out = exp.mine(0)
        return {m.i for s in exp.mined_scans(0) for m in read_candidates(out / f"{s}.csv")[0]}

    write_paper_mining(5.0)
    stamp = json.loads((exp.mine(0) / "settings.json").read_text())
    assert sorted(stamp["members"]) == [f"fold_{j}/unet_bs20" for j in sources]
    first = mined_i()
    write_paper_mining(9.0)  # the source folds' components change ...
    (exp.layout.member_dir("unet", 0, 20) / "model.pt").write_bytes(b"fold 0 retrained")
    assert mined_i() == first  # ... but only the fold's own U-Net was retrained: its mimics do not come from it
    (exp.layout.member_dir("unet", sources[0], 20) / "model.pt").write_bytes(b"source retrained")
    assert mined_i() != first  # a source fold's U-Net retrained: mined again from its new components


def test_members_from_other_settings_are_refused_before_anything_is_written(tmp_path: Path, tiny_synthetic: Path) -> None:
    from cmb.errors import ConfigError
    from cmb.protocol.run import Protocol

    args = [*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=other"]
    exp = Protocol(_compose(args))
    exp.prepare()
    member = exp.layout.member_dir("unet", 0, 20)
    member.mkdir(parents=True)
    (member / "started.json").write_text(json.dumps(exp.settings_stamp("unet", 0, 20)))
    config = (exp.layout.root / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="trained with other settings"):
        Protocol(_compose([*args, "unet.optimizer.lr=0.01"]))  # an unfinished member, other learning rate
    assert (exp.layout.root / "config.yaml").read_bytes() == config
    (member / "started.json").write_text(json.dumps({**exp.settings_stamp("unet", 0, 20), "settings_hash": "0" * 16}))
    with pytest.raises(ConfigError, match="unfinished member was started with other settings"):
        exp.train_member("unet", 0, 20)


def test_each_model_logs_into_its_own_wandb_run(tmp_path: Path, tiny_synthetic: Path, capfd) -> None:  # noqa: ANN001 (pytest fixture)
    from cmb.protocol.run import Protocol

    cfg = _compose([*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=wandb_runs", "logger=default",
                    "unet.refine.steps=0", "unet.health=null"])
    exp = Protocol(cfg)
    members = [exp.train_member("unet", 0, bs) for bs in (20, 30)]
    runs = [sorted((m / "wandb").glob("offline-run-*")) for m in members]
    assert [len(r) for r in runs] == [1, 1]  # before: the second model logged into the first one's run
    assert runs[0][0].name.rsplit("-", 1)[-1] != runs[1][0].name.rsplit("-", 1)[-1]
    assert "anonymous setting" not in capfd.readouterr().err  # wandb's warning about the setting Lightning passes


def test_options_off_keep_the_settings_hash_of_runs_from_before_them(tmp_path: Path, tiny_synthetic: Path) -> None:
    from omegaconf import open_dict

    from cmb.protocol.run import Protocol

    cfg = _compose([*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=hash", "unet.refine.steps=0"])
    exp = Protocol(cfg)
    with_key = exp.member_settings_hash("unet", 0, 20)
    with open_dict(cfg):
        del cfg.unet["refine"]
        del cfg.unet["transplant"]  # nor does the transplant option while no mix uses it
        del cfg.unet.net["blob_contrast"]  # nor the dark-blob channel while off
        del cfg.unet["health"]  # nor the capped-member check: it keeps healthy members as they are
    assert exp.member_settings_hash("unet", 0, 20) == with_key
    with open_dict(cfg):
        cfg.unet.net.blob_contrast = [9, 9, 5]
    assert exp.member_settings_hash("unet", 0, 20) != with_key
    with open_dict(cfg):
        cfg.unet.net.blob_contrast = None
    with open_dict(cfg):
        cfg.unet.refine = {"steps": 5, "threshold": 0.3, "max_scans": 2, "lr": 0.001, "sampling": {"mimic": 1.0}}
    refined = exp.member_settings_hash("unet", 0, 20)
    assert refined != with_key
    with open_dict(cfg):
        cfg.unet.transplant = {"sites": ["dark"], "gamma": [1.0, 1.0]}
    assert exp.member_settings_hash("unet", 0, 20) == refined
    cfg.unet.refine.sampling = {"mimic": 0.5, "transplant": 0.5}
    with_transplant = exp.member_settings_hash("unet", 0, 20)
    cfg.unet.transplant.sites = ["mimic"]
    assert len({refined, with_transplant, exp.member_settings_hash("unet", 0, 20)}) == 3
    cfg.unet.refine.sampling = {"mimic": 1.0}
    with open_dict(cfg):
        cfg.unet.refine.replay = None  # replay off: the same member as a run from before the option
    assert exp.member_settings_hash("unet", 0, 20) == refined
    cfg.unet.refine.replay = {"below": 0.5, "share": 0.5}
    assert exp.member_settings_hash("unet", 0, 20) != refined
    cfg.unet.refine.replay = None
    with open_dict(cfg):  # the general rule: any option added later with an off default keeps finished members valid
        cfg.unet.a_later_option = {"enabled": False, "weight": 0.0, "sites": []}
    assert exp.member_settings_hash("unet", 0, 20) == refined
    cfg.unet.a_later_option.weight = 0.5
    assert exp.member_settings_hash("unet", 0, 20) != refined


def test_a_member_stamped_under_an_earlier_settings_schema_is_refused_with_that_reason(tmp_path: Path, tiny_synthetic: Path) -> None:
    from cmb.errors import ConfigError
    from cmb.protocol.run import Protocol

    cfg = _compose([*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=schema"])
    member = tmp_path / "schema" / "fold_0" / "unet_bs20"
    member.mkdir(parents=True)
    (member / "done.json").write_text(json.dumps({"settings_hash": "94369f13c9b1d7bc"}))  # before settings_schema was recorded
    from cmb.protocol.settings import SETTINGS_SCHEMA

    with pytest.raises(ConfigError, match=rf"trained by an earlier cmb \(settings schema 1, now {SETTINGS_SCHEMA}\)"):
        Protocol(cfg)


def test_a_capped_member_is_set_aside_and_trained_again_with_another_seed(tmp_path: Path, tiny_synthetic: Path) -> None:
    from cmb.protocol.run import Protocol
    from cmb.protocol.settings import member_seed

    # a bar no member can pass (peaks are <= 1.0), so every attempt counts as capped
    cfg = _compose([*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=capped", "logger=csv",
                    "unet.max_steps=4", "unet.steps_per_epoch=2", "unet.refine.steps=0",
                    "unet.health.min_median_peak=1.01", "unet.health.retries=1"])
    member = Protocol(cfg).train_member("unet", 0, 20)
    done = json.loads((member / "done.json").read_text())
    assert done["rejected_attempts"] == ["rejected_attempt_0"] and done["capped"] is True
    assert 0.0 <= done["training_cmb_peak_median"] <= 1.0
    rejected = member / "rejected_attempt_0"
    assert (rejected / "checkpoints" / "last.ckpt").is_file() and (rejected / "metrics.csv").is_file()
    first_seed = json.loads((rejected / "metadata.json").read_text())["training_seed"]
    assert first_seed == member_seed(0, "unet", 0, 20, attempt=0)
    assert json.loads((member / "metadata.json").read_text())["training_seed"] == member_seed(0, "unet", 0, 20, attempt=1)
    assert (member / "model.pt").is_file() and (member / "checkpoints" / "last.ckpt").is_file()

    cfg = _compose([*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=healthy", "logger=csv",
                    "unet.max_steps=4", "unet.steps_per_epoch=2", "unet.refine.steps=0", "unet.health.min_median_peak=0.0"])
    member = Protocol(cfg).train_member("unet", 0, 20)
    done = json.loads((member / "done.json").read_text())
    assert "rejected_attempts" not in done and "capped" not in done and not list(member.glob("rejected_attempt_*"))


@pytest.mark.slow
def test_the_round_starts_from_the_member_a_run_without_it_trains(tmp_path: Path, tiny_synthetic: Path) -> None:
    """model_before_refine.pt is the member `unet.refine.steps=0` trains (same seed, same first round), so the
    stage-1 result of a run without the round can be read off a run with it."""
    from cmb.models.checkpoint import load_model
    from cmb.protocol.run import Protocol

    common = [*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "logger=csv", "unet.max_steps=6",
              "unet.steps_per_epoch=3"]
    plain = Protocol(_compose([*common, "name=plain", "unet.refine.steps=0"])).train_member("unet", 0, 20)
    refined = Protocol(_compose([*common, "name=refined", "unet.refine.steps=3", "unet.refine.threshold=0.2"])).train_member("unet", 0, 20)
    without, _ = load_model(plain / "model.pt")
    before, _ = load_model(refined / "model_before_refine.pt")
    after, _ = load_model(refined / "model.pt")
    for key, value in without.state_dict().items():
        torch.testing.assert_close(before.state_dict()[key], value, rtol=0, atol=0)
    assert any(not torch.equal(after.state_dict()[k], v) for k, v in without.state_dict().items() if v.is_floating_point())


def test_command_line_check_passes_what_hydra_accepts_and_names_mistyped_sweep_keys() -> None:
    from cmb.errors import ConfigError
    from cmb.validate import check_command_line, command_line_overrides

    accepted = [["-m", "fold=0,1", "batch_size=20,30"], ["--cfg", "job", "fold=3"], ["+extra=1", "hydra.run.dir=x"],
                ["-m", "experiment=lotcv", "stage=fold", "fold=range(0,8)", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4"],
                ["experiment=lotcv", "data=nifti", "data.root=/data/my_swi", "name=my_swi"]]
    for argv in accepted:
        check_command_line("train", argv, "train.py")
    with pytest.raises(ConfigError, match="batch_sise=20,30: train.py has no setting 'batch_sise'; did you mean batch_size"):
        check_command_line("train", ["-m", "fold=0,1", "batch_sise=20,30"], "train.py")
    assert command_line_overrides(["-c", "job", "fold=3", "-m"]) == ["fold=3"]
    assert command_line_overrides(["--config-name", "other", "fold=3"]) is None  # another config: Hydra's own checks


def test_help_shows_usage_first_and_infer_lists_only_what_it_uses(tmp_path: Path) -> None:
    train = run_cli(["--help"], tmp_path)
    assert train.returncode == 0 and train.stdout.startswith("train.py: train and evaluate")
    assert "python train.py experiment=lotcv" in train.stdout and "experiment: lotcv, paper" in train.stdout
    infer = run_cli(["--help"], tmp_path, script="infer.py")
    assert infer.returncode == 0 and infer.stdout.startswith("infer.py: detect CMBs")
    assert "Config groups" not in infer.stdout and "model_dir: null" in infer.stdout


def test_out_of_fold_files_of_a_retrained_member_are_recomputed(tmp_path: Path, tiny_synthetic: Path) -> None:
    from cmb.protocol.run import Protocol

    exp = Protocol(_compose([*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=retrained"]))
    cnn = exp.layout.member_dir("cnn", 0, 20)
    cnn.mkdir(parents=True)
    (cnn / "model.pt").write_bytes(b"first weights")
    oof = exp.fresh_output_folder(0, "cnn_scores")
    (oof / "scan.csv").write_text("scan_id,i,j,k\n")
    assert (exp.fresh_output_folder(0, "cnn_scores") / "scan.csv").is_file()  # same members: kept
    (cnn / "model.pt").write_bytes(b"retrained weights")  # the member deleted and trained again
    assert not (exp.fresh_output_folder(0, "cnn_scores") / "scan.csv").exists()
    assert json.loads((oof / "settings.json").read_text())["members"]["cnn_bs20"] != ""


def test_mimics_mined_under_other_mining_settings_are_mined_again_and_the_same_ones_are_kept(tmp_path: Path, tiny_synthetic: Path,
                                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A run resumed with another mining threshold (or retrained U-Nets) mines its mimics again instead of training
    the CNNs on mimics of the old threshold; the same settings and members keep the mined files."""
    from cmb.protocol import mining
    from cmb.protocol.run import Protocol

    calls: list[tuple[float, list[str]]] = []

    points: list[str] = []

    def fake_mine(todo, load, unet_map, threshold, radius, out, hits_out, point="centroid"):  # noqa: ANN001, ANN202 - records what is mined
        calls.append((threshold, list(todo)))
        points.append(point)
        out.mkdir(parents=True, exist_ok=True)
        hits_out.mkdir(parents=True, exist_ok=True)
        for scan_id in todo:
            (out / f"{scan_id}.csv").write_text(f"mined at {threshold}\n")
            (hits_out / f"{scan_id}.csv").write_text("")

    monkeypatch.setattr(mining, "mine_leak_free", fake_mine)
    args = [*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=remine"]

    def protocol(extra: list[str]) -> Protocol:
        exp = Protocol(_compose([*args, *extra]))
        monkeypatch.setattr(exp, "members", lambda stage, fold: [])
        monkeypatch.setattr(exp, "unet_map", lambda nets: None)
        return exp

    exp = protocol([])
    unet = exp.layout.member_dir("unet", 0, 20)
    unet.mkdir(parents=True)
    (unet / "model.pt").write_bytes(b"first weights")
    scans = exp.mined_scans(0)
    exp.mine(0)
    exp.mine(0)  # same settings, same members: nothing mined again
    assert calls == [(0.15, scans)]
    out = protocol(["mining.threshold=0.2"]).mine(0)
    assert calls[-1] == (0.2, scans)
    assert all((out / f"{s}.csv").read_text() == "mined at 0.2\n" for s in scans)
    assert json.loads((out / "settings.json").read_text())["mining"]["threshold"] == 0.2
    (unet / "model.pt").write_bytes(b"retrained weights")  # the U-Net deleted and trained again
    protocol(["mining.threshold=0.2"]).mine(0)
    assert len(calls) == 3 and calls[-1] == (0.2, scans)
    # mimics placed by another candidate point rule are mined again, by that rule
    protocol(["mining.threshold=0.2", "inference.candidate_point=peak"]).mine(0)
    assert len(calls) == 4 and points == ["centroid"] * 3 + ["peak"]


def test_the_cache_is_per_user_wherever_cmb_runs_and_does_not_enter_the_settings_hash(tmp_path: Path, tiny_synthetic: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from cmb import user_cache_dir
    from cmb.protocol.run import Protocol

    monkeypatch.delenv("CMB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert _compose([]).paths.cache_dir == str(tmp_path / "xdg" / "cmb") == user_cache_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir() == str(Path.home() / ".cache" / "cmb")
    monkeypatch.setenv("CMB_CACHE", str(tiny_synthetic))
    assert _compose([]).data.cache_dir == str(tiny_synthetic)
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(tiny_synthetic, moved)
    hashes = [Protocol(_compose([*SMOKE, f"paths.cache_dir={cache}", f"paths.runs_dir={tmp_path}", "name=cache"]))
              .member_settings_hash("unet", 0, 20) for cache in (tiny_synthetic, moved)]
    assert hashes[0] == hashes[1]


def test_out_of_fold_max_far_files_carry_peak_points_and_score_hits_at_the_window_taken(tmp_path: Path) -> None:
    """heldout_unet_candidates stores each component's peak point; heldout_cnn_scores puts a candidate whose far
    peak window scores higher at that point, with the CMBs it hits there; stage-1 files without peak points are refused."""
    import torch

    from cmb.data.preprocess import Preprocessed
    from cmb.data.scan import CMBInstance, Scan
    from cmb.errors import DataError
    from cmb.inference.candidates import read_candidates
    from cmb.protocol.detection import heldout_cnn_scores, heldout_unet_candidates
    from cmb.protocol.scans import RunTiming

    class CentreDarkness(torch.nn.Module):  # CMB logit 20 * (0.5 - the window's centre voxel)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            centre = x[:, 0, x.shape[2] // 2, x.shape[3] // 2, x.shape[4] // 2]
            return torch.stack([torch.zeros_like(centre), 20 * (0.5 - centre)], dim=1)

    image = np.full((40, 30, 30), 0.5, np.float32)
    image[10, 15, 15] = 0.05  # the CMB, at the peak of a component that a faint vein drags 4+ voxels along i
    prob = np.zeros(image.shape, np.float32)
    prob[9:12, 14:17, 14:17], prob[10, 15, 15], prob[12:30, 15, 15] = 0.6, 0.95, 0.4
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    scan = Scan("s", image, affine, tmp_path / "s.nii.gz", cmbs=[CMBInstance((10.0, 15.0, 15.0), (10.0, 15.0, 15.0))])
    pre = Preprocessed("s", image, np.ones(image.shape, bool), {})
    timing = RunTiming(tmp_path / "timing.json")
    stage1, scored, truth = tmp_path / "unet_candidates", tmp_path / "cnn_scores", tmp_path / "truth"
    for folder in (stage1, scored, truth):
        folder.mkdir()
    heldout_unet_candidates(["s"], 0, lambda _: (scan, pre), lambda _: prob, 0.2, 2.5, stage1, truth, timing, with_peak_point=True)
    (cand,), rows = read_candidates(stage1 / "s.csv")
    assert cand.i > 13 and rows[0]["hits"] == ""  # stage 1 at the centroid, in the vein: a miss
    np.testing.assert_allclose(cand.peak_point, (10, 15, 15), atol=1e-6)
    heldout_cnn_scores(["s"], stage1, lambda _: (scan, pre), [CentreDarkness()], False, "cpu", scored, timing, 2.5, "cnn", "max_far")
    (moved,), rows = read_candidates(scored / "s.csv")
    np.testing.assert_allclose(moved.voxel, (10, 15, 15), atol=1e-6)
    assert rows[0]["hits"] == "0" and moved.score > 0.99 and moved.peak == cand.peak
    heldout_cnn_scores(["s"], stage1, lambda _: (scan, pre), [CentreDarkness()], False, "cpu", scored, timing, 2.5, "cnn", "candidate")
    (kept,), rows = read_candidates(scored / "s.csv")
    assert kept.voxel.tolist() == cand.voxel.tolist() and rows[0]["hits"] == "" and kept.score == pytest.approx(0.5)  # a plain 0.5 window
    heldout_unet_candidates(["s"], 0, lambda _: (scan, pre), lambda _: prob, 0.2, 2.5, stage1, truth, timing)  # no peak points
    with pytest.raises(DataError, match="no peak points") as err:
        heldout_cnn_scores(["s"], stage1, lambda _: (scan, pre), [CentreDarkness()], False, "cpu", scored, timing, 2.5, "cnn", "max_far")
    assert str(stage1 / "s.csv") in str(err.value)
