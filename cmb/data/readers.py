"""Dataset layouts (see the README and docs/design.md): each yields `Scan` records with CMB instances.

Every reader lists scan ids cheaply, checks the layout up front and loads scans lazily;
problems raise `DataError` naming the file.
"""

from __future__ import annotations

import csv
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from cmb.data.dicom import is_dicom_folder, read_dicom_series
from cmb.data.io import (CONNECTIVITY_26, check_image_values, input_id, is_broken_link, is_nifti_name, load_volume, mm_to_vox, nifti_stem,
                        same_grid, to_canonical, vox_to_mm)
from cmb.data.mat import dou_centroids
from cmb.data.scan import CMBInstance, Scan
from cmb.errors import ConfigError, DataError

log = logging.getLogger(__name__)
MAX_CMB_DIAMETER_MM = 20.0  # a labelled CMB larger than a ball this wide is refused (microbleeds are 2-10 mm)
MIN_CMB_DISTANCE_MM = 1.0  # two annotated centres closer than this are refused: one CMB marked twice



class ScanDataset(ABC):
    """A collection of scans on disk."""

    name: str = "dataset"

    @abstractmethod
    def scan_ids(self) -> list[str]:
        """Sorted ids of all scans."""

    @abstractmethod
    def load(self, scan_id: str) -> Scan:
        """Read one scan (image reoriented to RAS+, truth attached)."""

    def __iter__(self) -> Iterator[Scan]:
        for scan_id in self.scan_ids():
            yield self.load(scan_id)

    def __len__(self) -> int:
        return len(self.scan_ids())


def _check_root(root: str | Path | None) -> Path:
    if root is None or str(root) in ("", "???"):
        raise ConfigError("data.root is not set: pass data.root=PATH")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(path, "data root does not exist or is not a folder")
    return path


def instances_from_label_map(labels: np.ndarray) -> np.ndarray:
    """Instance map (int32, 1..N) from a CMB label map.

    A binary map is split into 26-connected components; a map with several integer
    values keeps each value as its own CMB (even if it is not connected).
    """
    positive = labels > 0.5  # the voxels whose rounded value is > 0; rounding only those (a label map is mostly 0)
    ids = np.rint(labels[positive]).astype(np.int64)
    values = np.unique(ids)
    if len(values) <= 1:
        out, _ = ndimage.label(positive, structure=CONNECTIVITY_26)
        return out.astype(np.int32)
    out = np.zeros(labels.shape, dtype=np.int32)
    out[positive] = np.searchsorted(values, ids) + 1  # value -> its rank, in one pass over the volume
    return out


def cmbs_from_instances(instances: np.ndarray, affine: np.ndarray) -> list[CMBInstance]:
    """The CMBs of an instance map (int (I, J, K), 1..N): centroid in voxels and mm, size in voxels.

    Each statistic is computed inside the CMB's bounding box (ndimage.find_objects, one pass over the volume):
    ndimage.center_of_mass and sum_labels each pass over the whole volume, ~2 s per load of a 512x512x150 scan.
    """
    labels, centroids, sizes = [], [], []
    for label, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:  # a label number with no voxel
            continue
        voxels = np.argwhere(instances[box] == label)
        labels.append(label)
        centroids.append(voxels.mean(axis=0) + [s.start for s in box])
        sizes.append(len(voxels))
    if not labels:
        return []
    mm = vox_to_mm(np.array(centroids), affine)
    return [
        CMBInstance(tuple(map(float, c)), tuple(map(float, m)), label=i, n_voxels=n)
        for i, c, m, n in zip(labels, centroids, mm, sizes)
    ]


def cmbs_from_points(points_src_vox: np.ndarray, src_affine: np.ndarray, canon_affine: np.ndarray, shape: tuple[int, ...], path: Path) -> list[CMBInstance]:
    """Centroid-only truth given in the file's own voxel grid -> canonical instances."""
    pts = np.asarray(points_src_vox, dtype=float).reshape(-1, 3)
    src_shape = np.asarray(shape)
    bad = np.any((pts < -0.5) | (pts > src_shape - 0.5), axis=1)
    if bad.any():
        raise DataError(path, f"centroid {pts[bad][0].tolist()} lies outside the image of shape {tuple(shape)}")
    mm = vox_to_mm(pts, src_affine)
    if len(mm) > 1:
        nearest, which = cKDTree(mm).query(mm, k=2)  # each centre's nearest other one; O(N log N), not an N x N matrix
        a = int(np.argmin(nearest[:, 1]))
        b, gap = int(which[a, 1] if which[a, 1] != a else which[a, 0]), float(nearest[a, 1])  # two equal centres: either order
        if gap < MIN_CMB_DISTANCE_MM:
            raise DataError(path, f"centroids {pts[min(a, b)].tolist()} and {pts[max(a, b)].tolist()} (voxels) are {gap:.2f} mm "
                                  f"apart: one CMB marked twice? Microbleeds are 2-10 mm across, so two centres closer than "
                                  f"{MIN_CMB_DISTANCE_MM:g} mm are one CMB; keep one row")
    canon = mm_to_vox(mm, canon_affine)
    return [CMBInstance(tuple(map(float, c)), tuple(map(float, m))) for c, m in zip(canon, mm)]


