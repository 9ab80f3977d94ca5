"""Synthetic SWI head phantom with microbleeds and their classic mimics.

Deterministic by seed. Anatomy is laid out in coordinates normalized to the head
size; lesion and vessel sizes are in millimetres, so the CMB's size in voxels matches
real 0.45x0.45x0.9 mm SWI whatever the preset's field of view.

What makes it hard (so that stage 2 has something to learn):
- thin medullary veins (radius 0.35-0.7 mm) in all orientations: through-plane ones
  look like dots in a single slice; thicker cortical veins along the brain surface;
- iron-dark deep grey nuclei; calcification-like dark lobulated blobs without halo;
- CMBs of 2-10 mm, ovoid, varying contrast, a blooming halo, some touching a vein;
- smooth multiplicative bias field, Rician noise, an arbitrary scanner gain.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

# Tissue intensities before bias, noise and gain (SWI magnitude-like, arbitrary units).
SCALP, SKULL, CSF, GREY, WHITE, DEEP_GREY = 0.95, 0.07, 1.0, 0.66, 0.8, 0.42

# P(n CMBs in a scan) for n = 0..13: median 2, long tail (cf. the paper's cohort).
CMB_COUNT_WEIGHTS = np.array([8, 20, 24, 14, 9, 7, 5, 3, 3, 2, 2, 1, 1, 1], dtype=float)


@dataclass(frozen=True)
class PhantomPreset:
    """Size and content of a synthetic dataset."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    n_scans: int
    n_thin_veins: int
    n_thick_veins: int
    total_cmbs: int | None = None  # force the dataset's CMB total (paper: 40)
    n_calcifications: tuple[int, int] = (0, 3)


PRESETS: dict[str, PhantomPreset] = {
    "demo": PhantomPreset((160, 160, 64), (0.45, 0.45, 0.9), n_scans=8, n_thin_veins=45, n_thick_veins=8),
    "paper": PhantomPreset((512, 512, 150), (0.45, 0.45, 0.9), n_scans=15, n_thin_veins=260, n_thick_veins=45, total_cmbs=40),
    "tiny": PhantomPreset((64, 64, 32), (0.45, 0.45, 0.9), n_scans=4, n_thin_veins=6, n_thick_veins=1, n_calcifications=(0, 1)),
}


@dataclass
class PhantomScan:
    """One generated scan: raw image (gain, bias, noise applied), truth and geometry."""

    image: np.ndarray  # float32 (I, J, K), raw scanner units
    instances: np.ndarray  # int16 (I, J, K), 0 background, 1..N CMBs
    tissue: np.ndarray  # uint8 (I, J, K): 0 air, 1 scalp, 2 skull, 3 CSF rim, 4 brain (mask tests)
    affine: np.ndarray  # 4x4 voxel -> RAS mm
    centroids_vox: np.ndarray  # (N, 3) float, 0-based
    info: dict


def cmb_counts(n_scans: int, rng: np.random.Generator, total: int | None = None) -> list[int]:
    """CMBs per scan from `CMB_COUNT_WEIGHTS`; with `total`, adjusted one by one to sum to it."""
    p = CMB_COUNT_WEIGHTS / CMB_COUNT_WEIGHTS.sum()
    counts = list(rng.choice(len(p), size=n_scans, p=p))
    if total is not None:
        while sum(counts) != total:
            idx = int(rng.integers(n_scans))
            if sum(counts) < total and counts[idx] < len(p) - 1:
                counts[idx] += 1
            elif sum(counts) > total and counts[idx] > 0:
                counts[idx] -= 1
    return [int(c) for c in counts]


