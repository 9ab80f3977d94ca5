"""Reading and checking NIfTI volumes; canonical orientation and its inverse."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from cmb import WINDOW
from cmb.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CONNECTIVITY_26 = ndimage.generate_binary_structure(3, 3)  # CMB label components and stage-1 candidates are 26-connected
log = logging.getLogger(__name__)
# Refused before any voxel is read: a volume this large needs far more memory than a head scan (~60 bytes per voxel
# in infer.py), and a small .nii.gz of zeros can declare one (2**28: e.g. 1024x1024x256).
MAX_VOXELS = 2**28
MIN_DISTINCT_VALUES = 16  # an image with fewer distinct non-zero values is refused: a label map or mask, not an SWI
MAX_NEGATIVE_SHARE = 0.05  # of an image's non-zero voxels; more is refused (interpolation leaves a few slightly negative)
VOXEL_MM_RANGE = (0.05, 10.0)  # a voxel edge outside this (mm) is refused: no MRI resolves 50 um, and a CMB (2-10 mm) is lost in a voxel over 10 mm
UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}  # NIfTI spatial units (xyzt_units); unknown: mm, as NIfTI readers assume
SPACE_UNIT_CODES = {0: "unknown", 1: "meter", 2: "mm", 3: "micron"}  # the NIfTI-1 codes of xyzt_units' space bits


def is_nifti_name(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def input_id(path: str | Path) -> str:
    """A scan's id from its input: a DICOM series folder's name, or a NIfTI file's name without its suffix."""
    return Path(path).name if Path(path).is_dir() else nifti_stem(path)