def _integer_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """A label map with integer values as it is. A binary-like one with fractions in (0, 1] (e.g. a resampled binary
    mask): each 26-connected component of its voxels > 0 that reaches 0.5 somewhere, as 1 (with a warning); components
    that never reach 0.5 (interpolation or float noise, e.g. 1e-6 scattered over the scan) are dropped and counted.
    Fractional values in a map with ids above 1 are refused, never rounded away."""
    positive = labels[labels > 0]
    if np.all(positive == np.round(positive)):
        return labels
    if positive.max() <= 1.0:
        components, n = ndimage.label(labels > 0, structure=CONNECTIVITY_26)
        peaks = np.asarray(ndimage.maximum(labels, components, np.arange(1, n + 1)), dtype=float).reshape(-1)
        keep = np.concatenate([[False], peaks >= 0.5])
        dropped = int(n - keep.sum())
        log.warning("%s: label map has fractional values in (0, 1] (a resampled binary mask?); every voxel > 0 of a component "
                    "that reaches 0.5 counts as CMB%s", path,
                    f"; {dropped} component(s) that never reach 0.5 (interpolation noise) are not CMBs" if dropped else "")
        return keep[components].astype(np.float32)
    example = float(positive[positive != np.round(positive)][0])
    raise DataError(path, f"label map has non-integer values (e.g. {example:g}) among ids up to {float(positive.max()):g}; give integer "
                          "CMB ids or a binary map (rounding would silently drop or merge CMBs)")


def build_scan(scan_id: str, image_path: Path, *, label_path: Path | None = None, points: np.ndarray | None = None,
               points_path: Path | None = None, mask_path: Path | None = None, has_truth: bool = True) -> Scan:
    """Load an image (a NIfTI file or a DICOM series folder) and its truth, and reorient everything to RAS+."""
    slice_uids = None
    if Path(image_path).is_dir():
        volume = read_dicom_series(image_path)
        data, affine, slice_uids = volume.data, volume.affine, volume.slice_uids
        check_image_values(Path(image_path), data)
    else:
        data, affine = load_volume(image_path)
    image, canon_affine, transform = to_canonical(data, affine)
    scan = Scan(scan_id=scan_id, image=image, affine=canon_affine, path=image_path, mask_path=mask_path,
                has_truth=has_truth, source_affine=affine, source_shape=data.shape, to_canonical=transform, slice_uids=slice_uids)
    if label_path is not None:
        labels, label_affine = load_volume(label_path, what="label map")
        if np.any(labels < 0) or not np.isfinite(labels).all():
            raise DataError(label_path, "label map has negative or non-finite values")
        canon_labels = _on_image_grid(labels, label_affine, image.shape, canon_affine, label_path, "label map", image_path)
        scan.instances = instances_from_label_map(_integer_labels(canon_labels, label_path))
        scan.cmbs = cmbs_from_instances(scan.instances, canon_affine)
        _refuse_lesions_too_large(scan.cmbs, canon_affine, label_path)
    elif points is not None:
        scan.cmbs = cmbs_from_points(points, affine, canon_affine, data.shape, points_path or image_path)
    if mask_path is not None:
        mask, mask_affine = load_volume(mask_path, what="brain mask")
        _on_image_grid(mask, mask_affine, image.shape, canon_affine, mask_path, "brain mask", image_path)
    return scan


