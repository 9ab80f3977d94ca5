"""Detection on new scans with a trained run: preprocessing, both ensembles, outputs.

Every front door (file, folder) funnels into `Predictor.predict_scan`.
Outputs per scan (docs/design.md): `<id>_detections.csv`, `<id>_stage1_prob.nii.gz` (input's
own grid and affine), `<id>_detections.mrk.json` (3D Slicer markups) and `<id>_detections.png`
(a tile per detection, cmb.pictures); per output folder `index.html`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cmb.data.dicom import is_dicom_folder
from cmb.data.io import from_canonical, input_id, is_broken_link, is_nifti_name, mm_to_vox, vox_to_mm
from cmb.data.preprocess import PreprocessConfig, brain_mask_method, preprocess_on_working_grid
from cmb.data.readers import build_scan
from cmb.data.resample import to_native_grid
from cmb.data.scan import Scan
from cmb.errors import ConfigError, DataError
from cmb.eval.matching import detection_order
from cmb.inference.candidates import Candidate, candidate_point, candidate_points, extract_candidates, stage2_window
from cmb.inference.unet_map import UNetMapConfig, ensemble_probability
from cmb.inference.cnn_scores import score_candidates
from cmb.layout import FINAL, MemberFiles, RunLayout, member_name
from cmb.models.checkpoint import load_model

log = logging.getLogger(__name__)
VOXEL_SIZE_TOLERANCE = 0.25  # infer.py warns when a scan's voxel size lies further than this outside the training scans' range
OUTPUT_SUFFIXES = ("_detections.csv", "_stage1_prob.nii.gz", "_detections.mrk.json", "_detections.png")


@dataclass
class ScanDetections:
    """Detections of one scan on the input file's own voxel grid (0-based) and in RAS mm."""

    scan_id: str
    voxels: np.ndarray  # (N, 3) float, input grid
    mm: np.ndarray  # (N, 3)
    scores: np.ndarray  # (N,) stage-2 ensemble probability (descending; ties by canonical position)
    stage1_scores: np.ndarray  # (N,) combined stage-1 peak
    prob_map: np.ndarray  # float32, input grid
    affine: np.ndarray  # input affine
    seconds: dict
    canonical_voxels: np.ndarray | None = None  # (N, 3) the same detections on the RAS grid of `image`
    image: np.ndarray | None = None  # the scan's own intensities, RAS grid (for the pictures)
    spacing_mm: tuple[float, float, float] | None = None  # voxel size of `image`
    slice_uids: list[str] | None = None  # DICOM input: SOP Instance UID of each slice k of the input grid


def resolve_members(model_dir: Path, fold: str | int | None) -> tuple[Path, str]:
    """The fold folder whose members are used: `fold_final` by default, else the fold asked for."""
    if not model_dir.is_dir():
        raise DataError(model_dir, "model_dir does not exist")
    layout = RunLayout(model_dir)
    if fold is None:
        fold = FINAL if layout.fold_dir(FINAL).is_dir() else None
        if fold is None:
            raise ConfigError(f"{model_dir}: no {layout.fold_dir(FINAL).name} models (protocol.train_final=false?); pass fold=K, one of "
                              f"{layout.fold_names()}")
    folder = layout.fold_dir(fold)
    if not folder.is_dir():
        raise DataError(folder, "no such fold in this run")
    return folder, str(fold)


def load_member(path: Path, device: str, stage: str) -> tuple[torch.nn.Module, dict]:
    """A member's network and saved metadata (cmb.models.checkpoint.load_model), or a DataError when it is missing."""
    if not path.is_file():
        raise DataError(path, "member model missing: is this run finished?")
    return load_model(path, device, stage=stage)


