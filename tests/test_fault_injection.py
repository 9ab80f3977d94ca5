"""Fault injection: members killed at random steps resume to exactly the weights, metrics and
records of an uninterrupted member (both stages, the U-Net's hard-negative round with replay
included). The other injected faults (hostile run folders, mixed good and bad scans, refused
re-runs, damaged and concurrent caches, invalid values) are in test_run_folder_safety.py,
test_bad_input.py, test_preprocess.py and test_protocol.py; the README's reliability table lists
every case with its test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["debug=smoke", "data.preset=tiny", "inference.unet.tile=[32,32,32]"]


class Killed(Exception):
    """What a kill looks like from inside: training stops between two steps, after the last checkpoint."""


class KillAtStep(pl.Callback):
    """Raises `Killed` before the `at`-th training batch of the process (counted over every trainer)."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.at:
            raise Killed(f"killed before batch {self.at}")
        self.seen += 1


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _train(cfg, stage: str, kill_at: int | None, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Train fold 0's batch-size-20 member of `stage`; with `kill_at`, kill it there first and resume."""
    from cmb.protocol.run import Protocol
    from cmb.protocol.trainer import TrainerFactory

    if kill_at is not None:
        killer = KillAtStep(kill_at)
        original = TrainerFactory.make

        def trainer_with_killer(self, *args, **kwargs):
            trainer = original(self, *args, **kwargs)
            trainer.callbacks.append(killer)
            return trainer

        with monkeypatch.context() as patched:
            patched.setattr(TrainerFactory, "make", trainer_with_killer)
            with pytest.raises(Killed):
                _member(Protocol(cfg), stage)
        assert not (Protocol(cfg).layout.member_dir(stage, 0, 20) / "done.json").exists()
    return _member(Protocol(cfg), stage)


def _member(exp, stage: str) -> Path:
    if stage == "cnn":
        _mimics(exp)
    return exp.train_member(stage, 0, 20)


def _mimics(exp) -> None:
    """Stage 2's prerequisites on the tiny data: the fold's U-Nets and their mined mimics."""
    for bs in exp.cfg.unet.batch_sizes:
        exp.train_member("unet", 0, bs)
    exp.mine(0)


def _outcome(member: Path) -> dict:
    done = json.loads((member / "done.json").read_text())
    done.pop("train_seconds")
    weights = torch.load(member / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    metrics = {name: (member / name).read_text() for name in ("metrics.csv", "refine_metrics.csv") if (member / name).is_file()}
    return {"done": done, "weights": weights, "metrics": metrics}


def _assert_same(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["done"] == uninterrupted["done"]
    assert resumed["weights"].keys() == uninterrupted["weights"].keys()
    for name, tensor in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), name  # bit for bit
    assert resumed["metrics"] == uninterrupted["metrics"]  # the whole history, the steps before the kill included


@pytest.mark.slow
@pytest.mark.parametrize("stage, total_steps", [("unet", 4 + 4), ("cnn", 6)])
def test_a_member_killed_at_random_steps_resumes_to_the_uninterrupted_member_bit_for_bit(
        tmp_path: Path, tiny_synthetic: Path, monkeypatch: pytest.MonkeyPatch, stage: str, total_steps: int) -> None:
    # 3 batches an epoch, a checkpoint every 2 steps: kills land mid-epoch, on epoch ends and between checkpoints;
    # the U-Net's 4 + 4 steps are its first round and its hard-negative round with replay (state in the checkpoint)
    from cmb.protocol.run import Protocol

    settings = [*SMOKE, f"paths.cache_dir={tiny_synthetic}", "unet.steps_per_epoch=3", "cnn.steps_per_epoch=3",
                "cnn.max_steps=6", "unet.refine.steps=4", "unet.refine.replay={below: 0.99, share: 0.5}", "unet.health=null"]
    reference = _outcome(_train(_compose([*settings, f"paths.runs_dir={tmp_path}", "name=uninterrupted"]), stage, None, monkeypatch))
    if stage == "unet":
        assert "refine_metrics.csv" in reference["metrics"] and reference["done"]["refine"]["replay_slipping_per_epoch"]
    assert len(reference["metrics"]["metrics.csv"].splitlines()) > 3
    rng = np.random.default_rng(20)
    kills = sorted({1, total_steps - 1, *rng.choice(np.arange(2, total_steps - 1), size=2, replace=False).tolist()})
    for at in kills:
        cfg = _compose([*settings, f"paths.runs_dir={tmp_path}", f"name=killed_at_{at}"])
        if stage == "cnn":  # the fold's U-Nets and mimics as in the reference run, first; only the CNN is killed
            _mimics(Protocol(cfg))
        _assert_same(_outcome(_train(cfg, stage, at, monkeypatch)), reference)


def test_stepseed_makes_each_steps_draws_a_function_of_seed_and_step() -> None:
    from cmb.models.lightning import StepSeed

    class Step:
        global_step = 7

    draws = []
    for noise in (0, 5):
        torch.rand(noise)  # whatever consumed random numbers before this step
        StepSeed(3).on_train_batch_start(Step(), None, None, 0)
        draws.append((torch.rand(4), np.random.rand(2)))
    assert torch.equal(draws[0][0], draws[1][0]) and np.array_equal(draws[0][1], draws[1][1])
    StepSeed(4).on_train_batch_start(Step(), None, None, 0)
    assert not torch.equal(torch.rand(4), draws[0][0])
    with pytest.raises(ValueError, match="trained with seed 3, not 4"):
        StepSeed(4).load_state_dict(StepSeed(3).state_dict())


def test_metrics_of_a_resumed_member_keep_the_steps_before_the_resume(tmp_path: Path) -> None:
    from cmb.protocol.members import merge_metrics

    logs = tmp_path / "csv"
    runs = {0: "epoch,step,train/loss\n0,0,0.9\n0,1,0.8\n0,2,0.7\n", 1: "epoch,step,train/loss,train/acc\n0,2,0.7,0.5\n1,3,0.6,0.6\n",
            10: "epoch,step,train/loss,train/acc\n1,3,0.6,0.6\n1,4,0.5,0.7\n"}  # version_10 sorts after version_1
    for version, text in runs.items():
        (logs / f"version_{version}").mkdir(parents=True)
        (logs / f"version_{version}" / "metrics.csv").write_text(text)
    merge_metrics(logs, tmp_path / "metrics.csv")
    assert (tmp_path / "metrics.csv").read_text() == ("epoch,step,train/loss,train/acc\n0,0,0.9,\n0,1,0.8,\n0,2,0.7,0.5\n"
                                                       "1,3,0.6,0.6\n1,4,0.5,0.7\n")


def test_compare_runs_finds_a_changed_weight(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    run = tmp_path / "a" / "fold_0" / "cnn_bs20"
    run.mkdir(parents=True)
    (tmp_path / "a" / "results.json").write_text(json.dumps({"froc": {"cpm": 0.9}, "timing_s": {"train": 1}}))
    torch.save({"state_dict": {"w": torch.ones(3)}}, run / "model.pt")
    (run / "done.json").write_text(json.dumps({"steps": 4, "train_seconds": 1.0}))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "results.json").write_text(json.dumps({"froc": {"cpm": 0.9}, "timing_s": {"train": 2}}))
    (tmp_path / "b" / "fold_0" / "cnn_bs20" / "done.json").write_text(json.dumps({"steps": 4, "train_seconds": 2.0}))
    script = [sys.executable, str(REPO / "benchmarks" / "compare_runs.py"), str(tmp_path / "a"), str(tmp_path / "b")]
    same = subprocess.run(script, capture_output=True, text=True)
    assert same.returncode == 0 and "model files (bit for bit): 1/1 equal" in same.stdout  # timing aside
    torch.save({"state_dict": {"w": torch.tensor([1.0, 1.0, 1.0 + 1e-7])}}, tmp_path / "b" / "fold_0" / "cnn_bs20" / "model.pt")
    changed = subprocess.run(script, capture_output=True, text=True)
    assert changed.returncode == 1 and "DIFFERS fold_0/cnn_bs20/model.pt" in changed.stdout


def test_unwritable_output_and_run_folders_are_refused_before_any_work(tmp_path: Path, tiny_synthetic: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from cmb.data.io import require_writable
    from cmb.errors import DataError
    from cmb.protocol.run import Protocol

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked and mode == os.W_OK else real_access(path, mode))
    with pytest.raises(DataError, match="locked: output folder is not writable"):
        require_writable(locked / "detections" / "new", "output folder")  # the nearest existing part decides
    require_writable(tmp_path / "free", "output folder")
    (tmp_path / "notes.txt").write_text("a file where a folder should be")
    for target in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "sub"):  # before: a FileExistsError after inference
        with pytest.raises(DataError, match=r"notes.txt: is a file, not a folder: the output folder \(.*\) must be a folder"):
            require_writable(target, "output folder")
    exp = Protocol(_compose([*SMOKE, f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={locked}", "name=run"]))
    with pytest.raises(DataError, match="not writable"):
        exp.prepare()
    assert list(locked.iterdir()) == []


def test_training_clock_estimates_the_time_left_at_each_kinds_pace() -> None:
    from cmb.progress import TrainingClock, format_eta

    clock = TrainingClock()
    clock.plan(300, "unet")
    clock.plan(200, "cnn")
    assert clock.seconds_left() is None
    clock.record(100, 50.0, "unet")  # 0.5 s a U-Net step; CNN steps not timed yet: the mean pace
    assert clock.seconds_left() == pytest.approx(200 * 0.5 + 200 * 0.5)
    assert format_eta(clock.seconds_left()) == "ETA 3 min" and format_eta(45) == "ETA 45 s" and format_eta(None) == "ETA …"
    clock.record(200, 100.0, "unet")
    clock.record(100, 10.0, "cnn")  # 0.1 s a CNN step
    assert clock.seconds_left() == pytest.approx(100 * 0.1)