def _refuse_lesions_too_large(cmbs: list[CMBInstance], affine: np.ndarray, path: Path) -> None:
    """A labelled "CMB" larger than a ball of `MAX_CMB_DIAMETER_MM` is no microbleed (2-10 mm): most likely a brain mask
    or a tissue map given as the label map. A DataError naming the label and its size."""
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    limit_mm3 = np.pi / 6 * MAX_CMB_DIAMETER_MM**3
    for cmb in cmbs:
        volume = cmb.n_voxels * voxel_mm3
        if volume > limit_mm3:
            diameter = (6 * volume / np.pi) ** (1 / 3)
            where = ", ".join(f"{v:.0f}" for v in cmb.centroid_mm)
            raise DataError(path, f"the labelled CMB centred at ({where}) mm RAS covers {volume:.0f} mm^3 (a ball {diameter:.0f} mm "
                                  f"across); microbleeds are 2-10 mm (above {MAX_CMB_DIAMETER_MM:.0f} mm is refused): is this a brain "
                                  "mask or tissue map instead of the CMB labels?")


def _on_image_grid(volume: np.ndarray, affine: np.ndarray, image_shape: tuple[int, ...], image_canon_affine: np.ndarray,
                   path: Path, what: str, image_path: Path) -> np.ndarray:
    """`volume` (a label map or mask with its own `affine`) reoriented to RAS+, when it lies on the same voxels as the image
    (compared in RAS+: a file written in another axis order, e.g. a label map made on a dcm2niix conversion of a DICOM
    series, is the same grid); otherwise a DataError naming `path`."""
    canon, canon_affine, _ = to_canonical(volume, affine)
    if canon.shape != tuple(image_shape):
        raise DataError(path, f"{what} shape {canon.shape} differs from its image's {tuple(image_shape)} "
                              f"(both in RAS orientation; {Path(image_path).name})")
    if not same_grid(canon_affine, image_canon_affine):
        raise DataError(path, f"{what} affine differs from its image's ({Path(image_path).name}): not the same voxels")
    return canon


class NiftiDataset(ScanDataset):
    """`ROOT/images/<id>.nii[.gz]` with `ROOT/labels/<id>...` label maps or `ROOT/annotations.csv` points.

    Optional `ROOT/masks/<id>...` brain masks are used instead of computing one.
    With `require_truth=False` a folder of images alone is accepted (inference).
    """

    name = "nifti"

    def __init__(self, root: str | Path, require_truth: bool = True, images_dir: str = "images", labels_dir: str = "labels",
                 masks_dir: str = "masks", annotations: str = "annotations.csv") -> None:
        self.root = _check_root(root)
        self.images_dir = self.root / images_dir
        if not self.images_dir.is_dir():
            scans_here = any(is_nifti_name(p) for p in self.root.iterdir() if p.is_file())
            hint = (f"; {self.root} itself holds NIfTI files: give the folder that holds images/ and labels/ (or "
                    "annotations.csv) as data.root") if scans_here else ""
            raise DataError(self.images_dir, f"missing the images/ folder of the nifti layout{hint}")
        self._images = _nifti_files(self.images_dir, series_folders=True)
        if not self._images:
            raise DataError(self.images_dir, "empty dataset: no .nii or .nii.gz images and no DICOM series folders found")
        self.labels_dir = self.root / labels_dir
        self.masks_dir = self.root / masks_dir
        self.annotations_path = self.root / annotations
        self._points: dict[str, np.ndarray] | None = None
        self.truth = "labels" if self.labels_dir.is_dir() else "points" if self.annotations_path.is_file() else "none"
        if self.truth == "none" and require_truth:
            raise DataError(self.root, "no truth found: expected a labels/ folder or an annotations.csv file")
        if self.truth == "labels" and self.annotations_path.is_file():
            log.warning("%s: both labels/ and annotations.csv exist; using labels/", self.root)
        if self.truth == "labels":
            missing = [i for i in self._images if _find_nifti(self.labels_dir, i) is None]
            if missing:
                raise DataError(self.labels_dir, f"no label map for scan(s) {missing[:5]}")
        for folder, what in ((self.labels_dir, "label map"), (self.masks_dir, "brain mask")):
            if folder.is_dir():
                _refuse_orphans(folder, set(self._images), what)
        if self.truth == "points":
            self._points = read_annotations(self.annotations_path, set(self._images))
            series = sorted(i for i in self._points if self._images[i].is_dir() and len(self._points[i]))
            if series:  # i, j, k of a NIfTI file are what a viewer shows; a series' voxel order is the reader's own choice
                raise DataError(self.annotations_path, f"scan {series[0]!r} is a DICOM series: give its CMBs as a label map "
                                                       f"{labels_dir}/{series[0]}.nii.gz on the series' grid, not as voxel indices")

    def scan_ids(self) -> list[str]:
        return sorted(self._images)

    def load(self, scan_id: str) -> Scan:
        image_path = self._images[scan_id]
        mask_path = _find_nifti(self.masks_dir, scan_id) if self.masks_dir.is_dir() else None
        if self.truth == "labels":
            return build_scan(scan_id, image_path, label_path=_find_nifti(self.labels_dir, scan_id), mask_path=mask_path)
        if self.truth == "points":
            assert self._points is not None
            return build_scan(scan_id, image_path, points=self._points.get(scan_id, np.zeros((0, 3))),
                              points_path=self.annotations_path, mask_path=mask_path)
        return build_scan(scan_id, image_path, mask_path=mask_path, has_truth=False)