def voxel_size_warning(scan_id: str, spacing_mm: tuple[float, float, float], training: dict | None,
                       tolerance: float = VOXEL_SIZE_TOLERANCE) -> str | None:
    """A warning when the scan's voxel size (mm, on the run's working grid) lies more than `tolerance` (a fraction) outside the
    training scans' range along any axis (the 20x20x16 window then covers other millimetres than in training); else None."""
    if not training:
        return None
    low, high = np.asarray(training["min"], float), np.asarray(training["max"], float)
    size = np.asarray(spacing_mm, float)
    if np.all(size >= low * (1 - tolerance)) and np.all(size <= high * (1 + tolerance)):
        return None
    shown = lambda v: "x".join(f"{x:.2f}" for x in v)  # noqa: E731
    seen = shown(low) if np.allclose(low, high) else f"{shown(low)} to {shown(high)}"
    return (f"{scan_id}: voxel size {shown(size)} mm is far from the training scans' ({seen} mm): the models' windows cover other "
            "millimetres here than in training, so detections may be unreliable; train with preprocess.spacing=median (every scan "
            "resampled to one voxel size), or on scans like this one")


class Predictor:
    """Loads a run's U-Nets and CNNs once and detects CMBs on scans."""

    def __init__(self, model_dir: str | Path, fold: str | int | None = None, threshold: float | None = None,
                 unet_mode: str | None = None, cache_dir: str | Path | None = None, device: str | None = None,
                 progress: bool = True) -> None:
        self.model_dir = Path(model_dir)
        cfg_path = RunLayout(self.model_dir).config
        if not cfg_path.is_file():
            raise DataError(self.model_dir, "not a run folder (no config.yaml)")
        self.run_cfg: DictConfig = OmegaConf.load(cfg_path)  # type: ignore[assignment]
        if "unet" not in self.run_cfg:  # before cmb 0.2 the U-Net's group was `model`, and its run folders were laid out otherwise
            raise DataError(cfg_path, "a run folder of an earlier cmb (no `unet` settings); train it again with this version")
        folder, self.fold = resolve_members(self.model_dir, fold)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        unets = [load_member(MemberFiles(folder / member_name("unet", bs)).model, self.device, "unet") for bs in self.run_cfg.unet.batch_sizes]
        self.unets = [net for net, _ in unets]
        self.cnns = [load_member(MemberFiles(folder / member_name("cnn", bs)).model, self.device, "cnn")[0]
                     for bs in self.run_cfg.cnn.batch_sizes]
        self.training_voxel_mm = unets[0][1].get("training_voxel_mm")  # None for members of an earlier cmb
        self.threshold = self._threshold(threshold)
        self.pre_cfg = PreprocessConfig.from_settings(self.run_cfg.preprocess, cfg_path)  # values only, never instantiate()
        if self.pre_cfg.mask in ("deepbet", "hdbet"):  # the run's mask method must run here too: refuse before any scan
            brain_mask_method(self.pre_cfg.mask, False, self.pre_cfg.hdbet_weights)
        self.unet_cfg = UNetMapConfig.from_cfg(self.run_cfg.inference.unet)
        if unet_mode:
            self.unet_cfg.mode = unet_mode
        self.unet_cfg.progress = progress
        self.unet_threshold = float(self.run_cfg.inference.unet_threshold)
        self.candidate_point = candidate_point(self.run_cfg)  # as the run's out-of-fold candidates were placed
        self.stage2_window = stage2_window(self.run_cfg)  # and scored
        self.far_mm = float(self.run_cfg.eval.match_radius_mm)  # the max_far distance
        self.cache_dir = cache_dir

    def _threshold(self, override: float | None) -> float:
        if override is not None:
            return float(override)
        results = RunLayout(self.model_dir).results
        if not results.is_file():
            raise ConfigError(f"{results} not found: no out-of-fold sweep to take the threshold from; pass threshold=X")
        chosen = json.loads(results.read_text()).get("chosen_operating_point")
        if not chosen:
            raise ConfigError(f"{results} has no chosen_operating_point; pass threshold=X")
        log.info("operating threshold %g from the out-of-fold sweep (%s; chosen on all out-of-fold scans)", chosen["threshold"],
                 chosen.get("rule", ""))
        return float(chosen["threshold"])

    def score_scan(self, scan: Scan) -> tuple[Scan, np.ndarray, list[Candidate], list[Candidate], dict[str, float]]:
        """Both stages on one scan: (the scan on the run's working grid (`preprocess.spacing`), the combined
        stage-1 map (I, J, K) on that grid, the stage-1 candidates, the same candidates with stage-2 scores, each
        at the point of the window scored (`inference.stage2_window`), seconds per step). The same candidates,
        points and scores as a run's out-of-fold files (cmb.protocol.detection)."""
        t0 = time.perf_counter()
        scan, pre = preprocess_on_working_grid(scan, self.pre_cfg, self.cache_dir)
        far = voxel_size_warning(scan.scan_id, scan.spacing_mm, self.training_voxel_mm)
        if far:
            log.warning(far)
        t1 = time.perf_counter()
        image, mask = np.asarray(pre.image), np.asarray(pre.mask)
        prob = ensemble_probability(self.unets, image, mask, self.unet_cfg, str(self.run_cfg.inference.ensemble_normalize), self.device)
        cands = extract_candidates(prob, self.unet_threshold, scan.affine, scan.scan_id, point=self.candidate_point,
                                   with_peak_point=self.stage2_window != "candidate")
        t2 = time.perf_counter()
        scored = score_candidates(self.cnns, image, cands, tta=bool(self.run_cfg.inference.cnn_tta), device=self.device,
                                  fusion=str(self.run_cfg.inference.get("score_fusion", "cnn")), window=self.stage2_window,
                                  affine=scan.affine, far_mm=self.far_mm)
        t3 = time.perf_counter()
        return scan, prob, cands, scored, {"preprocess": t1 - t0, "stage1": t2 - t1, "stage2": t3 - t2}

    def predict_scan(self, path: str | Path, scan_id: str | None = None) -> ScanDetections:
        path = Path(path)
        scan, prob, _, scored, seconds = self.score_scan(build_scan(scan_id or input_id(path), path, has_truth=False))
        kept = [c for c in scored if c.score >= self.threshold]
        kept = [kept[n] for n in detection_order(np.array([c.score for c in kept]), candidate_points(kept))]
        mm = vox_to_mm(candidate_points(kept), scan.affine)
        assert scan.source_affine is not None and scan.to_canonical is not None
        src_vox = mm_to_vox(mm, scan.source_affine)
        return ScanDetections(scan.scan_id, src_vox, mm, np.array([c.score for c in kept]), np.array([c.peak for c in kept]),
                              from_canonical(to_native_grid(prob, scan), scan.to_canonical), scan.source_affine, seconds,
                              candidate_points(kept), np.asarray(scan.image), scan.spacing_mm,
                              scan.slice_uids)


