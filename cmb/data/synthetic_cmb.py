"""Synthetic CMBs in a training scan: a paramagnetic sphere taken through the SWI forward model of
`cmb.data.physics_phantom` and multiplied into the scan's magnitude.

For one sphere of radius a and susceptibility dchi (ppm against its surroundings):

1. Field. The k-space dipole convolution of the physics phantom, dB/B0 = IFFT[D(k) FFT[chi]] with
   D(k) = 1/3 - (k.b)^2/|k|^2, has a closed form for a uniform sphere (the Lorentz-sphere-corrected
   field; e.g. Haacke et al., "Magnetic Resonance Imaging", 1999, ch. 25; Cheng et al., Phys Med Biol
   2009): dB/B0 = dchi/3 (a/r)^3 (3 cos^2 theta - 1) outside, 0 inside, theta the angle between r and
   B0. The closed form is used here (no FFT, no wrap-around in a window-sized box);
   `tests/test_synthetic_cmb.py` checks it against `physics_phantom.dipole_field`.
2. Signal. On a grid `oversample` times finer than the scan's voxels, the CMB's factor on the local
   gradient-echo signal, s = m exp(-TE dR2*) exp(-i 2 pi gamma B0 (dB/B0) TE) (m, dR2*: the core's
   proton density over the tissue's and its extra R2*; 1 and 0 outside the core), averaged into
   voxels: intravoxel dephasing, which makes the CMB bloom beyond its core and depends on voxel size,
   field strength and echo time.
3. SWI. The voxel factor's homodyne high-pass phase phi = arg(s conj(s_lp)) (s_lp: an in-plane
   Gaussian low-pass with the second moment of the phantom's Hann filter) gives the negative-phase
   mask (1 + phi/pi for phi < 0) to the power 4, as the phantom's SWI processing (Haacke et al.
   2004); the magnitude is multiplied by |s| mask^4.

Approximations, stated: the scan's own SWI magnitude stands in for its tissue signal (the change is
multiplied in, as a real CMB's is, up to the phase mask of the background); the homodyne filter is a
Gaussian of the same second moment, applied within the window (the field beyond it taken as 0); noise removed
with the signal (the core goes near 0) is put back as Rician noise of the window's own level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cmb.data.physics_phantom import GAMMA_HZ_PER_T, b0_direction, block_mean, echo_time_ms

SITES = ("random", "dark", "vessel")  # the sampling pools a site may be drawn from (cmb.data.patches.PatchDataset.POOL_ATTR)
CORE_M0_RATIO = 0.5  # a CMB core's proton density over brain tissue's (the physics phantom: 0.4 against 0.72-0.85)
# The physics phantom's homodyne filter (a Hann window over 12.5% of k-space in-plane) as a Gaussian low-pass of
# the same second moment: sigma = N / (pi sqrt(1/3 - 2/pi^2) W) = 0.88 / 0.125 voxels, whatever the matrix size N.
HOMODYNE_SIGMA_VOX = 0.88 / 0.125
CORE_R2S_EXTRA_3T = 280.0  # a CMB core's extra R2* at 3 T, 1/s (the physics phantom: 300 against ~20)


@dataclass(frozen=True)
class SyntheticCMBConfig:
    """What a synthetic CMB is drawn from (each one draws its own values).

    sites: pools the site is drawn from ("random": parenchyma; "dark", "vessel": next to a dark
    structure, a nucleus or a vein: a site `next_to` the drawn voxel);
    diameter_mm: core diameter, log-uniform in [lo, hi]; dchi_ppm: susceptibility against tissue,
    uniform; fields_t: field strengths, one drawn (echo time drawn for it as the physics phantom's,
    15-25 ms at 3 T, 25-40 ms at 1.5 T); max_tilt_deg: head tilt of B0 off the scan's k axis;
    parenchyma: the band of normalized intensity a site (its voxel and 3x3x3 mean) must lie in (tissue, not CSF or a
    dark structure); oversample: the fine grid of the intravoxel average.
    """

    sites: tuple[str, ...] = ("random", "dark", "vessel")
    diameter_mm: tuple[float, float] = (1.0, 5.0)
    dchi_ppm: tuple[float, float] = (1.0, 4.0)
    fields_t: tuple[float, ...] = (1.5, 3.0)
    max_tilt_deg: float = 15.0
    parenchyma: tuple[float, float] = (0.3, 0.8)
    oversample: int = 2

    @classmethod
    def from_dict(cls, values: dict | None) -> SyntheticCMBConfig:
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown synthetic CMB setting(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        for key in ("sites", "diameter_mm", "dchi_ppm", "fields_t", "parenchyma"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def __post_init__(self) -> None:
        lo, hi = self.diameter_mm
        if not 0 < lo <= hi or not 0 < self.dchi_ppm[0] <= self.dchi_ppm[1] or not self.fields_t or min(self.fields_t) <= 0:
            raise ValueError(f"synthetic CMBs need 0 < diameter_mm lo <= hi, 0 < dchi_ppm lo <= hi and positive fields_t; got {self}")
        if int(self.oversample) < 1 or not self.sites:
            raise ValueError(f"synthetic CMBs need oversample >= 1 and at least one site; got {self}")
        if set(self.sites) - set(SITES):
            raise ValueError(f"synthetic CMB sites must be among {list(SITES)}, got {sorted(set(self.sites) - set(SITES))}")


@dataclass(frozen=True)
class SimulatedCMB:
    """One CMB's effect on a region: ratio float32 (I, J, K), the factor on the SWI magnitude (<= 1 on
    the CMB and its bloom, 1 far away); core bool (I, J, K), voxels whose centre lies in the sphere (at
    least the voxel holding the centre)."""

    ratio: np.ndarray
    core: np.ndarray


def sphere_field_ppm(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray, radius_mm: float, dchi_ppm: float, b0_dir: np.ndarray) -> np.ndarray:
    """dB/B0 (ppm) of a uniform sphere (radius mm, dchi ppm) at offsets (mm, broadcastable) from its centre:
    dchi/3 (a/r)^3 (3 cos^2 theta - 1) outside, 0 inside (the closed form of the k-space dipole model)."""
    r2 = dx**2 + dy**2 + dz**2
    along = dx * b0_dir[0] + dy * b0_dir[1] + dz * b0_dir[2]
    safe = np.where(r2 > 0, r2, 1.0)
    outside = dchi_ppm / 3.0 * radius_mm**3 / safe**1.5 * (3.0 * along**2 / safe - 1.0)
    return np.where(r2 > radius_mm**2, outside, 0.0)


def simulate_cmb(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], centre_vox: np.ndarray, diameter_mm: float,
                 dchi_ppm: float, field_t: float, te_s: float, b0_dir: np.ndarray, oversample: int = 2,
                 homodyne_sigma_vox: float = HOMODYNE_SIGMA_VOX) -> SimulatedCMB:
    """The SWI magnitude factor and core of a CMB centred at `centre_vox` (float voxel coordinates of a
    region of `shape`, spacing mm) for a scanner at `field_t` tesla, echo time `te_s` seconds."""
    os_ = int(oversample)
    sub = (np.arange(os_) + 0.5) / os_ - 0.5  # sub-voxel centres, in voxels, around each voxel centre
    axes = [(((np.arange(n)[:, None] + sub[None, :]).ravel() - c) * s).astype(np.float32)
            for n, c, s in zip(shape, centre_vox, spacing_mm)]
    dx, dy, dz = np.ix_(*axes)
    radius = diameter_mm / 2.0
    omega_te = 2.0 * math.pi * GAMMA_HZ_PER_T * field_t * 1e-6 * te_s  # rad per ppm
    phase_fine = sphere_field_ppm(dx, dy, dz, radius, dchi_ppm * omega_te, b0_dir.astype(np.float32))  # rad: the field times omega TE
    in_core = (dx**2 + dy**2 + dz**2) <= radius**2
    core_factor = CORE_M0_RATIO * math.exp(-te_s * CORE_R2S_EXTRA_3T * (0.5 + 0.5 * field_t / 3.0))
    amplitude = np.where(in_core, np.float32(core_factor), np.float32(1.0))
    real = block_mean(amplitude * np.cos(phase_fine), os_)
    imag = block_mean(-amplitude * np.sin(phase_fine), os_)  # S ~ exp(-i omega TE dB/B0), as the physics phantom
    phase = homodyne_phase(real, imag, homodyne_sigma_vox)
    mask = np.where(phase < 0, 1.0 + phase / np.pi, 1.0)
    ratio = (np.hypot(real, imag) * mask**4).astype(np.float32)
    grids = np.ix_(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre_vox, spacing_mm)])
    core = np.asarray(sum(g**2 for g in grids) <= radius**2)  # a new (I, J, K) array: the open mesh broadcast
    core[tuple(np.clip(np.rint(centre_vox).astype(int), 0, np.asarray(shape) - 1))] = True
    return SimulatedCMB(np.minimum(ratio, 1.0), core)


def homodyne_phase(real: np.ndarray, imag: np.ndarray, sigma_vox: float) -> np.ndarray:
    """The high-pass phase arg(s conj(s_lp)) of a CMB's voxel factor s = real + i imag (I, J, K), s_lp an in-plane
    Gaussian low-pass of `sigma_vox` voxels (s = 1 beyond the region): SWI's homodyne filter, which removes
    the CMB's own far, smooth phase along with the background's."""
    low_re = ndimage.gaussian_filter(real, (sigma_vox, sigma_vox, 0), mode="constant", cval=1.0)
    low_im = ndimage.gaussian_filter(imag, (sigma_vox, sigma_vox, 0), mode="constant", cval=0.0)
    return np.arctan2(imag * low_re - real * low_im, real * low_re + imag * low_im)


def draw_cmb(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], cfg: SyntheticCMBConfig,
             rng: np.random.Generator) -> SimulatedCMB:
    """A CMB with parameters drawn from `cfg`, centred on the region's centre voxel +- half a voxel."""
    lo, hi = cfg.diameter_mm
    diameter = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    dchi = float(rng.uniform(*cfg.dchi_ppm))
    field_t = float(cfg.fields_t[int(rng.integers(len(cfg.fields_t)))])
    te_s = echo_time_ms(field_t, rng) / 1000.0
    b0 = b0_direction(cfg.max_tilt_deg, rng)
    centre = np.asarray(shape) // 2 + rng.uniform(-0.5, 0.5, 3)
    return simulate_cmb(shape, spacing_mm, centre, diameter, dchi, field_t, te_s, b0, cfg.oversample)


