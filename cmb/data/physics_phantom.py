"""A second phantom family built from SWI physics: susceptibility -> field -> gradient-echo signal -> SWI.

The first family (`cmb.data.phantom`) paints dark shapes into an image. This one paints
*susceptibility* and lets the physics make the image, so blooming, the orientation dependence
of veins and the opposite phase of calcifications come out of the forward model rather than
being drawn:

1. A susceptibility map chi (ppm, relative to CSF) and tissue maps M0 (proton density,
   arbitrary units) and R2* (1/s) on a grid `oversample` times finer than the scan's voxels:
   head shells, grey and white matter, ventricles, iron-rich deep nuclei (paramagnetic),
   veins of every calibre and orientation (deoxygenated blood, paramagnetic:
   dchi = dchi_do * Hct * (1 - Y), dchi_do = 3.39 ppm (SI)), calcifications (diamagnetic),
   an air-filled sinus (dchi ~ +9.4 ppm against tissue), and CMBs as paramagnetic ovoid cores
   of 1-5 mm (dchi 1-4 ppm).
2. The field perturbation by dipole convolution in k-space (Salomir et al. 2003; Marques and
   Bowtell 2005): dB/B0 = IFFT[ D(k) FFT[chi] ], D(k) = 1/3 - (k.b)^2 / |k|^2, D(0) = 0, with
   b the direction of B0 in head coordinates (a random head tilt of up to 15 degrees).
3. The complex gradient-echo signal on the fine grid, S = M0 exp(-TE R2*) exp(-i 2 pi gamma
   B0 (dB/B0) TE) with gamma = 42.577 MHz/T, averaged into the scan's voxels: the intravoxel
   dephasing that makes a CMB bloom beyond its core and a vein look different along and
   across B0 (Haacke et al. 2004, 2009).
4. A smooth coil-like receive bias and complex Gaussian noise (Rician in the magnitude).
5. SWI processing (Haacke et al. 2004): homodyne high-pass phase phi = arg(S conj(S_lp)) with
   S_lp the slice's k-space centre under a Hann window, a negative-phase mask
   m = 1 + phi/pi for phi < 0 (1 elsewhere), and SWI = |S| m^4.

Truth is the CMB cores (label map on the scan's grid) and their centres. Deterministic by seed.
Written here (numpy/torch FFTs) because no package that installs offline simulates this
forward model for a whole head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cmb.data.phantom import PhantomScan, _curve, _Geometry, _tube_distance, _unit, cmb_counts, smooth_field

GAMMA_HZ_PER_T = 42.577e6
DCHI_DEOXY_PPM = 3.39  # SI susceptibility of fully deoxygenated blood against oxygenated
# Tissue classes: M0 (a.u.), R2* at 3 T (1/s), chi (ppm against CSF). R2* scales with B0 as R2 + R2'(B0/3 T), half each at 3 T.
TISSUE = {
    "scalp": (0.9, 25.0, -0.05),
    "skull": (0.08, 80.0, -1.5),
    "csf": (1.0, 2.0, 0.0),
    "grey": (0.85, 17.0, 0.02),
    "white": (0.72, 21.0, -0.03),
}
AIR_CHI_PPM = 9.4
TISSUE_CODES = {"air": 0, "scalp": 1, "skull": 2, "csf": 3, "brain": 4}  # the tissue map, as the first family's


@dataclass(frozen=True)
class PhysicsPreset:
    """Size, acquisition choices and content of a physics-phantom dataset (each scan draws its own
    voxel size, field strength and echo time from the choices)."""

    n_scans: int
    fov_mm: tuple[float, float, float]
    voxel_sizes_mm: tuple[tuple[float, float, float], ...]
    fields_t: tuple[float, ...]
    n_medullary_veins: int
    n_cortical_veins: int
    total_cmbs: int | None = None
    n_calcifications: tuple[int, int] = (0, 3)
    oversample: int = 2
    family: str = "physics"


PHYSICS_PRESETS: dict[str, PhysicsPreset] = {
    "physics_tiny": PhysicsPreset(4, (32.0, 32.0, 32.0), ((0.5, 0.5, 1.0),), (3.0,), 6, 1, n_calcifications=(0, 1)),
    "physics_demo": PhysicsPreset(8, (80.0, 80.0, 56.0), ((0.5, 0.5, 1.0),), (3.0,), 45, 8),
    "physics_paper": PhysicsPreset(15, (240.0, 240.0, 150.0), ((0.5, 0.5, 1.0), (0.8, 0.8, 1.6), (1.0, 1.0, 2.0)), (1.5, 3.0),
                                   260, 45, total_cmbs=40),
}


def echo_time_ms(field_t: float, rng: np.random.Generator) -> float:
    """SWI echo times in use: 15-25 ms at 3 T, 25-40 ms at 1.5 T."""
    return float(rng.uniform(15, 25) if field_t >= 2.0 else rng.uniform(25, 40))


def b0_direction(max_tilt_deg: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vector of B0 in head (i, j, k) coordinates: the scanner's axis k tilted about i and j."""
    a, b = np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg, 2))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    return ry @ rx @ np.array([0.0, 0.0, 1.0])


