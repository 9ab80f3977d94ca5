"""MATLAB `.mat` ground truth (the Dou et al. CMB dataset): v5/v7 and v7.3 (HDF5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmb.errors import DataError


def load_mat_arrays(path: str | Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read the named variables from a `.mat` file of any MATLAB format.

    v7.3 files are HDF5 (read with h5py; MATLAB stores them column-major, so arrays are
    transposed back to MATLAB's row/column order). Older formats go through scipy.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "ground-truth .mat file does not exist")
    if path.suffix.lower() != ".mat":
        raise DataError(path, "ground truth is not a .mat file")
    if _is_hdf5(path):
        import h5py

        try:
            with h5py.File(path, "r") as handle:
                out = {n: np.array(handle[n]).T for n in names if n in handle}
        except OSError as err:
            raise DataError(path, f"cannot read MATLAB v7.3 (HDF5) file: {err}") from None
    else:
        from scipy.io import loadmat

        try:
            raw = loadmat(str(path))
        except Exception as err:  # scipy raises ValueError/TypeError/... on corrupt files
            raise DataError(path, f"cannot read as a MATLAB .mat file ({type(err).__name__}: {err})") from None
        out = {n: np.asarray(raw[n]) for n in names if n in raw}
    missing = [n for n in names if n not in out]
    if missing:
        raise DataError(path, f"missing variable(s) {missing} in .mat file")
    return out


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(1024)
    return b"\x89HDF\r\n\x1a\n" in head[:8] or head[512:520] == b"\x89HDF\r\n\x1a\n"


def dou_centroids(path: str | Path) -> np.ndarray:
    """(N, 3) 0-based voxel centroids from a Dou ground-truth file (`cen` is 1-based)."""
    arrays = load_mat_arrays(path, ("cen",))
    cen = np.asarray(arrays["cen"], dtype=float)
    if cen.size == 0:
        return np.zeros((0, 3))
    if cen.ndim != 2 or 3 not in cen.shape:
        raise DataError(path, f"`cen` must be an N x 3 array, got shape {cen.shape}")
    if cen.shape[1] != 3:
        cen = cen.T
    return cen - 1.0