def _nifti_files(folder: Path, series_folders: bool = False) -> dict[str, Path]:
    """Scan id -> image: each .nii/.nii.gz file in `folder` (id: the name without its suffix) and, with
    `series_folders`, each sub-folder holding a DICOM series (id: the folder's name; any other sub-folder is
    refused). Without it, sub-folders are not looked at."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or (path.is_dir() and not series_folders):
            continue
        if is_broken_link(path):
            raise DataError(path, f"a broken link (to {os.readlink(path)}) in the images folder")
        if path.is_dir() and not is_dicom_folder(path):
            raise DataError(path, "a folder in the images folder without a DICOM series: give one .nii/.nii.gz file "
                                  "or one DICOM series folder per scan")
        if path.is_file() and not is_nifti_name(path):
            raise DataError(path, "not a NIfTI file (expected .nii or .nii.gz) in the images folder")
        stem = input_id(path)
        if stem in files:
            raise DataError(path, f"scan id {stem!r} appears twice ({files[stem].name})")
        files[stem] = path
    return files


def _refuse_orphans(folder: Path, scan_ids: set[str], what: str) -> None:
    """A DataError naming `folder` when it holds a NIfTI file whose scan id has no image (a scan left out by mistake
    would silently train on fewer scans), or two files for one scan (`x.nii` and `x.nii.gz`: which is meant?).
    Files that are not NIfTI (notes, sidecars) are not looked at."""
    stems: dict[str, list[str]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and is_nifti_name(path):
            stems.setdefault(nifti_stem(path), []).append(path.name)
    twice = sorted(names for names in stems.values() if len(names) > 1)
    if twice:
        raise DataError(folder, f"two {what} files for one scan: {' and '.join(twice[0])}; keep one")
    orphans = sorted(set(stems) - scan_ids)
    if orphans:
        raise DataError(folder, f"{len(orphans)} {what} file(s) without an image in images/: {', '.join(stems[o][0] for o in orphans[:5])}"
                                f"; add their images, or move them out of {folder.name}/")


def _find_nifti(folder: Path, scan_id: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        candidate = folder / f"{scan_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_annotations(path: Path, known_ids: set[str]) -> dict[str, np.ndarray]:
    """`scan_id,i,j,k` rows (0-based voxels) -> {scan_id: (N, 3)}. A spreadsheet's byte-order mark and spaces around
    the column names are accepted; a scan id without an image, a value that is not a finite number and the same
    row twice are refused naming the line."""
    points: dict[str, list[list[float]]] = {}
    first_line: dict[tuple, int] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is not None:
                reader.fieldnames = [name.strip() for name in reader.fieldnames]
            if reader.fieldnames is None or not {"scan_id", "i", "j", "k"} <= set(reader.fieldnames):
                raise DataError(path, f"annotations must have columns scan_id,i,j,k; found {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                scan_id = (row["scan_id"] or "").strip()
                if scan_id not in known_ids:
                    hint = f" (give the scan id {nifti_stem(scan_id)!r}, the file name without its suffix)" if nifti_stem(scan_id) in known_ids else ""
                    raise DataError(path, f"line {line}: scan_id {scan_id!r} has no image in images/{hint}")
                try:
                    point = [float(row[c]) for c in ("i", "j", "k")]
                except (TypeError, ValueError):
                    raise DataError(path, f"line {line}: i,j,k must be numbers, got {row}") from None
                if not np.isfinite(point).all():
                    raise DataError(path, f"line {line}: i,j,k must be finite numbers, got {point}")
                key = (scan_id, *point)
                if key in first_line:
                    raise DataError(path, f"line {line} repeats line {first_line[key]} ({scan_id} at voxel {point}): one row per CMB")
                first_line[key] = line
                points.setdefault(scan_id, []).append(point)
    except UnicodeDecodeError as err:  # Latin-1 from a spreadsheet, or a binary file given as annotations
        raise DataError(path, f"annotations are not UTF-8 text ({err.reason} at byte {err.start}): save them as CSV (UTF-8)") from None
    except csv.Error as err:  # e.g. a field over the csv module's limit (131072 characters): not a table of centres
        raise DataError(path, f"annotations are not a readable CSV file ({err})") from None
    return {k: np.array(v, dtype=float) for k, v in points.items()}


class ValdoDataset(ScanDataset):
    """VALDO 2021 Task 2: `sub-XXX/sub-XXX_space-T2S_desc-masked_T2S.nii.gz` + `..._CMB.nii.gz`."""

    name = "valdo"

    def __init__(self, root: str | Path, require_truth: bool = True) -> None:
        self.root = _check_root(root)
        self.require_truth = require_truth
        self._subjects = {p.name: p for p in sorted(self.root.glob("sub-*")) if p.is_dir()}
        if not self._subjects:
            raise DataError(self.root, "empty dataset: no sub-* folders (VALDO layout)")
        for sub, folder in self._subjects.items():
            if _find_nifti(folder, f"{sub}_space-T2S_desc-masked_T2S") is None:
                raise DataError(folder, f"missing {sub}_space-T2S_desc-masked_T2S.nii.gz")
            if require_truth and _find_nifti(folder, f"{sub}_space-T2S_CMB") is None:
                raise DataError(folder, f"missing {sub}_space-T2S_CMB.nii.gz")

    def scan_ids(self) -> list[str]:
        return sorted(self._subjects)

    def load(self, scan_id: str) -> Scan:
        folder = self._subjects[scan_id]
        image = _find_nifti(folder, f"{scan_id}_space-T2S_desc-masked_T2S")
        label = _find_nifti(folder, f"{scan_id}_space-T2S_CMB")
        assert image is not None
        return build_scan(scan_id, image, label_path=label, has_truth=label is not None)


class DouDataset(ScanDataset):
    """CUHK CMB dataset (Dou et al. 2016): `nii/<ID>.nii` + `ground_truth/<ID>.mat` (`cen`, 1-based)."""

    name = "dou"
    PAPER_SUBSET = tuple(f"{i:02d}" for i in (*range(1, 15), 18))

    def __init__(self, root: str | Path, subset: str = "all", require_truth: bool = True) -> None:
        self.root = _check_root(root)
        images_dir = self.root / "nii"
        if not images_dir.is_dir():
            raise DataError(images_dir, "missing the nii/ folder of the Dou layout")
        self._images = _nifti_files(images_dir)
        if subset == "paper":
            absent = [i for i in self.PAPER_SUBSET if i not in self._images]
            if absent:
                raise DataError(images_dir, f"data.subset=paper needs scans {absent}, which are missing")
            self._images = {i: self._images[i] for i in self.PAPER_SUBSET}
        elif subset != "all":
            raise ConfigError(f"data.subset must be 'all' or 'paper', got {subset!r}")
        if not self._images:
            raise DataError(images_dir, "empty dataset: no .nii images")
        self.truth_dir = self.root / "ground_truth"
        self.require_truth = require_truth
        if require_truth:
            missing = [i for i in self._images if not (self.truth_dir / f"{i}.mat").is_file()]
            if missing:
                raise DataError(self.truth_dir, f"no ground-truth .mat for scan(s) {missing[:5]}")

    def scan_ids(self) -> list[str]:
        return sorted(self._images)

    def load(self, scan_id: str) -> Scan:
        mat = self.truth_dir / f"{scan_id}.mat"
        if not mat.is_file():
            return build_scan(scan_id, self._images[scan_id], has_truth=False)
        return build_scan(scan_id, self._images[scan_id], points=dou_centroids(mat), points_path=mat)


class SyntheticDataset(ScanDataset):
    """The embedded phantom, written once into the cache in the `nifti` layout and read from there."""

    name = "synthetic"

    def __init__(self, preset: str = "demo", seed: int = 0, cache_dir: str | Path | None = None, n_scans: int | None = None) -> None:
        from cmb import user_cache_dir
        from cmb.data.synthetic import ensure_synthetic_dataset

        self.root = ensure_synthetic_dataset(preset, seed, Path(cache_dir or user_cache_dir()), n_scans=n_scans)
        self._nifti = NiftiDataset(self.root)

    def scan_ids(self) -> list[str]:
        return self._nifti.scan_ids()

    def load(self, scan_id: str) -> Scan:
        return self._nifti.load(scan_id)