def output_paths(out_dir: Path, scan_id: str) -> list[Path]:
    return [out_dir / f"{scan_id}{s}" for s in OUTPUT_SUFFIXES]


def write_outputs(det: ScanDetections, out_dir: Path, overwrite: bool = False) -> list[Path]:
    """Write the outputs (table, stage-1 map, Slicer markups, picture); all appear together (temporary names, then renamed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = output_paths(out_dir, det.scan_id)
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise DataError(existing[0], "output exists already; pass overwrite=true or choose another output folder")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{det.scan_id}-", dir=out_dir))
    try:
        uids = det.slice_uids
        rows = ["scan_id,i,j,k,x_mm,y_mm,z_mm,score,stage1_score" + (",sop_instance_uid" if uids is not None else "")]
        for v, m, s, s1 in zip(det.voxels, det.mm, det.scores, det.stage1_scores):
            # positions to 1/1000 voxel or mm; scores at full precision (they tie at 4 digits near 1)
            row = f"{det.scan_id},{v[0]:.3f},{v[1]:.3f},{v[2]:.3f},{m[0]:.3f},{m[1]:.3f},{m[2]:.3f},{float(s)!r},{float(s1)!r}"
            if uids is not None:  # the slice a PACS viewer jumps to: the nearest slice k of the series
                row += f",{uids[int(np.clip(np.rint(v[2]), 0, len(uids) - 1))]}"
            rows.append(row)
        (tmp_dir / targets[0].name).write_text("\n".join(rows) + "\n")
        prob_map = nib.Nifti1Image(det.prob_map.astype(np.float32), det.affine)
        prob_map.header.set_xyzt_units("mm")  # the affine is in mm whatever units the input's header used (cmb.data.io)
        nib.save(prob_map, tmp_dir / targets[1].name)
        (tmp_dir / targets[2].name).write_text(json.dumps(slicer_markups(det), indent=1))
        write_detection_picture(det, tmp_dir / targets[3].name)
        for t in targets:
            os.replace(tmp_dir / t.name, t)
    finally:
        for leftover in tmp_dir.iterdir():
            leftover.unlink()
        tmp_dir.rmdir()
    return targets


def write_detection_picture(det: ScanDetections, path: Path) -> None:
    """`<id>_detections.png`: one tile per detection, highest score first (cmb.pictures)."""
    from cmb.pictures import Tile, write_tiles

    if det.image is None or det.canonical_voxels is None or det.spacing_mm is None:
        raise ValueError("detections without the scan's image cannot be pictured")
    tiles = [Tile(c, f"#{n + 1} score {float(s):.3f}\nvoxel {v[0]:.0f},{v[1]:.0f},{v[2]:.0f}")
             for n, (c, v, s) in enumerate(zip(det.canonical_voxels, det.voxels, det.scores))]
    write_tiles(det.image, det.spacing_mm, tiles, path, f"{det.scan_id}: {len(tiles)} detections")


def write_output_index(out_dir: Path) -> Path:
    """`out_dir`/index.html listing every scan with outputs in the folder (count, table, picture), rebuilt each run."""
    from cmb.pictures import write_index

    rows = []
    for table in sorted(out_dir.glob("*_detections.csv")):
        scan_id = table.name[: -len("_detections.csv")]
        count = max(0, len(table.read_text().splitlines()) - 1)
        picture = out_dir / f"{scan_id}_detections.png"
        rows.append((scan_id, count, table.name, picture.name if picture.is_file() else None))
    return write_index(out_dir, rows, f"cmb detections in {out_dir}")


def slicer_markups(det: ScanDetections) -> dict:
    """3D Slicer point list (markups JSON, RAS coordinates) with one control point per detection."""
    points = [{"id": str(n + 1), "label": f"CMB-{n + 1}", "description": f"score {s:.3f}, stage-1 {s1:.3f}",
               "associatedNodeID": "", "position": [round(float(x), 3) for x in m], "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
               "selected": True, "locked": False, "visibility": True, "positionStatus": "defined"}
              for n, (m, s, s1) in enumerate(zip(det.mm, det.scores, det.stage1_scores))]
    return {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
            "markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "coordinateUnits": "mm", "locked": False, "labelFormat": "CMB-%d",
                         "controlPoints": points, "display": {"visibility": True, "color": [1.0, 0.2, 0.2], "glyphScale": 2.0}}]}


def list_inputs(path: str | Path) -> list[Path]:
    """A NIfTI file; a DICOM series folder (one scan); or a folder's NIfTI files and DICOM series sub-folders (one
    scan each, sorted by scan id)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(path, "input does not exist")
    # hidden entries (macOS `._x.nii.gz` AppleDouble metadata) are skipped, as the training reader skips them
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    # a broken link is listed: it fails as one bad scan (naming the link), never skipped without a word
    files = sorted(p for p in entries if (p.is_file() or is_broken_link(p)) and is_nifti_name(p))
    if not files and is_dicom_folder(path):  # the series itself
        return [path]
    ours = [p for p in files if p.name.endswith(OUTPUT_SUFFIXES)]
    if ours:  # an output folder inside the input folder: never read our own maps back as scans
        log.warning("%s: skipping %d file(s) that cmb wrote itself (e.g. %s)", path, len(ours), ours[0].name)
        files = [p for p in files if p not in ours]
    series = [p for p in entries if p.is_dir() and is_dicom_folder(p)]
    inputs = sorted(files + series, key=lambda p: (input_id(p), p.name))
    ids = [input_id(p) for p in inputs]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:  # both would write <id>_detections.csv
        raise DataError(path, f"scan id {twice[0]!r} appears twice ({', '.join(p.name for p in inputs if input_id(p) == twice[0])}); "
                              "rename one")
    if not inputs:
        raise DataError(path, "no .nii or .nii.gz files and no DICOM series in the input folder")
    return inputs
