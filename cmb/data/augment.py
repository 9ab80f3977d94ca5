"""Window augmentation that keeps the CMB at the window centre (+-`max_shift` voxels), as a `Compose`
of MONAI dictionary transforms over {"image", "target"} (both get the same random parameters).

A region of odd side lengths (`region_size`) is cut around the centre voxel; random flips along
i, j, k and 90-degree turns in the 20x20 (i, j) plane never move its centre voxel; dropping the
region's last voxel per axis and a random crop of the window size then places the centre at
window//2 + shift, shift uniform in [-max_shift, max_shift] per axis.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose, RandFlipd, RandRotate90d, RandSpatialCropd, Randomizable, SpatialCropd
from scipy import ndimage

from cmb import WINDOW

KEYS = ("image", "target")


def region_size(max_shift: int, window: tuple[int, int, int] = WINDOW) -> tuple[int, int, int]:
    """Odd side lengths of the region cut around a centre voxel before augmentation."""
    return tuple(2 * (w // 2 + max_shift) + 1 for w in window)  # type: ignore[return-value]


def window_augmentation(max_shift: int, window: tuple[int, int, int] = WINDOW, flip: bool = True, rotate: bool = True) -> Compose:
    """{"image", "target"}: (C, *region_size(max_shift)) -> (C, *window), the region's centre voxel at
    window//2 + shift. Flips along each axis with p 0.5; quarter turns k in {0, 1, 2, 3} with p 1/4 each
    (k = 1 and 3: both directions); seeded per window by `augment_window`."""
    transforms: list = [RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)] if flip else []
    if rotate:
        transforms.append(RandRotate90d(KEYS, prob=0.75, max_k=3, spatial_axes=(0, 1)))
    even = tuple(s - 1 for s in region_size(max_shift, window))  # the centre voxel stays at index w//2 + max_shift
    transforms += [SpatialCropd(KEYS, roi_start=(0, 0, 0), roi_end=even), RandSpatialCropd(KEYS, roi_size=window, random_size=False)]
    return Compose(transforms)


def augment_window(augmentation: Compose, regions: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """`augmentation` applied to `regions`, its random transforms drawing in order from one random state seeded
    by `seed` (so a window is a function of its seed alone, whatever was drawn before).

    One shared state, not `Compose.set_random_state(seed)`, which seeds a new state per transform: 0.09 against
    0.68 ms per window. MONAI's metadata tracking is off while it runs: windows carry no metadata, and tracking
    made each window ~3x slower.
    """
    state = np.random.RandomState(seed)
    for transform in augmentation.transforms:
        if isinstance(transform, Randomizable):
            transform.set_random_state(state=state)
    tracking = get_track_meta()
    set_track_meta(False)
    try:
        out = augmentation({k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in regions.items()})
    finally:
        set_track_meta(tracking)
    return {k: np.ascontiguousarray(np.asarray(v)) for k, v in out.items()}


def crop_centred(volume: np.ndarray, centre: tuple[int, int, int] | np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Cut `size` around integer `centre` (centre at index size//2), zero-padded past the volume's edge."""
    centre = np.asarray(centre, dtype=int)
    lo = centre - np.asarray(size) // 2
    hi = lo + np.asarray(size)
    out = np.zeros(size, dtype=volume.dtype)
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, volume.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    out[dst_lo[0] : dst_hi[0], dst_lo[1] : dst_hi[1], dst_lo[2] : dst_hi[2]] = volume[src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]]
    return out


def centred_window(volume: np.ndarray, centre: np.ndarray, window: tuple[int, int, int] = WINDOW) -> np.ndarray:
    """The un-augmented window around `centre` (centre at window//2)."""
    return crop_centred(volume, centre, window)


def zoomed_region(volume: np.ndarray, centre: tuple[int, int, int] | np.ndarray, size: tuple[int, int, int], factor: float,
                  order: int = 1) -> np.ndarray:
    """`size` (odd side lengths) around integer `centre`, enlarged `factor` times about it: output voxel x samples the
    volume at centre + (x - size//2) / factor (spline `order`: 1 for images, 0 for label maps), 0 past the volume's
    edge. `factor` 1 is `crop_centred`. scipy's map_coordinates, not MONAI's RandZoom: it reads the volume itself, so
    a window shrunk below 1 or near the edge needs no padding of a pre-cut region."""
    centre = np.asarray(centre, dtype=float)
    axes = [centre[a] + (np.arange(n) - n // 2) / float(factor) for a, n in enumerate(size)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    return ndimage.map_coordinates(volume, grid, order=order, mode="constant", cval=0.0).astype(volume.dtype, copy=False)


def scale_log_contrast(image: np.ndarray, gamma: float, anchor: float) -> np.ndarray:
    """`image` (any shape, normalized intensities >= 0) with its log-contrast about `anchor` scaled by `gamma`:
    anchor * (image / anchor) ** gamma, so the normalized histogram peak (`anchor`) stays where preprocessing put
    it, a voxel half as bright as the peak becomes 0.5**gamma as bright, and 0 (outside the brain) stays 0.
    Why its own: SWI's dark contrast is multiplicative (magnitude times phase mask**n, dephasing growing with
    TE), so scanners differ by a power of the ratio to the background; MONAI's RandAdjustContrast raises the
    window's min-max-scaled values instead, which moves the peak away from `anchor`."""
    ratio = np.clip(image, 0.0, None) / float(anchor)
    return (float(anchor) * np.power(ratio, float(gamma))).astype(image.dtype, copy=False)