def dipole_field(chi_ppm: np.ndarray, spacing_mm: tuple[float, float, float], b0_dir: np.ndarray) -> np.ndarray:
    """Relative field perturbation dB/B0 (ppm) of a susceptibility map (ppm) (I, J, K) by k-space
    dipole convolution: IFFT[(1/3 - (k.b)^2/|k|^2) FFT[chi]], the k = 0 term set to 0. float32."""
    chi = torch.from_numpy(np.ascontiguousarray(chi_ppm, dtype=np.float32))
    spectrum = torch.fft.rfftn(chi)
    del chi
    ki = torch.fft.fftfreq(chi_ppm.shape[0], d=spacing_mm[0]).view(-1, 1, 1)
    kj = torch.fft.fftfreq(chi_ppm.shape[1], d=spacing_mm[1]).view(1, -1, 1)
    kk = torch.fft.rfftfreq(chi_ppm.shape[2], d=spacing_mm[2]).view(1, 1, -1)
    b = [float(v) for v in b0_dir]
    for k_slab in range(0, spectrum.shape[0], 64):  # in slabs: the kernel never exists at full size
        ki_s = ki[k_slab:k_slab + 64]
        k2 = ki_s**2 + kj**2 + kk**2
        kb = ki_s * b[0] + kj * b[1] + kk * b[2]
        kernel = 1.0 / 3.0 - kb**2 / torch.where(k2 > 0, k2, torch.ones_like(k2))
        kernel = torch.where(k2 > 0, kernel, torch.zeros_like(kernel))
        spectrum[k_slab:k_slab + 64] *= kernel
    return torch.fft.irfftn(spectrum, s=chi_ppm.shape).numpy()


def inside_ellipsoid(grid: tuple[np.ndarray, np.ndarray, np.ndarray], centre, axes) -> np.ndarray:  # noqa: ANN001 (3 numbers each)
    """Bool mask of the points of an open mesh `grid` (broadcastable i, j, k coordinates) inside the
    axis-aligned ellipsoid of `centre` and semi-axes `axes` (the grid's units)."""
    gi, gj, gk = grid
    return ((gi - centre[0]) / axes[0]) ** 2 + ((gj - centre[1]) / axes[1]) ** 2 + ((gk - centre[2]) / axes[2]) ** 2 <= 1


