"""A DICOM series folder as a volume: SimpleITK's (GDCM) series reader, checked geometry, slice UIDs.

One series per folder: when a folder holds several, the one with the most slices is read and
the others are named in the log. The volume comes back like a NIfTI file's: float32 (I, J, K)
on the series' own grid (i along a row, j along a column, k along the slices in the order of
their position) with a voxel -> RAS mm affine built from the series' patient coordinates
(DICOM's LPS with x and y negated), and the SOP Instance UID of every slice k.
"""

from __future__ import annotations

import contextlib
import functools
import locale
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk

from cmb.data.io import check_voxel_count, check_voxel_sizes
from cmb.errors import DataError

log = logging.getLogger(__name__)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
TAG_POSITION, TAG_ORIENTATION, TAG_SOP_UID = "0020|0032", "0020|0037", "0008|0018"
TAG_FRAMES = "0028|0008"  # Number of Frames: > 1 in a multi-frame (e.g. enhanced MR) file
SPACING_TOLERANCE = 0.01  # slice gaps may differ from their median by 1% (rounding in the positions' decimal strings)
F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def keep_locale() -> Iterator[None]:
    """Put the process's locale back after SimpleITK's DICOM (GDCM) calls: GDCM sets the C locale, whose
    ASCII codeset Python's text files then use, so a report with a non-ASCII character failed to write."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _keeping_locale(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with keep_locale():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class DicomVolume:
    """One series read from `folder`: `data` float32 (I, J, K), `affine` voxel -> RAS mm,
    `slice_uids[k]` the SOP Instance UID of slice k."""

    folder: Path
    series_uid: str
    data: np.ndarray
    affine: np.ndarray
    slice_uids: list[str]


@_keeping_locale
def series_in(folder: Path) -> dict[str, list[str]]:
    """Series instance UID -> its files (GDCM's order) for every DICOM series directly in `folder`."""
    reader = sitk.ImageSeriesReader()
    return {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in reader.GetGDCMSeriesIDs(str(folder))}


@_keeping_locale
def is_dicom_folder(folder: Path) -> bool:
    """Whether `folder` holds at least one DICOM series (files directly in it)."""
    return folder.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _numbers(value: str, n: int, tag: str, file: str, folder: Path) -> np.ndarray:
    try:
        numbers = np.array([float(v) for v in value.split("\\")], dtype=float)
    except ValueError:
        numbers = np.array([])
    if numbers.shape != (n,) or not np.isfinite(numbers).all():
        raise DataError(folder, f"DICOM tag {tag} of {Path(file).name} is not {n} numbers: {value!r}")
    return numbers


def _frame_count(reader: sitk.ImageFileReader, keys: set[str]) -> int:
    """Frames in one DICOM file: its Number of Frames tag (0028,0008), else its third image dimension."""
    if TAG_FRAMES in keys:
        try:
            return int(float(reader.GetMetaData(TAG_FRAMES).strip()))
        except ValueError:
            pass
    size = reader.GetSize()
    return int(size[2]) if len(size) > 2 else 1


def _slice_headers(files: list[str], folder: Path) -> list[dict]:
    """Position, orientation, size and SOP UID of every file (headers only, no pixel data)."""
    headers = []
    reader = sitk.ImageFileReader()
    for file in files:
        reader.SetFileName(file)
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise DataError(folder, f"cannot read the DICOM file {Path(file).name} ({str(err).strip().splitlines()[-1]})") from None
        keys = set(reader.GetMetaDataKeys())
        frames = _frame_count(reader, keys)
        if frames > 1:
            raise DataError(folder, f"{Path(file).name} is a multi-frame DICOM file ({frames} frames in one file, e.g. enhanced MR); "
                                    "cmb reads a series of single-slice files: convert it to NIfTI (e.g. dcm2niix) and give the .nii.gz")
        missing = [t for t in (TAG_POSITION, TAG_ORIENTATION) if t not in keys]
        if missing:
            raise DataError(folder, f"{Path(file).name} has no image position/orientation ({', '.join(missing)}): not a volume slice")
        headers.append({"file": file, "position": _numbers(reader.GetMetaData(TAG_POSITION), 3, TAG_POSITION, file, folder),
                        "orientation": _numbers(reader.GetMetaData(TAG_ORIENTATION), 6, TAG_ORIENTATION, file, folder),
                        "size": tuple(reader.GetSize()[:2]),
                        "uid": reader.GetMetaData(TAG_SOP_UID).strip() if TAG_SOP_UID in keys else ""})
    return headers


def _checked_order(headers: list[dict], folder: Path) -> list[dict]:
    """The slices sorted along the slice normal, refusing a series that is not one regular volume:
    mixed orientations or sizes (slices of several series under one UID), repeated positions,
    missing slices (a gap) and non-uniform spacing."""
    first = headers[0]
    for h in headers[1:]:
        if not np.allclose(h["orientation"], first["orientation"], atol=1e-4) or h["size"] != first["size"]:
            raise DataError(folder, f"mixed series: {Path(h['file']).name} has another orientation or size than "
                                    f"{Path(first['file']).name}; put each series in its own folder")
    row, col = first["orientation"][:3], first["orientation"][3:]
    normal = np.cross(row, col)
    along = np.array([float(h["position"] @ normal) for h in headers])
    order = np.argsort(along, kind="stable")
    headers, along = [headers[i] for i in order], along[order]
    if len(headers) < 2:
        raise DataError(folder, "the DICOM series has a single slice, not a volume")
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        n = int(np.argmin(gaps))
        raise DataError(folder, f"two slices at one position ({Path(headers[n]['file']).name}, {Path(headers[n + 1]['file']).name}): "
                                "mixed or duplicated series")
    step = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - step)))
    if abs(gaps[worst] - step) > SPACING_TOLERANCE * step:
        near_multiple = round(gaps[worst] / step) >= 2 and abs(gaps[worst] / step - round(gaps[worst] / step)) < 0.1
        what = (f"missing slices: a gap of {gaps[worst]:.3f} mm after {Path(headers[worst]['file']).name}, where slices are "
                f"{step:.3f} mm apart") if near_multiple else (
                f"non-uniform slice spacing: {gaps.min():.3f} to {gaps.max():.3f} mm between slices")
        raise DataError(folder, what)
    return headers