def noise_sigma(region: np.ndarray) -> float:
    """Noise level of a region's non-zero voxels: the MAD of its residual to a 3x3x3 mean, scaled to a
    Gaussian's sigma (1.4826) and for the mean's share of the voxel itself (sqrt(27/26))."""
    inside = region > 0
    if inside.sum() < 27:
        return 0.0
    residual = (region - ndimage.uniform_filter(region, 3))[inside]
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))) * math.sqrt(27 / 26))


def insert_cmb(image: np.ndarray, target: np.ndarray, cmb: SimulatedCMB, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Multiply `cmb` into a region of the magnitude, in place, and add its core to `target`; noise taken
    away with the signal is put back (Rician, the region's own level) so the core is not noise-free."""
    sigma = noise_sigma(image)
    image *= cmb.ratio
    if sigma > 0:
        missing = sigma * np.sqrt(np.clip(1.0 - cmb.ratio**2, 0.0, 1.0))
        noisy = np.sqrt((image + missing * rng.standard_normal(image.shape)) ** 2 + (missing * rng.standard_normal(image.shape)) ** 2)
        image[...] = np.where(image > 0, noisy, image).astype(image.dtype)
    np.maximum(target, cmb.core.astype(target.dtype), out=target)
    return image, target


def plausible_site(image: np.ndarray, target: np.ndarray, centre: np.ndarray, band: tuple[float, float], clear_voxels: int = 4) -> bool:
    """Whether a CMB may be put at integer `centre`: inside the volume, its intensity and its 3x3x3 mean within
    `band` (parenchyma, not CSF or a dark structure), and no labelled CMB within `clear_voxels`."""
    c = np.asarray(centre, dtype=int)
    if np.any(c < 1) or np.any(c >= np.asarray(image.shape) - 1):
        return False
    local = image[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 1:c[2] + 2]
    if np.any(local <= 0) or not band[0] <= float(local.mean()) <= band[1] or not band[0] <= float(image[tuple(c)]) <= band[1]:
        return False
    lo = np.maximum(c - clear_voxels, 0)
    hi = np.minimum(c + clear_voxels + 1, image.shape)
    return not target[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any()


def next_to(point: np.ndarray, spacing_mm: tuple[float, float, float], cfg: SyntheticCMBConfig, rng: np.random.Generator) -> np.ndarray:
    """A site beside a dark voxel `point`: in a random direction, 0.3-1 times the largest CMB radius plus 1-2 voxels away."""
    direction = rng.standard_normal(3)
    direction /= max(float(np.linalg.norm(direction)), 1e-9)
    reach_vox = cfg.diameter_mm[1] / 2.0 / np.asarray(spacing_mm) * rng.uniform(0.3, 1.0) + rng.uniform(1.0, 2.0)
    return np.rint(np.asarray(point) + direction * reach_vox).astype(int)
