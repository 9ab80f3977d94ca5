"""Preprocessing as MONAI dictionary transforms: brain mask, N4 bias correction,
histogram-peak normalization; results cached on disk so N4 never runs twice.

Data dictionaries carry `image` (float32 (I, J, K), canonical orientation),
`spacing` (mm along i, j, k) and optionally `mask` (a user-supplied brain mask).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.transforms import Compose, MapTransform
from scipy import ndimage

from cmb.conf_utils import refuse_code
from cmb.data.io import load_volume, same_grid, temp_folder, to_canonical
from cmb.data.resample import resample_to_grid, working_scan
from cmb.data.scan import CMBInstance, Scan
from cmb.errors import ConfigError, DataError
from cmb.validate import MASK_METHODS, spacing_mm

log = logging.getLogger(__name__)
CACHE_VERSION = 1
LEGACY_NAMES = {"mask_method": "mask", "hdbet_params_dir": "hdbet_weights"}  # run folders written before the rename
NO_CHECKSUMS = "meta.json records no checksums"  # entries from before checksums: recomputed once


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of the preprocessing chain (all part of the cache key)."""

    mask: str = "auto"  # auto | user | deepbet | hdbet | threshold (brain_mask_method)
    hdbet_weights: str | None = None  # HD-BET weights folder; default ~/hd-bet_params
    n4: bool = True
    n4_shrink: int = 4
    n4_iterations: tuple[int, ...] = (50, 50, 30)
    histogram_bins: int = 256
    target_peak: float = 0.5
    spacing: tuple[float, float, float] | None = None  # working voxel size in mm (cmb.data.resample); None: each scan's own
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mask not in MASK_METHODS:
            raise ConfigError(f"preprocess.mask={self.mask!r} is not allowed: one of {', '.join(MASK_METHODS)}")
        if self.spacing is not None:
            object.__setattr__(self, "spacing", spacing_mm(self.spacing, "or null"))

    @classmethod
    def from_settings(cls, settings: Any, source: str | Path) -> "PreprocessConfig":
        """Rebuild from the plain values of a saved config (a run folder's `preprocess` node).

        A run folder is data, never code: only this class's own `_target_` is accepted and
        nothing named in the file is imported or called. `source` names the file in errors.
        """
        from omegaconf import DictConfig, OmegaConf

        if not isinstance(settings, (dict, DictConfig)):
            raise DataError(source, "preprocess settings are not a mapping")
        node = OmegaConf.create(settings) if isinstance(settings, dict) else settings
        refuse_code(node, "preprocess", (None, f"{cls.__module__}.{cls.__qualname__}"), "cmb's preprocessing settings", source)
        # values taken from the node as they are, so the preprocessing cache key matches a config built by Hydra
        values = {LEGACY_NAMES.get(k, k): node[k] for k in node if k != "_target_"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(source, f"unknown preprocess setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def _sitk_image(array: np.ndarray, spacing: tuple[float, ...]) -> sitk.Image:
    """(I, J, K) numpy -> SimpleITK image (SimpleITK arrays are (K, J, I))."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    img.SetSpacing(tuple(float(s) for s in spacing))
    return img


def _numpy(img: sitk.Image) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)))


def threshold_brain_mask(image: np.ndarray, spacing: tuple[float, float, float], closing_mm: float = 3.0) -> np.ndarray:
    """Offline SWI brain mask: Otsu -> erosion (cuts scalp bridges) -> largest component
    -> geodesic dilation inside the foreground (never across the dark skull) -> closing
    -> hole filling (3D and per slice). Bool (I, J, K).

    Runs on an image shrunk to ~0.9 mm in-plane for speed; the mask is upsampled with
    nearest-neighbour interpolation.
    """
    factors = [max(1, int(round(0.9 / s))) for s in spacing]
    full = _sitk_image(image.astype(np.float32), spacing)
    small = sitk.BinShrink(full, factors) if max(factors) > 1 else full
    smooth = sitk.Median(small, [1, 1, 1])  # denoise without blurring the dark skull into the tissue
    fg = sitk.OtsuThreshold(smooth, 0, 1)
    small_spacing = np.asarray(small.GetSpacing())
    radius = [max(1, int(round(2.5 / s))) for s in small_spacing]
    eroded = sitk.BinaryErode(fg, radius)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(eroded), sortByObjectSize=True)
    largest = components == 1
    brain = largest
    for _ in range(max(radius)):  # geodesic dilation: grows back inside fg only, never across the skull
        brain = sitk.BinaryDilate(brain, [1, 1, 1]) & fg
    brain = sitk.BinaryMorphologicalClosing(brain, [max(1, int(round(closing_mm / s))) for s in small_spacing])
    brain = sitk.BinaryFillhole(brain)
    mask = _numpy(brain).astype(bool)
    mask = np.stack([ndimage.binary_fill_holes(mask[:, :, k]) for k in range(mask.shape[2])], axis=2)
    if max(factors) > 1:
        idx = [np.minimum(np.arange(n) // f, m - 1) for n, f, m in zip(image.shape, factors, mask.shape)]
        mask = mask[np.ix_(*idx)]
    return mask


def hdbet_available(weights: str | None) -> tuple[bool, str]:
    """HD-BET is usable only when installed and its weights already exist locally (`weights`, default
    ~/hd-bet_params). Returns (usable, the weights folder or why not)."""
    exe = shutil.which("hd-bet")
    if exe is None:
        return False, "HD-BET is not installed; pip install -e '.[hdbet]'"
    folder = Path(weights).expanduser() if weights else Path.home() / "hd-bet_params"
    if not folder.is_dir() or not any(folder.iterdir()):
        return False, (f"HD-BET is installed but its weights are not in {folder}: it would download them and we never do. "
                       "Copy the weights folder from a machine with a network and pass preprocess.hdbet_weights=PATH")
    return True, str(folder)


def hdbet_mask(image: np.ndarray, affine: np.ndarray, weights: str, source: Path | str | None = None) -> np.ndarray:
    """Run the installed `hd-bet` command on CPU with the weights in `weights`; returns a bool mask (I, J, K)."""
    import nibabel as nib

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.nii.gz", Path(tmp) / "out.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), src)
        cmd = ["hd-bet", "-i", str(src), "-o", str(dst), "-device", "cpu", "--save_bet_mask"]
        # HD-BET reads its weights from ~/hd-bet_params only (and downloads them when missing): point a private
        # home's hd-bet_params at the weights folder, which hdbet_available checked is there
        (Path(tmp) / "home").mkdir()
        (Path(tmp) / "home" / "hd-bet_params").symlink_to(Path(weights).resolve(), target_is_directory=True)
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HOME": str(Path(tmp) / "home")})
        masks = sorted(Path(tmp).glob("out*mask*.nii.gz"))
        if result.returncode != 0 or not masks:
            raise DataError(source, f"HD-BET failed: {result.stderr.strip()[-500:]}")
        return np.asanyarray(nib.load(str(masks[0])).dataobj) > 0


def deepbet_available() -> tuple[bool, str]:
    """deepbet (a learned brain extraction whose wheel ships its weights) is usable when installed with them.
    Returns (usable, the weights file or why not)."""
    import importlib.util

    if importlib.util.find_spec("deepbet") is None:
        return False, "deepbet is not installed; pip install -e '.[deepbet]'"
    from deepbet.utils import DATA_PATH

    weights = Path(DATA_PATH) / "models" / "model.pt"
    if not weights.is_file() or not (weights.parent / "bbox_model.pt").is_file():
        return False, f"deepbet is installed but its weights are not in {weights.parent} (reinstall it; we never download)"
    return True, str(weights)


@functools.lru_cache(maxsize=1)
def _deepbet_extractor() -> Any:
    """deepbet's two TorchScript networks (its own files, loaded once per process), on a GPU when there is one."""
    import torch
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=not torch.cuda.is_available())


def deepbet_mask(image: np.ndarray, affine: np.ndarray, source: Path | str | None = None) -> np.ndarray:
    """deepbet's brain mask of `image` (float (I, J, K), canonical orientation, `affine` voxel -> RAS mm);
    bool (I, J, K). Threshold 0.5, no dilation (deepbet's defaults)."""
    import nibabel as nib

    try:
        _, mask, _ = _deepbet_extractor().run(nib.Nifti1Image(np.asarray(image, dtype=np.float32), affine))
    except (AssertionError, RuntimeError, ValueError) as err:  # deepbet asserts on an image without enough foreground
        raise DataError(source, f"deepbet brain extraction failed: {err}") from None
    return np.asanyarray(mask.dataobj) > 0


def brain_mask_method(requested: str, has_user_mask: bool, hdbet_weights: str | None = None) -> tuple[str, str]:
    """The method that makes a scan's brain mask, and why (for the log and the cache key).

    `auto`: a user mask (masks/<id>) > HD-BET (installed with local weights) > the threshold
    fallback. deepbet is used when asked for (`deepbet`): on our phantoms it leaves 1.6-2.7% of
    the brain out (the surface, where lobar CMBs lie) and more skull and scalp in on the paper
    preset (benchmarks/brain_mask.py, docs/experiments.md), so `auto` does not pick it. An
    explicitly requested method that cannot run is a `ConfigError` saying how to get it.
    """
    if requested == "user" or (requested == "auto" and has_user_mask):
        if not has_user_mask:
            raise ConfigError("preprocess.mask=user needs a masks/<id> file for every scan; none was found")
        return "user", "the scan's masks/<id> file"
    if requested == "deepbet":
        usable, why = deepbet_available()
        if not usable:
            raise ConfigError(f"preprocess.mask=deepbet: {why}")
        return "deepbet", f"deepbet ({why})"
    if requested in ("auto", "hdbet"):
        usable, why = hdbet_available(hdbet_weights)
        if usable:
            return "hdbet", f"HD-BET (weights {why})"
        if requested == "hdbet":
            raise ConfigError(f"preprocess.mask=hdbet: {why}")
        return "threshold", f"the SimpleITK threshold fallback ({why})"
    return "threshold", "the SimpleITK threshold mask (preprocess.mask=threshold)"


class BrainMaskd(MapTransform):
    """Add `mask` (bool (I, J, K)) made by `method` (a resolved `brain_mask_method`: user, deepbet,
    hdbet or threshold) and record it in `mask_method`."""

    def __init__(self, keys: str = "image", method: str = "threshold", hdbet_weights: str | None = None) -> None:
        super().__init__(keys)
        if method not in ("user", "deepbet", "hdbet", "threshold"):
            raise ValueError(f"brain mask method must be user|deepbet|hdbet|threshold (resolved), got {method!r}")
        self.method = method
        self.hdbet_weights = hdbet_weights

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        key = self.keys[0]
        if self.method == "user":
            if d.get("mask") is None:
                raise DataError(d.get("path"), "brain mask method 'user' needs a masks/<id> file, none was found")
            d["mask"] = np.asarray(d["mask"]) > 0
        elif self.method == "deepbet":
            d["mask"] = deepbet_mask(d[key], d["affine"], d.get("path"))
        elif self.method == "hdbet":
            usable, weights = hdbet_available(self.hdbet_weights)
            if not usable:
                raise ConfigError(weights)
            d["mask"] = hdbet_mask(d[key], d["affine"], weights, d.get("path"))
        else:
            d["mask"] = threshold_brain_mask(d[key], d["spacing"])
        d["mask_method"] = self.method
        if d["mask"].sum() < 1000:
            raise DataError(d.get("path"), f"brain mask ({d['mask_method']}) is empty or tiny ({int(d['mask'].sum())} voxels)")
        return d


class N4BiasCorrectiond(MapTransform):
    """N4 bias-field correction inside `mask`: fitted on a shrunk image, applied at full resolution."""

    def __init__(self, keys: str = "image", shrink: int = 4, iterations: tuple[int, ...] = (50, 50, 30)) -> None:
        super().__init__(keys)
        self.shrink = shrink
        self.iterations = [int(i) for i in iterations]

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        key = self.keys[0]
        spacing = d["spacing"]
        image = np.clip(d[key], 0, None).astype(np.float32) + 1e-3  # N4 needs positive values
        full = _sitk_image(image, spacing)
        mask = _sitk_image(d["mask"].astype(np.uint8), spacing)
        factors = [max(1, int(round(self.shrink * min(spacing) / s))) for s in spacing]
        small, small_mask = sitk.Shrink(full, factors), sitk.Shrink(mask, factors)
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations(self.iterations)
        corrector.Execute(small, small_mask)
        log_field = _numpy(corrector.GetLogBiasFieldAsImage(full))
        d[key] = (image / np.exp(log_field)).astype(np.float32)
        return d


def histogram_peak(values: np.ndarray, bins: int = 256) -> float:
    """Intensity at the peak of the (lightly smoothed) histogram of non-zero `values`."""
    values = values[values > 0]
    if values.size == 0:
        raise ValueError("no non-zero voxels to build a histogram from")
    lo, hi = np.percentile(values, [0.5, 99.5])
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    counts = ndimage.gaussian_filter1d(counts.astype(float), 1.5)
    peak = int(np.argmax(counts))
    return float((edges[peak] + edges[peak + 1]) / 2)


class HistogramPeakNormalized(MapTransform):
    """Map linearly so the histogram peak of the in-mask (non-zero) voxels becomes `target`; 0 outside the mask."""

    def __init__(self, keys: str = "image", bins: int = 256, target: float = 0.5) -> None:
        super().__init__(keys)
        self.bins, self.target = bins, target

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        key = self.keys[0]
        mask = d["mask"]
        image = np.where(mask, d[key], 0).astype(np.float32)
        peak = histogram_peak(image[mask], self.bins)
        if peak <= 0:
            raise DataError(d.get("path"), "histogram peak inside the brain is not positive; cannot normalize")
        d[key] = image * np.float32(self.target / peak)
        d["histogram_peak"] = peak
        return d


def preprocessing_chain(cfg: PreprocessConfig, mask_method: str) -> Compose:
    """Brain mask by `mask_method` (resolved: `brain_mask_method`), N4, histogram-peak normalization."""
    steps: list = [BrainMaskd("image", method=mask_method, hdbet_weights=cfg.hdbet_weights)]
    if cfg.n4:
        steps.append(N4BiasCorrectiond("image", shrink=cfg.n4_shrink, iterations=cfg.n4_iterations))
    steps.append(HistogramPeakNormalized("image", bins=cfg.histogram_bins, target=cfg.target_peak))
    return Compose(steps)


@dataclass
class Preprocessed:
    """A normalized scan: `image` float32 (I, J, K) (0 outside the brain), `mask` bool (I, J, K)."""

    scan_id: str
    image: np.ndarray
    mask: np.ndarray
    meta: dict


def _cache_key(scan: Scan, cfg: PreprocessConfig, mask_method: str) -> str:
    def stat(path: Path | None) -> list | None:
        if path is None:
            return None
        if Path(path).is_dir():  # a DICOM series folder: every file in it
            return [str(Path(path).resolve())] + [stat(p) for p in sorted(Path(path).iterdir()) if p.is_file()]
        st = Path(path).stat()
        return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]

    # the method actually used, not `auto`: installing HD-BET must not serve the threshold masks cached before
    settings = {k: v for k, v in asdict(cfg).items() if not (k == "spacing" and v is None)}  # keys of entries from before the option
    payload = {"v": CACHE_VERSION, "image": stat(scan.path), "mask": stat(scan.mask_path), "cfg": settings, "mask_method": mask_method}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _checksum(array: np.ndarray) -> str:
    """CRC-32 of an array's bytes (fast enough to check every cache read; it guards against damage, not attacks)."""
    data = np.ascontiguousarray(array)
    return f"{zlib.crc32(memoryview(data).cast('B')) & 0xFFFFFFFF:08x}"


