"""`python -m cmb.data.summary data=<layout> data.root=PATH`: one line per scan, then totals."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cmb.conf_utils import CONFIG_DIR, hydra_entry, instantiate_checked
from cmb.data.readers import ScanDataset


def summarize(dataset: ScanDataset) -> list[str]:
    lines, n_cmbs = [], 0
    for scan in dataset:
        sp = "x".join(f"{s:.3g}" for s in scan.spacing_mm)
        shape = "x".join(str(s) for s in scan.shape)
        lines.append(f"{scan.scan_id}  shape {shape}  voxel {sp} mm  cmbs {len(scan.cmbs)}")
        n_cmbs += len(scan.cmbs)
    lines.append(f"scans: {len(lines)} cmbs: {n_cmbs}")
    return lines


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="summary")
@hydra_entry
def main(cfg: DictConfig) -> None:
    for line in summarize(instantiate_checked(cfg.data)):
        print(line, flush=True)


if __name__ == "__main__":
    main()