@_keeping_locale
def read_dicom_series(folder: str | Path) -> DicomVolume:
    """Read the (largest) DICOM series in `folder`; a `DataError` naming the folder for anything that
    is not one regular volume."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "DICOM input must be a folder holding one series")
    series = series_in(folder)
    if not series:
        raise DataError(folder, "no DICOM series in the folder")
    uid = max(series, key=lambda u: (len(series[u]), u))
    if len(series) > 1:
        others = ", ".join(f"{u} ({len(f)} files)" for u, f in sorted(series.items()) if u != uid)
        log.warning("%s: %d DICOM series; reading %s (%d files), the largest; ignoring %s", folder, len(series), uid, len(series[uid]),
                    others)
    else:
        log.info("%s: DICOM series %s (%d files)", folder, uid, len(series[uid]))
    headers = _checked_order(_slice_headers(series[uid], folder), folder)
    check_voxel_count(folder, (*headers[0]["size"], len(headers)), "DICOM series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([h["file"] for h in headers])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise DataError(folder, f"cannot read the DICOM series {uid} ({str(err).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(folder, f"DICOM series {uid} is not a 3D single-channel volume")
    data = np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))).astype(np.float32)
    # geometry from the checked headers: in-plane axes from the orientation, slice axis from the first and last positions
    row, col = headers[0]["orientation"][:3], headers[0]["orientation"][3:]
    spacing_i, spacing_j = image.GetSpacing()[:2]
    slice_axis = (headers[-1]["position"] - headers[0]["position"]) / (len(headers) - 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * spacing_i, col * spacing_j, slice_axis, headers[0]["position"]
    affine = np.eye(4)
    affine[:3] = LPS_TO_RAS @ lps[:3]
    check_voxel_sizes(folder, affine, f"DICOM series {uid}")
    return DicomVolume(folder, uid, data, affine, [h["uid"] for h in headers])
