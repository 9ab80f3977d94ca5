"""The run folder's layout: every folder and file name a run holds, defined here and nowhere else.

    <run>/config.yaml, metadata.json, splits.json, timing.json, logs/
    <run>/fold_<k>/<stage>_bs<n>/              one member (stage: unet | cnn); MemberFiles below
    <run>/fold_<k>/mimics/<scan>.csv           mined U-Net false positives on fold k's training scans
    <run>/fold_<k>/stage1_hits/<scan>.csv      mined U-Net components that hit a CMB of fold k's training scans
    <run>/fold_<k>/unet_candidates/<scan>.csv  held-out scans: components of the U-Nets' combined map
    <run>/fold_<k>/cnn_scores/<scan>.csv       the same candidates with the CNNs' score
    <run>/fold_<k>/paper_mining/<scan>.csv     mining.mode=paper: held-out components at the mining threshold
    <run>/fold_<k>/truth/<scan>.json           the held-out scans' CMBs
    <run>/fold_final/...                       the members trained on every scan (infer.py)
    <run>/results.json, report.md, froc.png, operating_points.csv, review/   (cmb.eval)

docs/design.md describes each file's content. Code that reads or writes a run asks `RunLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmb.errors import DataError

STAGES = ("unet", "cnn")  # stage 1 (localization) and stage 2 (discrimination), by the network each trains
FINAL = "final"  # the fold whose members are trained on every scan
SETTINGS_FILE = "settings.json"  # in an out-of-fold folder: the settings its files came from

# out-of-fold folders of a fold, and the member stages whose weights their files depend on
UNET_CANDIDATES = "unet_candidates"
CNN_SCORES = "cnn_scores"
PAPER_MINING = "paper_mining"
MIMICS = "mimics"
STAGE1_HITS = "stage1_hits"
TRUTH = "truth"
FOLDER_MEMBERS = {UNET_CANDIDATES: ("unet",), PAPER_MINING: ("unet",), CNN_SCORES: ("unet", "cnn"), MIMICS: ("unet",),
                  STAGE1_HITS: ("unet",)}


def member_name(stage: str, batch_size: int) -> str:
    """'unet_bs20': the folder of one member inside its fold folder."""
    return f"{stage}_bs{int(batch_size)}"


@dataclass(frozen=True)
class MemberFiles:
    """The files of one member folder (`fold_<k>/<stage>_bs<n>/`)."""

    root: Path

    @property
    def model(self) -> Path:  # safe weights (cmb.models.checkpoint), the member infer.py uses
        return self.root / "model.pt"

    @property
    def model_before_refine(self) -> Path:  # a U-Net with a hard-negative round: its first-round weights
        return self.root / "model_before_refine.pt"

    @property
    def done(self) -> Path:
        return self.root / "done.json"

    @property
    def started(self) -> Path:
        return self.root / "started.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def refine_dir(self) -> Path:  # checkpoints and logs of the hard-negative round
        return self.root / "refine"

    @property
    def refine_metrics(self) -> Path:
        return self.root / "refine_metrics.csv"

    @property
    def hard_negatives(self) -> Path:  # <scan>.csv: the member's own false positives on its training scans
        return self.root / "hard_negatives"

    def rejected_attempt(self, n: int) -> Path:
        return self.root / f"rejected_attempt_{n}"

    def rejected_attempts(self) -> list[Path]:
        return sorted(self.root.glob("rejected_attempt_*"))


def checkpoint_dir(log_root: Path) -> Path:
    """Lightning checkpoints of a training round logged under `log_root` (a member folder or its refine/)."""
    return log_root / "checkpoints"


def last_checkpoint(log_root: Path) -> Path:
    return checkpoint_dir(log_root) / "last.ckpt"


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder `root`."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # run-level files
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def timing(self) -> Path:
        return self.root / "timing.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def froc_plot(self) -> Path:
        return self.root / "froc.png"

    @property
    def operating_points(self) -> Path:
        return self.root / "operating_points.csv"

    @property
    def review(self) -> Path:
        return self.root / "review"

    # folds and members
    def fold_dir(self, fold: int | str) -> Path:
        return self.root / f"fold_{fold}"

    def member_dir(self, stage: str, fold: int | str, batch_size: int) -> Path:
        return self.fold_dir(fold) / member_name(stage, batch_size)

    def member(self, stage: str, fold: int | str, batch_size: int) -> MemberFiles:
        return MemberFiles(self.member_dir(stage, fold, batch_size))

    def fold_folder(self, fold: int | str, folder: str) -> Path:
        """`fold_<k>/<folder>` for one of the out-of-fold folders (UNET_CANDIDATES, CNN_SCORES, ...)."""
        return self.fold_dir(fold) / folder

    def scan_file(self, fold: int | str, folder: str, scan_id: str) -> Path:
        """`fold_<k>/<folder>/<scan>.csv` (`<scan>.json` in TRUTH)."""
        return self.fold_folder(fold, folder) / f"{scan_id}{'.json' if folder == TRUTH else '.csv'}"

    def fold_names(self) -> list[str]:
        """The fold folders present, as 'fold_<k>' names."""
        return sorted(p.name for p in self.root.glob("fold_*") if p.is_dir())

    def refuse_foreign(self) -> None:
        """Never write a run into a folder that holds something else (the runs folder itself, a data folder): a
        DataError naming it when `root` has visible entries and none is a run's (config.yaml, metadata.json,
        splits.json, logs/, fold_*/). A run folder, an empty folder or none passes."""
        if not self.root.is_dir():
            return
        entries = sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))
        run_like = {"config.yaml", "metadata.json", "splits.json", "logs"}
        if entries and not any(e in run_like or (e.startswith("fold_") and (self.root / e).is_dir()) for e in entries):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise DataError(self.root, f"not a run folder and not empty ({shown}); a run needs its own folder: pass another name=...")

    def member_stamps(self) -> list[tuple[Path, str, int | str, int]]:
        """Every done.json and started.json of a member folder in the run: (stamp, stage, fold, batch size)."""
        found = []
        for name in ("done.json", "started.json"):
            for stamp in sorted(self.root.glob(f"fold_*/*_bs*/{name}")):
                parsed = parse_member_dir(stamp.parent)
                if parsed is not None:
                    found.append((stamp, *parsed))
        return found


def parse_member_dir(path: Path) -> tuple[str, int | str, int] | None:
    """(stage, fold, batch size) of a member folder `.../fold_<k>/<stage>_bs<n>`, or None if it is not one."""
    stage, _, bs = path.name.partition("_bs")
    fold = path.parent.name.removeprefix("fold_")
    if stage not in STAGES or not bs.isdigit() or not (fold == FINAL or fold.isdigit()) or not path.parent.name.startswith("fold_"):
        return None
    return stage, fold if fold == FINAL else int(fold), int(bs)