def smooth_field(shape: tuple[int, int, int], rng: np.random.Generator, factor: int = 8, sigma: float = 1.5) -> np.ndarray:
    """Smooth zero-mean unit-std random field (float32, `shape`), made at low resolution."""
    low = tuple(max(3, s // factor) for s in shape)
    field = ndimage.gaussian_filter(rng.standard_normal(low), sigma, mode="wrap")
    field = (field - field.mean()) / (field.std() + 1e-8)
    zoom = [s / l for s, l in zip(shape, low)]
    return ndimage.zoom(field.astype(np.float32), zoom, order=1, mode="nearest")[: shape[0], : shape[1], : shape[2]]


class _Geometry:
    """Voxel <-> mm helpers for one phantom volume (origin at the volume centre)."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=float)
        self.affine = np.diag([*spacing, 1.0])
        self.affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * self.spacing
        self.extent_mm = np.asarray(shape) * self.spacing

    def to_vox(self, mm: np.ndarray) -> np.ndarray:
        return (np.asarray(mm) - self.affine[:3, 3]) / self.spacing

    def to_mm(self, vox: np.ndarray) -> np.ndarray:
        return np.asarray(vox) * self.spacing + self.affine[:3, 3]

    def box(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[slice, slice, slice] | None:
        lo = np.floor(self.to_vox(lo_mm)).astype(int).clip(0, np.asarray(self.shape))
        hi = np.ceil(self.to_vox(hi_mm)).astype(int).clip(0, np.asarray(self.shape))
        if np.any(hi - lo < 1):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]

    def grid_mm(self, box: tuple[slice, slice, slice]) -> list[np.ndarray]:
        """Open mesh of mm coordinates for a box (broadcastable arrays)."""
        axes = [self.to_mm_axis(a, s) for a, s in enumerate(box)]
        return list(np.ix_(*axes))

    def to_mm_axis(self, axis: int, sl: slice) -> np.ndarray:
        idx = np.arange(sl.start, sl.stop, dtype=float)
        return idx * self.spacing[axis] + self.affine[axis, 3]


def _tube_distance(geom: _Geometry, path_mm: np.ndarray, reach_mm: float):
    """Distance (mm) from each voxel of the path's bounding box to the polyline `path_mm`.

    The centreline is rasterized and a Euclidean distance transform gives distances;
    this is exact to within half a voxel, plenty for a vessel phantom.
    """
    box = geom.box(path_mm.min(0) - reach_mm, path_mm.max(0) + reach_mm)
    if box is None:
        return None, None
    size = tuple(s.stop - s.start for s in box)
    centre = np.zeros(size, dtype=bool)
    dense = _densify(path_mm, step=0.5 * geom.spacing.min())
    vox = np.round(geom.to_vox(dense)).astype(int) - np.array([s.start for s in box])
    ok = np.all((vox >= 0) & (vox < np.array(size)), axis=1)
    if not ok.any():
        return None, None
    centre[tuple(vox[ok].T)] = True
    dist = ndimage.distance_transform_edt(~centre, sampling=geom.spacing)
    return box, dist.astype(np.float32)


def _densify(path: np.ndarray, step: float) -> np.ndarray:
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
    t = np.concatenate([[0], np.cumsum(seg)])
    samples = np.arange(0, t[-1] + step, step)
    return np.stack([np.interp(samples, t, path[:, a]) for a in range(3)], axis=1)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-9)


def _curve(start: np.ndarray, direction: np.ndarray, length: float, bend: float, rng: np.random.Generator) -> np.ndarray:
    """A gently curving polyline of `length` mm starting at `start`."""
    n = max(4, int(length / 1.0))
    d = _unit(direction)
    pts = [start]
    for _ in range(n):
        d = _unit(d + bend * rng.standard_normal(3))
        pts.append(pts[-1] + d * (length / n))
    return np.array(pts)


class PhantomGenerator:
    """Builds phantom scans for one preset; scan `index` is deterministic given `seed`."""

    def __init__(self, preset: PhantomPreset, seed: int = 0) -> None:
        self.preset = preset
        self.seed = seed
        self.counts = cmb_counts(preset.n_scans, np.random.default_rng([seed, 10**6]), preset.total_cmbs)

    def generate(self, index: int) -> PhantomScan:
        p = self.preset
        rng = np.random.default_rng([self.seed, index])
        geom = _Geometry(p.shape, p.spacing_mm)
        half = geom.extent_mm / 2

        # Head ellipsoid semi-axes (mm): fills most of the in-plane FOV; the slab cuts it in k.
        head_axes = half * np.array([0.86, 0.9, 1.25]) * rng.uniform(0.94, 1.0, 3)
        centre_mm = rng.uniform(-0.02, 0.02, 3) * geom.extent_mm

        ii, jj, kk = [(g - c) / a for g, c, a in zip(geom.grid_mm(tuple(slice(0, s) for s in p.shape)), centre_mm, head_axes)]
        radius = np.sqrt(ii**2 + jj**2 + kk**2, dtype=np.float32)
        gyri = smooth_field(p.shape, rng, factor=16, sigma=1.0)

        # shell thicknesses as fractions of the head radius, so small demo heads keep a brain
        scalp_t, skull_t, csf_t, cortex_t = np.array([0.05, 0.08, 0.025, 0.05]) * rng.uniform(0.85, 1.15, 4)
        r_brain = 1.0 - scalp_t - skull_t - csf_t
        brain_r = radius + 0.012 * gyri  # folded brain surface
        image = np.zeros(p.shape, dtype=np.float32)
        tissue = np.zeros(p.shape, dtype=np.uint8)
        for value, level, shell in ((1, 1.0, SCALP), (2, 1.0 - scalp_t, SKULL), (3, 1.0 - scalp_t - skull_t, CSF)):
            inside = radius <= level
            tissue[inside], image[inside] = value, shell
        brain = brain_r <= r_brain
        tissue[brain] = 4
        image[brain] = GREY
        white = brain_r <= r_brain - cortex_t - 0.02 * np.abs(gyri)
        image[white] = WHITE

        # Ventricles and iron-dark deep grey nuclei, placed in normalized head coordinates.
        def blob(c: tuple[float, float, float], axes: tuple[float, float, float]) -> np.ndarray:
            return ((ii - c[0]) / axes[0]) ** 2 + ((jj - c[1]) / axes[1]) ** 2 + ((kk - c[2]) / axes[2]) ** 2 <= 1

        for side in (-1, 1):
            image[blob((0.1 * side, 0.05, 0.05), (0.07, 0.28, 0.16))] = CSF
            nucleus = blob((0.28 * side, 0.02, -0.02), (0.07, 0.14, 0.12))
            image[nucleus] = DEEP_GREY * rng.uniform(0.85, 1.1)
            image[blob((0.2 * side, -0.02, -0.02), (0.05, 0.09, 0.09))] = DEEP_GREY * rng.uniform(0.75, 0.95)
            image[blob((0.06 * side, -0.1, -0.22), (0.035, 0.04, 0.05))] = DEEP_GREY * 0.8
        texture = smooth_field(p.shape, rng, factor=4, sigma=1.0)
        image *= 1.0 + 0.035 * texture
        del texture, ii, jj, kk

        darkening = np.zeros(p.shape, dtype=np.float32)  # multiplicative: image *= (1 - darkening)
        brain_idx = np.argwhere(white)

        def random_brain_point() -> np.ndarray:
            return geom.to_mm(brain_idx[rng.integers(len(brain_idx))].astype(float))

        vein_points: list[tuple[np.ndarray, float]] = []

        def draw_vein(path: np.ndarray, r: float, contrast: float) -> None:
            box, dist = _tube_distance(geom, path, reach_mm=r + 1.5)
            if box is None:
                return
            profile = contrast / (1.0 + np.exp(np.clip((dist - r) / 0.12, -50, 50)))
            np.maximum(darkening[box], profile * brain[box], out=darkening[box])
            vein_points.append((path, r))

        for _ in range(p.n_thin_veins):  # medullary veins: radial, any orientation
            start = random_brain_point()
            direction = start - centre_mm + rng.normal(0, 8, 3)
            if rng.random() < 0.35:
                direction = np.array([rng.normal(0, 0.3), rng.normal(0, 0.3), 1.0])  # through-plane: dots
            draw_vein(_curve(start, direction, rng.uniform(6, 22), 0.15, rng), rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.7))
        for _ in range(p.n_thick_veins):  # cortical veins: along the surface, thicker
            u = _unit(rng.standard_normal(3))
            start = centre_mm + u * head_axes * (r_brain - cortex_t * 0.5)
            tangent = _unit(np.cross(u, rng.standard_normal(3)))
            path = _curve(start, tangent, rng.uniform(15, 45), 0.1, rng)
            # pull the path back onto the brain surface shell
            rel = (path - centre_mm) / head_axes
            path = centre_mm + rel / np.linalg.norm(rel, axis=1, keepdims=True) * (r_brain - cortex_t * 0.6) * head_axes
            draw_vein(path, rng.uniform(0.8, 1.5), rng.uniform(0.45, 0.75))

        # Calcification-like blobs: very dark, sharp, lobulated, no halo.
        n_calc = int(rng.integers(p.n_calcifications[0], p.n_calcifications[1] + 1))
        for _ in range(n_calc):
            c0 = random_brain_point()
            for _lobe in range(int(rng.integers(2, 5))):
                c = c0 + rng.normal(0, 1.2, 3)
                r = rng.uniform(1.0, 2.2)
                box = geom.box(c - r - 1, c + r + 1)
                if box is None:
                    continue
                gx, gy, gz = geom.grid_mm(box)
                d = np.sqrt((gx - c[0]) ** 2 + (gy - c[1]) ** 2 + (gz - c[2]) ** 2)
                np.maximum(darkening[box], 0.85 / (1 + np.exp((d - r) / 0.1)), out=darkening[box])

        # Microbleeds.
        instances = np.zeros(p.shape, dtype=np.int16)
        n_cmbs = self.counts[index]
        placed: list[tuple[np.ndarray, float]] = []
        cmb_info = []
        attempts = 0
        while len(placed) < n_cmbs and attempts < 2000:
            attempts += 1
            diameter = float(np.clip(rng.lognormal(np.log(3.6), 0.35), 2.0, 10.0))
            radius_mm = diameter / 2
            near_vein = vein_points and rng.random() < 0.3
            if near_vein:
                path, r_v = vein_points[int(rng.integers(len(vein_points)))]
                anchor = path[int(rng.integers(len(path)))]
                offset = _unit(np.cross(path[-1] - path[0], rng.standard_normal(3)))
                c = anchor + offset * (radius_mm + r_v + 0.3)
            else:
                c = random_brain_point()
            v = np.round(geom.to_vox(c)).astype(int)
            if np.any(v < 0) or np.any(v >= np.array(p.shape)) or not white[tuple(v)]:
                continue
            margin = np.array([10, 10, 8]) * geom.spacing  # keep a full window inside the volume
            if np.any(c - margin < geom.to_mm(np.zeros(3))) or np.any(c + margin > geom.to_mm(np.array(p.shape) - 1)):
                continue
            if any(np.linalg.norm(c - c2) < radius_mm + r2 + 3.0 for c2, r2 in placed):
                continue
            axes = radius_mm * rng.uniform(0.85, 1.15, 3)
            contrast = rng.uniform(0.45, 0.85)
            box = geom.box(c - axes.max() * 2.5, c + axes.max() * 2.5)
            gx, gy, gz = geom.grid_mm(box)
            rho = np.sqrt(((gx - c[0]) / axes[0]) ** 2 + ((gy - c[1]) / axes[1]) ** 2 + ((gz - c[2]) / axes[2]) ** 2)
            core = 1.0 / (1.0 + np.exp((rho - 1.0) / 0.08))
            halo = 0.3 * np.exp(-(np.clip(rho - 1.0, 0, None) / 0.45) ** 2) * (rho > 1.0)
            np.maximum(darkening[box], (contrast * (core + halo)).astype(np.float32), out=darkening[box])
            inside = rho <= 1.0
            if not inside.any():
                continue
            label = len(placed) + 1
            instances[box][inside] = label
            placed.append((c, radius_mm))
            cmb_info.append({"label": label, "diameter_mm": round(diameter, 2), "contrast": round(float(contrast), 3), "near_vein": bool(near_vein)})

        image *= 1.0 - np.clip(darkening, 0, 0.97)
        del darkening

        # Smooth multiplicative bias, Rician noise, scanner gain.
        bias = np.exp(0.18 * smooth_field(p.shape, rng, factor=32, sigma=1.0) + 0.1 * radius * rng.uniform(-1, 1))
        image *= bias
        sigma = rng.uniform(0.02, 0.035) * WHITE
        noisy = np.hypot(image + rng.normal(0, sigma, p.shape).astype(np.float32), rng.normal(0, sigma, p.shape).astype(np.float32))
        gain = float(rng.uniform(250, 2500))
        image = (noisy * gain).astype(np.float32)

        labels = np.arange(1, len(placed) + 1)
        centroids = np.array(ndimage.center_of_mass(instances > 0, instances, labels), dtype=float).reshape(-1, 3)
        info = {
            "index": index,
            "n_cmbs": len(placed),
            "n_cmbs_requested": n_cmbs,
            "n_thin_veins": p.n_thin_veins,
            "n_thick_veins": p.n_thick_veins,
            "n_calcifications": n_calc,
            "gain": round(gain, 2),
            "noise_sigma": round(float(sigma), 4),
            "cmbs": cmb_info,
        }
        return PhantomScan(image, instances, tissue, geom.affine, centroids, info)


def preset_json(preset: PhantomPreset) -> str:
    return json.dumps(asdict(preset), sort_keys=True)