def _read_entry(entry: Path, scan_id: str) -> Preprocessed:
    """A cache entry, checked: readable meta.json, both arrays present and whole, shapes and checksums as
    recorded. Raises `ValueError` (with the reason) for anything else."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        image = np.load(entry / "image.npy", mmap_mode="r")
        mask = np.load(entry / "mask.npy", mmap_mode="r")
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as err:  # missing, truncated or garbled files
        raise ValueError(f"{type(err).__name__}: {err}") from None
    if not isinstance(meta, dict) or "checksums" not in meta:
        raise ValueError(NO_CHECKSUMS)
    if list(image.shape) != meta.get("shape") or mask.shape != image.shape:
        raise ValueError(f"array shapes {image.shape}/{mask.shape} differ from the recorded {meta.get('shape')}")
    if {"image": _checksum(image), "mask": _checksum(mask)} != meta["checksums"]:
        raise ValueError("checksum mismatch (an array was changed after it was written)")
    return Preprocessed(scan_id, image, mask, meta)


def preprocess_on_working_grid(scan: Scan, cfg: PreprocessConfig, cache_dir: str | Path | None = None) -> tuple[Scan, Preprocessed]:
    """`scan` on the working grid of `cfg.spacing` (cmb.data.resample.working_scan) and its preprocessing: the one path
    of training, out-of-fold detection, stage=score and infer.py."""
    scan = working_scan(scan, cfg.spacing)
    pre = preprocess_scan(scan, cfg, cache_dir)
    warn_cmbs_outside_mask(scan, pre)
    return scan, pre


_warned_outside: set[tuple[str, str]] = set()  # (scan source, mask method): each scan is warned about once per process


def cmbs_outside_mask(scan: Scan, mask: np.ndarray) -> list[CMBInstance]:
    """The scan's labelled CMBs whose centre voxel lies outside `mask` (bool (I, J, K) on the scan's grid)."""
    outside = []
    for cmb in scan.cmbs:
        voxel = tuple(np.clip(np.rint(cmb.centroid_vox).astype(int), 0, np.array(mask.shape) - 1))
        if not mask[voxel]:
            outside.append(cmb)
    return outside


def warn_cmbs_outside_mask(scan: Scan, pre: Preprocessed) -> None:
    """A warning naming the labelled CMBs the brain mask leaves out: the image is 0 there, so they cannot be found and
    count as missed (a mask cut at a dark lesion on the brain's edge, or a mask of another scan)."""
    outside = cmbs_outside_mask(scan, pre.mask)
    key = (str(scan.path), str(pre.meta.get("mask_method")))
    if not outside or key in _warned_outside:
        return
    _warned_outside.add(key)
    where = "; ".join("(" + ", ".join(f"{v:.0f}" for v in c.centroid_mm) + ")" for c in outside[:5])
    log.warning("%s: %d of %d labelled CMBs lie outside the brain mask (%s), at %s mm RAS: the image is 0 there, so they cannot "
                "be found and count as missed; check the mask (masks/<id>.nii.gz or preprocess.mask)", scan.scan_id, len(outside),
                len(scan.cmbs), pre.meta.get("mask_method"), where)


def preprocess_scan(scan: Scan, cfg: PreprocessConfig, cache_dir: str | Path | None = None) -> Preprocessed:
    """Run (or fetch from the cache) the preprocessing chain for one scan.

    Cache entries live in `cache_dir/preprocess/<key>/` keyed by the input files (path,
    size, mtime) and every setting. Each entry records its arrays' shapes and checksums and is
    checked on every read; a damaged entry (changed, truncated or missing array, garbled
    meta.json) is set aside with a warning and recomputed. Entries are written to a temporary
    folder and renamed, so an interrupted run leaves no partial entry, and processes filling
    the same entry at once all end with the first one's (the others' copies are dropped).
    """
    mask_method, why = brain_mask_method(cfg.mask, scan.mask_path is not None, cfg.hdbet_weights)
    entry = Path(cache_dir) / "preprocess" / _cache_key(scan, cfg, mask_method) if cache_dir is not None else None
    if entry is not None and entry.is_dir():
        try:
            return _read_entry(entry, scan.scan_id)
        except ValueError as err:
            damaged = entry.with_name(f".{entry.name}.damaged-{os.getpid()}-{time.time_ns()}")
            if str(err) == NO_CHECKSUMS:
                log.info("%s: cache entry of %s was written before checksums were recorded; recomputing it once", entry, scan.scan_id)
            else:
                log.warning("%s: preprocessing cache entry of %s is damaged (%s); recomputing it", entry, scan.scan_id, err)
            try:
                os.rename(entry, damaged)  # out of the way first, so no other process reads it while it is removed
                shutil.rmtree(damaged, ignore_errors=True)
            except OSError:  # another process moved or replaced it first
                pass
    log.info("%s: brain mask by %s", scan.scan_id, why)
    user_mask = None
    if scan.mask_path is not None:
        raw, affine = load_volume(scan.mask_path, what="brain mask")
        canonical, mask_affine, _ = to_canonical(raw, affine)
        user_mask = canonical > 0
        if user_mask.shape != scan.shape or not same_grid(mask_affine, scan.affine):  # a scan resampled to the working voxel size
            user_mask = resample_to_grid(user_mask.astype(np.uint8), mask_affine, scan.affine, scan.shape, order=0) > 0
    data = {"image": scan.image, "mask": user_mask, "spacing": scan.spacing_mm, "affine": scan.affine, "scan_id": scan.scan_id, "path": scan.path}
    out = preprocessing_chain(cfg, mask_method)(data)
    image, mask = out["image"].astype(np.float32), out["mask"].astype(bool)
    meta = {"scan_id": scan.scan_id, "source": str(scan.path), "mask_method": out["mask_method"], "histogram_peak": out["histogram_peak"],
            "shape": list(scan.shape), "spacing_mm": list(scan.spacing_mm), "checksums": {"image": _checksum(image), "mask": _checksum(mask)}}
    if entry is not None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_folder(entry.parent, f".{entry.name}-")
        np.save(tmp / "image.npy", image)
        np.save(tmp / "mask.npy", mask)
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished the same entry first: keep its entry, drop ours
            shutil.rmtree(tmp, ignore_errors=True)
    return Preprocessed(scan.scan_id, image, mask, meta)
