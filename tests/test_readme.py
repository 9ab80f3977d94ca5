"""Every command line of the README runs as written on the default data, in smoke mode.

The README's ```bash blocks are read in order; each `python ...` line (with its `\\` continuations)
is run in one scratch folder with `debug=smoke` added to train.py commands (a few steps per
member, the default demo dataset: 8 scans, 4 folds). Paths the README leaves to the user
(`/data/my_swi`, ...) become folders of the phantom. Lines that need what CI has not (a SLURM
cluster, a GPU, the test suite itself, `pip install`) are listed in SKIPPED with the reason, so
a README that drifts from the code fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["debug=smoke"]
SKIPPED = {  # a command's start -> why it cannot run in CI
    "python -m pytest": "the test suite itself",
    "python train.py fold=0 trainer.accelerator=gpu": "needs GPUs",
    "python train.py -m experiment=lotcv stage=fold fold='range(0,4)' hydra/launcher=submitit_slurm": "needs a SLURM cluster",
    "python benchmarks/": "benchmarks (timed on the paper phantom, benchmarks/RESULTS.md)",
}


def readme_commands(text: str) -> list[str]:
    """`python ...` command lines of the README's bash blocks, in order, continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("python "):
                    commands.append(part)
    return commands


def _skip_reason(command: str) -> str | None:
    return next((why for start, why in SKIPPED.items() if command.startswith(start)), None)


def _smoke_args(command: str, paths: dict[str, str]) -> list[str]:
    for placeholder, real in paths.items():
        command = command.replace(placeholder, real)
    args = shlex.split(command)[1:]  # without "python"
    if args[0] == "train.py":
        args = [str(REPO / "train.py"), *args[1:], *SMOKE]
    elif args[0] == "infer.py":
        args = [str(REPO / "infer.py"), *args[1:], "progress=false"]
    return args


@pytest.mark.slow
def test_every_readme_command_runs_as_written_on_the_default_data(tmp_path: Path) -> None:
    commands = readme_commands((REPO / "README.md").read_text())
    assert "python train.py fold=3 batch_size=30" in commands  # the headline command of the step-by-step section
    assert any("hydra/launcher=joblib" in c for c in commands)
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    env = {**os.environ, "CMB_CACHE": str(cache), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # the user's own folders: the tiny phantom in the nifti layout, its images as new scans
    subprocess.run([sys.executable, "-m", "cmb.data.synthetic", str(tmp_path / "my_swi"), "--preset", "tiny"], cwd=work, env=env,
                   check=True, capture_output=True)
    paths = {"/data/my_swi": str(tmp_path / "my_swi"), "/data/new_scans": str(tmp_path / "my_swi" / "images"),
             "/data/detections": str(tmp_path / "detections")}
    ran, skipped = [], []
    for command in commands:
        why = _skip_reason(command)
        if why:
            skipped.append((command, why))
            continue
        if "data=nifti" in command and "train.py" in command:
            command += " inference.unet.tile=[32,32,32]"  # the tiny phantom is smaller than the default tile
        out = subprocess.run([sys.executable, *_smoke_args(command, paths)], cwd=work, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, f"README command failed: {command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        ran.append(command)
    assert len(ran) >= 10, ran
    assert {c for c, _ in skipped} <= set(commands)
    assert (work / "runs" / "lotcv" / "report.md").is_file() and (work / "runs" / "default" / "fold_3" / "cnn_scores").is_dir()
    assert (tmp_path / "detections" / "index.html").is_file()
