"""Train the CMB detector.

    python train.py fold=3 batch_size=30                 # one stage-1 U-Net member
    python train.py stage=mine fold=3                    # mine stage-1 false positives for fold 3
    python train.py stage=cnn fold=3 batch_size=20       # one stage-2 CNN member
    python train.py experiment=lotcv                     # the whole LOTCV protocol + evaluation
    python train.py -m fold=0,1 batch_size=20,30         # Hydra multirun
    python train.py stage=score model_dir=runs/lotcv data.preset=physics_demo name=on_physics   # a run on other data
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cmb.conf_utils import hydra_entry, require_cache_folder
from cmb.errors import ConfigError, exit_on_user_error
from cmb.validate import check_command_line

log = logging.getLogger("cmb")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@hydra_entry
def main(cfg: DictConfig) -> float | None:
    from cmb.validate import check_train

    check_train(cfg)  # values first: a refused command reads and writes nothing (and imports no deep-learning library)
    from cmb.layout import FINAL
    from cmb.progress import quiet_console
    from cmb.protocol.run import Protocol

    quiet_console(bool(cfg.get("verbose", False)))
    require_cache_folder(cfg)
    if str(cfg.stage) == "score":  # a finished run scored on another labelled dataset
        from cmb.eval.evaluate import summary_lines
        from cmb.layout import RunLayout
        from cmb.protocol.transfer import score_run

        results = score_run(cfg)
        print(summary_lines(results))
        print(f"report: {RunLayout(Path(str(cfg.paths.run_dir))).report}")
        return float(results["froc"]["cpm"])
    protocol = Protocol(cfg)
    stage = str(cfg.stage)
    fold = FINAL if str(cfg.fold) == FINAL else cfg.fold
    if stage != "all":
        if not isinstance(fold, int) and fold != FINAL:
            raise ConfigError(f"fold must be an integer or 'final', got {fold!r}")
        protocol.fold_split(fold)  # range check with a clear message
    if stage in ("unet", "cnn"):
        out = protocol.train_member(stage, fold, int(cfg.batch_size))
        print(f"member written to {out}")
    elif stage == "mine":
        print(f"mimics written to {protocol.mine(fold)}")
    elif stage == "fold":
        protocol.run_fold(fold)
        print(f"fold {fold} finished in {protocol.layout.fold_dir(fold)}")
    elif stage == "all":
        from cmb.eval.evaluate import summary_lines

        results = protocol.run_all()
        print(summary_lines(results))
        print(f"report: {protocol.layout.report}")
        print(f"FROC plot: {protocol.layout.froc_plot}")
        return float(results["froc"]["cpm"])
    else:
        raise ConfigError(f"stage must be one of unet, cnn, mine, fold, all, score; got {stage!r}")
    return None


if __name__ == "__main__":
    exit_on_user_error(check_command_line)("train", sys.argv[1:], "train.py")  # a mistyped key: one line, exit 2
    main()
