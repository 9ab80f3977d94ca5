"""Score a finished run on another labelled dataset (cross-dataset / cross-family evaluation).

    python train.py stage=score model_dir=runs/lotcv data.preset=physics_demo name=lotcv_on_physics_demo

The run's final models (or fold K's, `transfer_fold=K`) score every scan of the dataset given by
`data`, through the same code as `infer.py` (`Predictor.score_scan`: the run's preprocessing,
candidates and both ensembles). The result is a run folder of one fold holding every scan,
`runs/<name>/`, that `python -m cmb.eval` evaluates like any other:

- `config.yaml`: the scored run's settings with the new `data` and a `transfer` block (the run
  scored, its members, the threshold it chose on its own out-of-fold data);
- `splits.json` (one fold), `fold_0/{truth,unet_candidates,cnn_scores}/` (the files of a held-out fold) and
  `fold_0/<member>` links to the scored run's members, whose checksums stamp the files;
- `results.json`/`report.md` with `transfer_operating_point`: the scored run's own threshold
  applied unchanged, the figure to quote. The in-sample point chooses its threshold on the new
  data and is optimistic; there is no nested point (one fold).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cmb.conf_utils import instantiate_checked, write_config_and_metadata
from cmb.data.io import atomic_write_text, require_writable
from cmb.errors import ConfigError, DataError
from cmb.eval.run_files import folder_settings
from cmb.inference.candidates import candidate_points, write_candidates
from cmb.layout import CNN_SCORES, TRUTH, UNET_CANDIDATES, MemberFiles, RunLayout
from cmb.protocol.detection import fresh_output_folder, hits_column, write_truth_file
from cmb.protocol.mining import scan_truth
from cmb.protocol.scans import RunTiming

log = logging.getLogger(__name__)
FOLD = 0


def transfer_config(cfg: DictConfig, source_cfg: DictConfig, model_dir: Path, members_fold: str, threshold: float) -> DictConfig:
    """The scored run's settings with the new dataset, paths and name, and the `transfer` block."""
    out = OmegaConf.create(OmegaConf.to_container(source_cfg, resolve=False))
    for key in ("data", "paths", "name", "seed"):
        out[key] = OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg[key], DictConfig) else cfg[key]
    out.stage = "score"
    out.protocol = {**OmegaConf.to_container(source_cfg.get("protocol", {}), resolve=True), "train_final": False}  # type: ignore[dict-item]
    out.transfer = {"model_dir": str(model_dir.resolve()), "members": RunLayout(model_dir).fold_dir(members_fold).name, "threshold": float(threshold),
                    "source_dataset": OmegaConf.to_container(source_cfg.data, resolve=True)}
    return out  # type: ignore[return-value]


def score_run(cfg: DictConfig) -> dict[str, Any]:
    """`train.py stage=score`: score `cfg.model_dir` on `cfg.data` into `cfg.paths.run_dir`; returns results.json's dict."""
    from cmb.eval.evaluate import evaluate_run, load_run_config
    from cmb.inference.predictor import Predictor

    if not cfg.get("model_dir"):
        raise ConfigError("stage=score needs model_dir=RUN_DIR (a finished run to score on data=...)")
    model_dir = Path(str(cfg.model_dir))
    out_dir = Path(str(cfg.paths.run_dir))
    layout = RunLayout(out_dir)
    layout.refuse_foreign()
    source_cfg = load_run_config(model_dir)
    predictor = Predictor(model_dir, cfg.get("transfer_fold"), None, None, cfg.paths.cache_dir, progress=False)
    if out_dir.resolve() == model_dir.resolve():
        raise ConfigError(f"{out_dir}: the scores go into a new run folder; pass name=... other than the scored run's")
    tcfg = transfer_config(cfg, source_cfg, model_dir, predictor.fold, predictor.threshold)
    if layout.config.is_file():
        saved = OmegaConf.load(layout.config)
        saved_transfer, saved_data = saved.get("transfer"), saved.get("data")  # a LOTCV run has no transfer block
        if not isinstance(saved_transfer, DictConfig) or not isinstance(saved_data, DictConfig) or \
                OmegaConf.to_container(saved_transfer, resolve=True) != OmegaConf.to_container(tcfg.transfer, resolve=True) or \
                OmegaConf.to_container(saved_data, resolve=True) != OmegaConf.to_container(tcfg.data, resolve=True):
            raise ConfigError(f"{out_dir}: holds another run or another scoring; use a new name=... (nothing was written)")
    require_writable(out_dir, "run folder")
    dataset = instantiate_checked(cfg.data)
    scan_ids = dataset.scan_ids()
    fold_dir = layout.fold_dir(FOLD)
    fold_dir.mkdir(parents=True, exist_ok=True)
    source_members = RunLayout(model_dir).fold_dir(predictor.fold)
    for member in sorted(p.name for p in source_members.glob("*_bs*") if MemberFiles(p).model.is_file()):
        link = fold_dir / member
        if not link.exists():
            link.symlink_to((source_members / member).resolve(), target_is_directory=True)
    write_config_and_metadata(out_dir, tcfg, n_folds=1)
    splits = {"seed": int(cfg.seed), "source": "transfer", "scan_ids": scan_ids, "folds": [{"fold": FOLD, "test": scan_ids}]}
    atomic_write_text(json.dumps(splits, indent=1), layout.splits)
    folders = {name: layout.fold_folder(FOLD, name) for name in (UNET_CANDIDATES, CNN_SCORES, TRUTH)}
    for name in (UNET_CANDIDATES, CNN_SCORES):  # a resumed scoring keeps files of the same settings only (the scored run may have changed)
        folders[name].mkdir(parents=True, exist_ok=True)
        fresh_output_folder(folders[name], folder_settings(tcfg, fold_dir, name))
    radius = float(tcfg.eval.match_radius_mm)
    timing = RunTiming(layout.timing)  # accumulated per scan: a resumed scoring keeps the time of the scans scored before
    for n, scan_id in enumerate(scan_ids, start=1):
        if all(layout.scan_file(FOLD, f, scan_id).is_file() for f in folders):
            continue
        scan, _, cands, scored, seconds = predictor.score_scan(dataset.load(scan_id))  # scan: on the scored run's working grid
        truth = scan_truth(scan)
        write_candidates(cands, layout.scan_file(FOLD, UNET_CANDIDATES, scan_id), {"hits": hits_column(candidate_points(cands), truth, radius)})
        write_candidates(scored, layout.scan_file(FOLD, CNN_SCORES, scan_id), {"hits": hits_column(candidate_points(scored), truth, radius)})
        write_truth_file(layout.scan_file(FOLD, TRUTH, scan_id), scan, FOLD)
        timing.add("preprocess", seconds["preprocess"])
        timing.add("stage1_inference", seconds["stage1"], "n_stage1_scans")
        timing.add("stage2_inference", seconds["stage2"], "n_stage2_scans")
        log.info("scored %s (%d/%d): %d candidates", scan_id, n, len(scan_ids), len(cands))
    if not scan_ids:
        raise DataError(out_dir, "the dataset to score has no scans")
    return evaluate_run(out_dir, tcfg)
