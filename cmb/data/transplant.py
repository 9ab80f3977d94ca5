"""CMB transplants: a training CMB cut out as a multiplicative darkening and laid onto
another place of a training scan (an iron-dark nucleus, a vein, a stage-1 false positive).

Why: with 15-50 scans, few training CMBs sit inside or against dark structures, while the
hard-negative round and mined mimics teach the detector that such places are background;
a CMB in or against a deep nucleus can then go unseen. A transplant shows the same site with a
CMB on it, labelled as one. Written here because MONAI has no copy-paste transform (asked
for in Project-MONAI/MONAI#4201), and plain copy-paste copies intensities, so a CMB from
white matter would land in an iron-dark nucleus no darker than the nucleus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cmb.data.augment import crop_centred


@dataclass(frozen=True)
class CMBStamp:
    """One training CMB, centred on its centre voxel (odd side lengths, voxels).

    ratio: float32 (a, b, c) image over the local background, in (0, 1] on the CMB and a rim
    of `rim` voxels around it, 1 elsewhere; label: uint8 (a, b, c) the CMB's own voxels.
    """

    ratio: np.ndarray
    label: np.ndarray


def cut_stamp(image: np.ndarray, target: np.ndarray, centre: np.ndarray, max_size: tuple[int, int, int], rim: int = 2,
              min_background: float = 0.05) -> CMBStamp | None:
    """The stamp of the CMB whose label component holds `centre`, or None when it cannot be cut
    cleanly: centre off the label, CMB (with rim and background ring) wider than `max_size`,
    or a background (median of a ring 2-3 voxels beyond the rim) below `min_background`.

    image: normalized float32 (I, J, K); target: (I, J, K) CMB voxels (non-zero); centre: int voxel.
    """
    size = np.asarray(max_size)
    mid = tuple(size // 2)
    img = crop_centred(image, centre, tuple(size)).astype(np.float32)
    components, _ = ndimage.label(crop_centred(target, centre, tuple(size)) > 0)
    if components[mid] == 0:
        return None
    cmb = components == components[mid]
    paste = ndimage.binary_dilation(cmb, iterations=rim)
    outer = ndimage.binary_dilation(cmb, iterations=rim + 3)
    if any(outer.take([0, -1], axis=axis).any() for axis in range(3)):  # CMB, rim and ring must fit inside
        return None
    ring = outer & ~ndimage.binary_dilation(cmb, iterations=rim + 1) & (img > 0)
    if ring.sum() < 8:
        return None
    background = float(np.median(img[ring]))
    if background < min_background:
        return None
    ratio = np.ones(img.shape, dtype=np.float32)
    ratio[paste] = np.clip(img[paste] / background, 1e-3, 1.0)
    reach = np.max(np.abs(np.argwhere(paste) - np.asarray(mid)), axis=0)  # half-extent around the centre per axis
    box = tuple(slice(m - r, m + r + 1) for m, r in zip(mid, reach))
    return CMBStamp(np.ascontiguousarray(ratio[box]), cmb[box].astype(np.uint8))


def cut_stamps(image: np.ndarray, target: np.ndarray, centres: np.ndarray, max_size: tuple[int, int, int], rim: int = 2) -> list[CMBStamp]:
    """Stamps of all CMBs at `centres` ((N, 3) int voxels) that can be cut cleanly (see cut_stamp)."""
    stamps = (cut_stamp(image, target, c, max_size, rim) for c in np.asarray(centres, dtype=int).reshape(-1, 3))
    return [s for s in stamps if s is not None]


def paste_stamp(image: np.ndarray, target: np.ndarray, stamp: CMBStamp, gamma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Lay `stamp` onto the centre of a region, in place: image (odd-sized, float32) is multiplied by
    ratio**gamma (gamma > 1: a darker CMB), target (same shape) gains the CMB's voxels. Returns both."""
    offset = (np.asarray(image.shape) - np.asarray(stamp.ratio.shape)) // 2
    if np.any(offset < 0):
        raise ValueError(f"stamp {stamp.ratio.shape} larger than region {image.shape}")
    box = tuple(slice(o, o + s) for o, s in zip(offset, stamp.ratio.shape))
    image[box] *= stamp.ratio ** np.float32(gamma)
    np.maximum(target[box], stamp.label.astype(target.dtype), out=target[box])
    return image, target
