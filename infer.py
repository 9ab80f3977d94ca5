"""Detect CMBs on new scans with a trained run.

    python infer.py model_dir=runs/lotcv input=scan.nii.gz output=detections/
    python infer.py model_dir=runs/lotcv input=folder_of_niftis/ output=detections/ threshold=0.7
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm.auto import tqdm

from cmb.conf_utils import hydra_entry, require_cache_folder
from cmb.errors import CMBError, ConfigError, describe_scan_failure, exit_on_failures, exit_on_user_error
from cmb.validate import check_command_line, check_infer

log = logging.getLogger("cmb")


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
@hydra_entry
def main(cfg: DictConfig) -> None:
    for key in ("model_dir", "input", "output"):
        if not cfg.get(key):
            raise ConfigError(f"{key} is not set: python infer.py model_dir=RUN_DIR input=PATH output=DIR")
    check_infer(cfg)  # values first, before the deep-learning libraries are imported
    from cmb.data.io import input_id, require_writable
    from cmb.inference.predictor import Predictor, list_inputs, output_paths, write_output_index, write_outputs

    out_dir = Path(cfg.output)
    if out_dir.resolve().is_relative_to(Path(cfg.model_dir).resolve()):  # detections would mix with the run's own files
        raise ConfigError(f"output={cfg.output} lies inside the run folder model_dir={cfg.model_dir}: choose an output folder outside it")
    files = list_inputs(cfg.input)
    require_writable(out_dir, "output folder")
    require_cache_folder(cfg)
    if not cfg.overwrite:
        clashes = [p for f in files for p in output_paths(out_dir, input_id(f)) if p.exists()]
        if clashes:
            raise CMBError(f"{clashes[0]}: output exists already; pass overwrite=true or choose another output folder")
    predictor = Predictor(cfg.model_dir, cfg.fold, cfg.threshold, cfg.unet_mode, cfg.paths.cache_dir, progress=bool(cfg.progress))
    failed = []
    for path in tqdm(files, desc="scans", unit="scan", disable=not cfg.progress):
        try:
            det = predictor.predict_scan(path)
            written = write_outputs(det, out_dir, overwrite=bool(cfg.overwrite))
            print(f"{det.scan_id}: {len(det.scores)} detections (threshold {predictor.threshold:g}) -> {written[0]}", flush=True)
        except Exception as err:  # one bad scan never stops a batch: every failure is one line, the other scans are written
            failed.append(path)
            print(f"error: {describe_scan_failure(err, path)} (skipped)", file=sys.stderr, flush=True)
    if len(failed) < len(files):
        print(f"index of the output folder: {write_output_index(out_dir)}", flush=True)
    exit_on_failures([p.name for p in failed], len(files), "scans failed")


if __name__ == "__main__":
    exit_on_user_error(check_command_line)("infer", sys.argv[1:], "infer.py")  # a mistyped key: one line, exit 2
    main()