def block_mean(fine: np.ndarray, factor: int) -> np.ndarray:
    """Average `factor`^3 blocks of a fine grid (I*f, J*f, K*f) into (I, J, K)."""
    if factor == 1:
        return fine
    i, j, k = (s // factor for s in fine.shape)
    return fine.reshape(i, factor, j, factor, k, factor).mean(axis=(1, 3, 5))


def swi_from_complex(signal: np.ndarray, window_fraction: float = 0.125, power: int = 4) -> np.ndarray:
    """SWI magnitude from a complex image (I, J, K): per slice, a homodyne high-pass phase
    arg(S conj(S_lp)) (S_lp: the k-space centre, a Hann window `window_fraction` of the matrix
    wide) and a negative-phase mask (1 + phi/pi for phi < 0) to the power `power`, times |S|."""
    n_i, n_j = signal.shape[:2]
    wi, wj = max(3, int(round(n_i * window_fraction))), max(3, int(round(n_j * window_fraction)))
    window = np.zeros((n_i, n_j), dtype=np.float32)
    hann = np.outer(np.hanning(wi), np.hanning(wj)).astype(np.float32)
    ci, cj = n_i // 2 - wi // 2, n_j // 2 - wj // 2
    window[ci:ci + wi, cj:cj + wj] = hann
    window = np.fft.ifftshift(window)
    spectrum = np.fft.fft2(signal, axes=(0, 1))
    low = np.fft.ifft2(spectrum * window[:, :, None], axes=(0, 1))
    phase = np.angle(signal * np.conj(low))
    mask = np.where(phase < 0, 1.0 + phase / np.pi, 1.0)
    return (np.abs(signal) * mask**power).astype(np.float32)


class PhysicsPhantomGenerator:
    """Builds physics-phantom scans for one preset; scan `index` is deterministic given `seed`."""

    def __init__(self, preset: PhysicsPreset, seed: int = 0) -> None:
        self.preset = preset
        self.seed = seed
        self.counts = cmb_counts(preset.n_scans, np.random.default_rng([seed, 10**6 + 7]), preset.total_cmbs)

    def generate(self, index: int) -> PhantomScan:
        p = self.preset
        rng = np.random.default_rng([self.seed, index, 7])
        voxel = tuple(float(v) for v in p.voxel_sizes_mm[int(rng.integers(len(p.voxel_sizes_mm)))])
        field_t = float(p.fields_t[int(rng.integers(len(p.fields_t)))])
        te_s = echo_time_ms(field_t, rng) / 1000.0
        b0_dir = b0_direction(15.0, rng)
        shape = tuple(max(16, 2 * int(round(f / v / 2))) for f, v in zip(p.fov_mm, voxel))
        os_ = int(p.oversample)
        fine = _Geometry(tuple(s * os_ for s in shape), tuple(v / os_ for v in voxel))  # type: ignore[arg-type]
        native = _Geometry(shape, voxel)  # type: ignore[arg-type]
        half = native.extent_mm / 2
        head_axes = half * np.array([0.86, 0.9, 1.15]) * rng.uniform(0.94, 1.0, 3)
        centre_mm = rng.uniform(-0.02, 0.02, 3) * native.extent_mm
        shells = np.array([0.05, 0.08, 0.025, 0.05]) * rng.uniform(0.85, 1.15, 4)  # scalp, skull, CSF, cortex (of the radius)
        r_brain = 1.0 - shells[:3].sum()
        gyri = smooth_field(shape, rng, factor=16, sigma=1.0)  # folding, on the native grid (looked up per fine voxel)
        nuclei = [(0.28 * s, 0.02, -0.02, 0.07, 0.14, 0.12, rng.uniform(0.08, 0.16)) for s in (-1, 1)]
        nuclei += [(0.2 * s, -0.02, -0.02, 0.05, 0.09, 0.09, rng.uniform(0.12, 0.22)) for s in (-1, 1)]
        nuclei += [(0.06 * s, -0.1, -0.22, 0.035, 0.04, 0.05, rng.uniform(0.12, 0.2)) for s in (-1, 1)]
        sinus = (0.0, 0.55, -0.62, 0.22, 0.16, 0.16)

        m0 = np.zeros(fine.shape, np.float32)
        r2s = np.zeros(fine.shape, np.float32)
        chi = np.zeros(fine.shape, np.float32)
        tissue = np.zeros(fine.shape, np.uint8)
        white = np.zeros(fine.shape, bool)
        axes_mm = [fine.to_mm_axis(a, slice(0, fine.shape[a])) for a in range(3)]
        u = [(ax - c) / h for ax, c, h in zip(axes_mm, centre_mm, head_axes)]
        for k0 in range(0, fine.shape[2], 16):  # anatomy in slabs of the fine grid
            ks = slice(k0, min(fine.shape[2], k0 + 16))
            ii, jj, kk = np.ix_(u[0], u[1], u[2][ks])
            radius = np.sqrt(ii**2 + jj**2 + kk**2).astype(np.float32)
            folded = radius + 0.012 * gyri[np.ix_(np.arange(fine.shape[0]) // os_, np.arange(fine.shape[1]) // os_,
                                                      np.arange(ks.start, ks.stop) // os_)]

            def put(where: np.ndarray, name: str, code: int | None, slab: slice = ks) -> None:
                m, r, c = TISSUE[name]
                m0[:, :, slab][where], r2s[:, :, slab][where], chi[:, :, slab][where] = m, r, c
                if code is not None:
                    tissue[:, :, slab][where] = code

            put(radius <= 1.0, "scalp", 1)
            put(radius <= 1.0 - shells[0], "skull", 2)
            put(radius <= 1.0 - shells[0] - shells[1], "csf", 3)
            brain = folded <= r_brain
            put(brain, "grey", 4)
            wm = folded <= r_brain - shells[3] - 0.02 * np.abs(folded - radius) / 0.012
            put(wm, "white", None)
            white[:, :, ks] = wm
            for side in (-1, 1):  # ventricles
                vent = inside_ellipsoid((ii, jj, kk), (0.1 * side, 0.05, 0.05), (0.07, 0.28, 0.16))
                put(vent, "csf", None)
                white[:, :, ks] &= ~vent
            for ci, cj, ck, ai, aj, ak, dchi in nuclei:  # iron-rich deep grey nuclei: paramagnetic, short T2*
                nuc = inside_ellipsoid((ii, jj, kk), (ci, cj, ck), (ai, aj, ak))
                m0[:, :, ks][nuc], r2s[:, :, ks][nuc], chi[:, :, ks][nuc] = 0.8, 21.0 + 160.0 * dchi, dchi
                white[:, :, ks] &= ~nuc
            air = inside_ellipsoid((ii, jj, kk), sinus[:3], sinus[3:])
            air &= ~brain
            m0[:, :, ks][air], r2s[:, :, ks][air], chi[:, :, ks][air] = 0.0, 0.0, AIR_CHI_PPM
            tissue[:, :, ks][air] = 0
        texture = 1.0 + 0.03 * smooth_field(shape, rng, factor=4, sigma=1.0)
        m0 *= np.repeat(np.repeat(np.repeat(texture, os_, 0), os_, 1), os_, 2)
        del texture

        brain_idx = np.argwhere(white[::os_, ::os_, ::os_])
        vein_paths: list[tuple[np.ndarray, float]] = []

        def random_brain_point() -> np.ndarray:
            return native.to_mm(brain_idx[rng.integers(len(brain_idx))].astype(float))

        def draw_vessel(path: np.ndarray, r: float, dchi: float, r2: float) -> None:
            box, dist = _tube_distance(fine, path, reach_mm=r + 2 * fine.spacing.max())
            if box is None:
                return
            inside = (dist <= r) & (tissue[box] >= 3)
            m0[box][inside], r2s[box][inside], chi[box][inside] = 0.8, r2, dchi
            white[box][inside] = False
            vein_paths.append((path, r))

        def vein_chi() -> float:
            return DCHI_DEOXY_PPM * rng.uniform(0.38, 0.45) * rng.uniform(0.3, 0.45)  # Hct, 1 - Y

        for _ in range(p.n_medullary_veins):  # medullary veins: thin, radial and in every orientation
            start = random_brain_point()
            direction = start - centre_mm + rng.normal(0, 8, 3)
            if rng.random() < 0.35:
                direction = rng.standard_normal(3)
            draw_vessel(_curve(start, direction, rng.uniform(6, 22), 0.15, rng), rng.uniform(0.2, 0.5), vein_chi(), 45.0)
        for _ in range(p.n_cortical_veins):  # pial veins on the brain surface, thicker
            u_dir = _unit(rng.standard_normal(3))
            start = centre_mm + u_dir * head_axes * (r_brain - shells[3] * 0.5)
            path = _curve(start, _unit(np.cross(u_dir, rng.standard_normal(3))), rng.uniform(15, 45), 0.1, rng)
            rel = (path - centre_mm) / head_axes
            path = centre_mm + rel / np.linalg.norm(rel, axis=1, keepdims=True) * (r_brain - shells[3] * 0.3) * head_axes
            draw_vessel(path, rng.uniform(0.6, 1.4), vein_chi(), 45.0)

        n_calc = int(rng.integers(p.n_calcifications[0], p.n_calcifications[1] + 1))
        for _ in range(n_calc):  # calcifications: diamagnetic, dark in magnitude, phase opposite to a CMB's
            c0, dchi = random_brain_point(), -rng.uniform(0.5, 2.0)
            for _lobe in range(int(rng.integers(2, 5))):
                self._ovoid(fine, c0 + rng.normal(0, 1.0, 3), np.full(3, rng.uniform(0.6, 1.6)), m0, r2s, chi, 0.15, 200.0, dchi)

        instances = np.zeros(shape, np.int16)
        n_cmbs, placed, cmb_info, attempts = self.counts[index], [], [], 0
        margin = np.array([10, 10, 8]) * native.spacing  # a whole window inside the volume
        while len(placed) < n_cmbs and attempts < 4000:
            attempts += 1
            diameter = float(np.clip(rng.lognormal(np.log(2.6), 0.35), 1.0, 5.0))
            r = diameter / 2
            site = rng.random()
            if site < 0.3 and vein_paths:  # touching a vein
                path, r_v = vein_paths[int(rng.integers(len(vein_paths)))]
                anchor = path[int(rng.integers(len(path)))]
                c = anchor + _unit(np.cross(path[-1] - path[0], rng.standard_normal(3))) * (r + r_v + 0.2)
            elif site < 0.45:  # at the rim of a deep nucleus
                ci, cj, ck, ai, aj, ak, _ = nuclei[int(rng.integers(len(nuclei)))]
                d = _unit(rng.standard_normal(3))
                c = centre_mm + (np.array([ci, cj, ck]) + d * np.array([ai, aj, ak]) * rng.uniform(0.9, 1.3)) * head_axes
            else:
                c = random_brain_point()
            v = np.round(native.to_vox(c)).astype(int)
            f = np.round(fine.to_vox(c)).astype(int)
            if np.any(v < 0) or np.any(v >= np.array(shape)) or np.any(f < 0) or np.any(f >= np.array(fine.shape)):
                continue
            if tissue[tuple(f)] != 4 or chi[tuple(f)] > 0.3:  # parenchyma, not inside a vein
                continue
            if np.any(c - margin < native.to_mm(np.zeros(3))) or np.any(c + margin > native.to_mm(np.array(shape) - 1)):
                continue
            if any(np.linalg.norm(c - c2) < r + r2 + 3.0 for c2, r2 in placed):
                continue
            axes = r * rng.uniform(0.85, 1.15, 3)
            dchi = float(rng.uniform(1.0, 4.0))
            self._ovoid(fine, c, axes, m0, r2s, chi, 0.4, 300.0, dchi)
            label = len(placed) + 1
            box = native.box(c - axes.max() - native.spacing, c + axes.max() + native.spacing)
            core = inside_ellipsoid(native.grid_mm(box), c, axes)
            if not core.any():  # a core smaller than the voxel grid's spacing: its nearest voxel
                core[tuple(np.clip(np.round(native.to_vox(c)).astype(int) - [s.start for s in box], 0, np.array(core.shape) - 1))] = True
            instances[box][core & (instances[box] == 0)] = label
            placed.append((c, r))
            cmb_info.append({"label": label, "core_diameter_mm": round(diameter, 2), "dchi_ppm": round(dchi, 2),
                             "site": "vein" if site < 0.3 else "nucleus" if site < 0.45 else "parenchyma"})

        field = dipole_field(chi, tuple(fine.spacing), b0_dir)  # ppm
        del chi
        r2s *= 0.5 + 0.5 * field_t / 3.0
        omega_te = (2 * np.pi * GAMMA_HZ_PER_T * field_t * 1e-6 * te_s)  # rad per ppm of field
        signal = np.empty(shape, np.complex64)
        for k0 in range(0, shape[2], 4):  # the fine signal in slabs, averaged into the scan's voxels
            fs = slice(k0 * os_, min(shape[2], k0 + 4) * os_)
            s_fine = m0[:, :, fs] * np.exp(-te_s * r2s[:, :, fs]) * np.exp(-1j * omega_te * field[:, :, fs])
            signal[:, :, k0:k0 + 4] = block_mean(s_fine.astype(np.complex64), os_)
        del m0, r2s, field
        radius_native = np.sqrt(sum(((g - c) / h) ** 2 for g, c, h in zip(native.grid_mm(tuple(slice(0, s) for s in shape)),
                                                                          centre_mm, head_axes)))
        bias = np.exp(0.2 * smooth_field(shape, rng, factor=32, sigma=1.0) + 0.25 * radius_native * rng.uniform(0.5, 1.0))
        signal *= bias.astype(np.float32)
        tissue_native = tissue[os_ // 2::os_, os_ // 2::os_, os_ // 2::os_]
        reference = float(np.median(np.abs(signal[tissue_native == 4])))
        snr = float(rng.uniform(25, 45))
        sigma = reference / snr
        signal += (rng.normal(0, sigma, shape) + 1j * rng.normal(0, sigma, shape)).astype(np.complex64)
        swi = swi_from_complex(signal)
        gain = float(rng.uniform(250, 2500)) / max(reference, 1e-6)
        image = (swi * gain).astype(np.float32)
        centroids = np.array([native.to_vox(c) for c, _ in placed], dtype=float).reshape(-1, 3)
        info = {"index": index, "family": "physics", "n_cmbs": len(placed), "n_cmbs_requested": n_cmbs, "voxel_mm": list(voxel),
                "field_t": field_t, "te_ms": round(te_s * 1000, 2), "b0_direction": [round(float(v), 4) for v in b0_dir],
                "snr": round(snr, 1), "n_calcifications": n_calc, "n_medullary_veins": p.n_medullary_veins,
                "n_cortical_veins": p.n_cortical_veins, "cmbs": cmb_info}
        return PhantomScan(image, instances, tissue_native.copy(), native.affine, centroids, info)

    @staticmethod
    def _ovoid(geom: _Geometry, c: np.ndarray, axes: np.ndarray, m0: np.ndarray, r2s: np.ndarray, chi: np.ndarray,
               m0_value: float, r2_value: float, chi_value: float) -> None:
        """Write an ovoid (centre `c`, semi-axes `axes`, mm) of the given M0, R2* and chi into the fine maps."""
        box = geom.box(c - axes.max() - geom.spacing, c + axes.max() + geom.spacing)
        if box is None:
            return
        inside = inside_ellipsoid(geom.grid_mm(box), c, axes)
        m0[box][inside], r2s[box][inside], chi[box][inside] = m0_value, r2_value, chi_value
