"""`python -m cmb.data.summary data=<layout> data.root=PATH`: one line per scan, then totals."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from cmb.conf_utils import CONFIG_DIR, hydra_entry, instantiate_checked
from cmb.data.readers import ScanDataset
from cmb.errors import describe_scan_failure, exit_on_failures, exit_on_user_error
from cmb.validate import check_command_line


def summarize(dataset: ScanDataset) -> tuple[list[str], dict[str, str]]:
    """(one line per readable scan and the totals, {scan id: why it cannot be read})."""
    lines, errors, n_cmbs = [], {}, 0
    for scan_id in dataset.scan_ids():
        try:
            scan = dataset.load(scan_id)
        except Exception as err:  # every bad scan is reported, as infer.py does, and the others are still listed
            errors[scan_id] = describe_scan_failure(err, scan_id)
            continue
        sp = "x".join(f"{s:.3g}" for s in scan.spacing_mm)
        shape = "x".join(str(s) for s in scan.shape)
        lines.append(f"{scan.scan_id}  shape {shape}  voxel {sp} mm  cmbs {len(scan.cmbs)}")
        n_cmbs += len(scan.cmbs)
    lines.append(f"scans: {len(lines)} cmbs: {n_cmbs}")
    return lines, errors


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="summary")
@hydra_entry
def main(cfg: DictConfig) -> None:
    lines, errors = summarize(instantiate_checked(cfg.data))
    for line in lines:
        print(line, flush=True)
    for line in errors.values():
        print(f"error: {line}", file=sys.stderr, flush=True)
    exit_on_failures(list(errors), len(errors) + len(lines) - 1, "scans cannot be read")


if __name__ == "__main__":
    exit_on_user_error(check_command_line)("summary", sys.argv[1:], "python -m cmb.data.summary")  # a mistyped key: one line, exit 2
    main()