def nifti_stem(path: str | Path) -> str:
    """File name without `.nii` / `.nii.gz`."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def load_volume(path: str | Path, *, what: str = "image", check_window: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D NIfTI as (float32 array (I, J, K), 4x4 affine) in the file's own grid.

    Raises `DataError` naming the file for: a missing file, a file that is not NIfTI,
    a 2D or 4D volume (a trailing singleton 4th axis is dropped), NaN/Inf voxels, an
    all-zero image, and an image smaller than one 20x20x16 window.
    """
    path = Path(path)
    if is_broken_link(path):
        raise DataError(path, f"{what} is a broken link (to {os.readlink(path)})")
    if not path.is_file():
        raise DataError(path, f"{what} file does not exist")
    if not is_nifti_name(path):
        raise DataError(path, f"{what} is not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for corrupt files
        raise DataError(path, f"cannot read {what} as NIfTI ({type(err).__name__}: {err})") from None
    check_voxel_count(path, tuple(img.shape), what)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise DataError(path, f"cannot read {what} as NIfTI ({type(err).__name__}: {err})") from None
    affine = _affine_in_mm(path, img, what)
    _check_geometry(path, img, affine, what)
    check_voxel_sizes(path, affine, what)
    while data.ndim > 3 and data.shape[-1] == 1:  # (I, J, K, 1) or (I, J, K, 1, 1): one volume
        data = data[..., 0]
    if data.ndim > 3:
        raise DataError(path, f"{what} must be a 3D volume, got {data.ndim}D with shape {tuple(data.shape)}: "
                              f"{data.shape[3]} volumes (several echoes or time points?); save the one to use as a 3D file")
    if data.ndim != 3:
        raise DataError(path, f"{what} must be a 3D volume, got {data.ndim}D with shape {tuple(data.shape)}")
    check_value_type(path, data.dtype, what)
    data = np.asarray(data, dtype=np.float32)
    if what == "image":
        check_image_values(path, data, check_window)
    return data, affine


def check_voxel_count(path: Path, shape: tuple[int, ...], what: str = "image") -> None:
    """Refuse a volume of more than `MAX_VOXELS` voxels (`DataError` naming `path`), from its header's shape alone."""
    voxels = int(np.prod([int(n) for n in shape], dtype=object))
    if voxels > MAX_VOXELS:
        raise DataError(path, f"{what} has {voxels:,} voxels (shape {tuple(int(n) for n in shape)}), more than cmb reads "
                              f"({MAX_VOXELS:,}, e.g. 1024x1024x256): crop it to the head or resample it to a coarser voxel size first")


def check_value_type(path: Path, dtype: np.dtype, what: str = "image") -> None:
    """Refuse voxel values that are not real numbers (`DataError` naming `path`): a complex image (real and imaginary
    parts of a gradient echo; the cast to float would keep the real part alone, without a word) or an RGB one."""
    if dtype.kind == "c":
        raise DataError(path, f"{what} has complex voxel values ({dtype}): save the SWI or magnitude image (np.abs of the "
                              "complex data) as a real-valued NIfTI")
    if dtype.kind not in "biuf":  # structured (RGB, RGBA) or object data
        raise DataError(path, f"{what} has voxel values of type {dtype} (an RGB or other multi-part value): save it as one "
                              "grey value per voxel")


def check_image_values(path: Path, data: np.ndarray, check_window: bool = True) -> None:
    """Refuse NaN/Inf voxels, an all-zero image, one mostly negative (a phase image), one smaller than a 20x20x16
    window and one with fewer than `MIN_DISTINCT_VALUES` distinct non-zero values (a label map or mask given as the
    image) (`DataError` naming `path`)."""
    if not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise DataError(path, f"image has {n_bad} NaN/Inf voxels; replace them (e.g. with 0) before use")
    if not np.any(data):
        raise DataError(path, "image is all zeros")
    negative = float(np.count_nonzero(data < 0)) / max(1, np.count_nonzero(data))
    if negative > MAX_NEGATIVE_SHARE:  # SWI and magnitude images are >= 0; a phase image is about half negative
        raise DataError(path, f"{100 * negative:.0f}% of the image's non-zero voxels are negative (down to {float(data.min()):.3g}): "
                              "a phase image? cmb reads SWI or magnitude images")
    if check_window and any(s < w for s, w in zip(data.shape, WINDOW)):
        raise DataError(path, f"image shape {data.shape} is smaller than one {WINDOW} window")
    values = _distinct_values(data)
    if len(values) < MIN_DISTINCT_VALUES:  # an SWI has thousands of grey values; a label map or mask a handful
        shown = ", ".join(f"{v:g}" for v in values[:4])
        raise DataError(path, f"image has only {len(values)} distinct non-zero value(s) ({shown}): a label map or brain mask, "
                              "not an SWI or magnitude image")


def _distinct_values(data: np.ndarray, sample: int = 200_000) -> np.ndarray:
    """The distinct non-zero values of `data`: those of an evenly strided sample of its voxels when that already
    finds `MIN_DISTINCT_VALUES` (every real image: ~0.01 s, where all voxels of a 512x512x150 scan take ~1 s), else
    those of all its voxels."""
    strided = data.ravel(order="K")[:: max(1, data.size // sample)]  # no copy, whatever the memory order
    values = np.unique(strided[strided != 0])
    return values if len(values) >= MIN_DISTINCT_VALUES else np.unique(data[data != 0])


def voxel_sizes_mm(affine: np.ndarray) -> np.ndarray:
    """(3,) voxel edge lengths along i, j, k (mm): the lengths of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


def is_broken_link(path: Path) -> bool:
    """`path` is a symbolic link whose target does not exist (a scan moved or deleted since the link was made)."""
    return path.is_symlink() and not path.exists()


def _affine_in_mm(path: Path, img: object, what: str) -> np.ndarray:
    """The image's voxel -> RAS affine in mm: nibabel gives it in the header's spatial units (`xyzt_units`),
    which may be meters or microns; those are converted (as ITK's NIfTI reader does), with a warning."""
    affine = np.asarray(img.affine, dtype=float)  # type: ignore[attr-defined]
    header = getattr(img, "header", None)
    code = int(header["xyzt_units"]) & 0x07 if isinstance(header, nib.Nifti1Header) else 0  # the space bits (time has its own)
    if code not in SPACE_UNIT_CODES:
        raise DataError(path, f"{what} header gives a spatial unit NIfTI does not define (code {code} in xyzt_units); set it to mm")
    unit = SPACE_UNIT_CODES[code]
    scale = UNIT_TO_MM[unit]
    if scale != 1.0:
        log.warning("%s: the header gives positions in %ss; converted to mm", path, unit)
        affine = affine.copy()
        affine[:3] *= scale
    return affine


def check_voxel_sizes(path: Path | str, affine: np.ndarray, what: str = "image") -> None:
    """Refuse voxel edges outside `VOXEL_MM_RANGE` (mm; `DataError` naming `path`): a header whose units or pixdim
    are wrong (a scan in cm read as mm, 50 mm voxels) would otherwise be read, resampled and scored on a nonsense scale."""
    sizes = voxel_sizes_mm(affine)
    low, high = VOXEL_MM_RANGE
    if np.all(np.isfinite(sizes)) and (sizes.min() < low or sizes.max() > high):
        raise DataError(path, f"{what} voxel size {np.round(sizes, 4).tolist()} mm is not that of an MRI head scan ({low:g} to "
                              f"{high:g} mm a side): check the header's pixdim and spatial units (xyzt_units)")


def _check_geometry(path: Path, img: object, affine: np.ndarray, what: str) -> None:
    """Refuse a singular or non-finite affine (a zero voxel size), and a file without sform/qform whose raw
    pixdim has a zero voxel size (nibabel would silently read it as 1 mm)."""
    linear = affine[:3, :3]
    if not np.isfinite(affine).all() or abs(float(np.linalg.det(linear))) < 1e-12:
        sizes = voxel_sizes_mm(affine) if np.isfinite(linear).all() else linear
        raise DataError(path, f"{what} affine is singular or not finite (voxel sizes {np.round(sizes, 4).tolist()} mm); fix the NIfTI header")
    header = getattr(img, "header", None)
    if not isinstance(header, nib.Nifti1Header) or header.get_sform(coded=True)[1] or header.get_qform(coded=True)[1]:
        return
    with nib.openers.ImageOpener(str(path)) as handle:  # the header as stored, before nibabel's fixes
        raw = type(header).from_fileobj(handle, check=False)
    pixdim = [float(v) for v in raw["pixdim"][1:4]]
    if any(not np.isfinite(v) or v <= 0 for v in pixdim):
        raise DataError(path, f"{what} has no sform/qform and voxel size pixdim {pixdim}: its size in mm is unknown; fix the NIfTI header")
    log.warning("%s: no sform/qform in the header; orientation taken from pixdim %s alone", path, pixdim)


def canonical_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform from the file's axes to RAS+ (closest canonical)."""
    return ornt_transform(io_orientation(affine), np.array([[0, 1], [1, 1], [2, 1]]))


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient (I, J, K) data to RAS+; returns (data, canonical affine, transform)."""
    transform = canonical_transform(affine)
    out = np.ascontiguousarray(apply_orientation(data, transform))
    new_affine = affine @ inv_ornt_aff(transform, data.shape)
    return out, new_affine, transform


def from_canonical(data: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Undo `to_canonical` on a canonical-grid array (back to the file's own grid)."""
    inverse = ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), _inverse_target(transform))
    return np.ascontiguousarray(apply_orientation(data, inverse))


def _inverse_target(transform: np.ndarray) -> np.ndarray:
    """The source orientation that `transform` maps onto RAS+."""
    source = np.zeros_like(transform)
    for axis, (target_axis, flip) in enumerate(transform):
        source[axis] = [target_axis, flip]
    return source


def vox_to_mm(points_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices -> (N, 3) world mm through a 4x4 affine."""
    pts = np.asarray(points_vox, dtype=float).reshape(-1, 3)
    return pts @ affine[:3, :3].T + affine[:3, 3]


def mm_to_vox(points_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) world mm -> (N, 3) fractional voxel indices."""
    pts = np.asarray(points_mm, dtype=float).reshape(-1, 3)
    return (pts - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def same_grid(affine_a: np.ndarray, affine_b: np.ndarray, tol: float = 1e-3) -> bool:
    return bool(np.allclose(affine_a, affine_b, atol=tol))


def require_writable(folder: str | Path, what: str) -> None:
    """Refuse up front (`DataError`) when `folder`, or the nearest part of it that exists, cannot be written."""
    folder = Path(folder).resolve()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise DataError(existing, f"is a file, not a folder: the {what} ({folder}) must be a folder, new or existing")
    if not os.access(existing, os.W_OK):
        raise DataError(existing, f"{what} is not writable")


def _mode_under_umask(folder: bool) -> int:
    """The permissions open() or mkdir() would give under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def temp_file(folder: str | Path, prefix: str, suffix: str = "") -> tuple[int, str]:
    """`tempfile.mkstemp` in `folder`, with a plain file's permissions: mkstemp's 0600 would follow the file when it is
    renamed into place, leaving a shared run's report readable by its owner alone."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.chmod(tmp, _mode_under_umask(folder=False))
    return fd, tmp


def temp_folder(folder: str | Path, prefix: str) -> Path:
    """`tempfile.mkdtemp` in `folder`, with a plain folder's permissions (not 0700), for a folder renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    os.chmod(tmp, _mode_under_umask(folder=True))
    return tmp


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write text through a temporary file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, ".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return path

