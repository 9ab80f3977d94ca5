"""The SWI-physics phantom: the dipole field against its closed form, SWI's phase mask, and scans whose
CMBs are dark, bloom beyond their cores and are labelled where they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cmb.data.physics_phantom import PHYSICS_PRESETS, PhysicsPhantomGenerator, dipole_field, swi_from_complex


def test_the_field_of_a_sphere_is_its_closed_form_dipole() -> None:
    """A sphere of dchi in B0 along k: 0 inside (Lorentz sphere), dchi (a/r)^3 (3cos^2 - 1)/3 outside."""
    n, a, dchi = 96, 5.0, 1.0
    grid = np.indices((n, n, n), dtype=float) - n / 2
    chi = (np.sqrt((grid**2).sum(0)) <= a).astype(np.float32) * dchi
    field = dipole_field(chi, (1.0, 1.0, 1.0), np.array([0.0, 0.0, 1.0]))
    c = n // 2
    assert abs(field[c, c, c]) < 0.03 * dchi
    for r in (10, 14):
        pole, equator = field[c, c, c + r], field[c + r, c, c]
        volume_ratio = chi.sum() / (4 / 3 * np.pi * r**3)  # the voxelized sphere's (a/r)^3
        assert pole == pytest.approx(2 / 3 * dchi * volume_ratio, rel=0.1)
        assert equator == pytest.approx(-1 / 3 * dchi * volume_ratio, rel=0.1)


def test_swi_darkens_negative_phase_only() -> None:
    shape = (64, 64, 4)
    signal = np.ones(shape, np.complex64)
    signal[20:24, 20:24] *= np.exp(-1j * 1.5)  # paramagnetic (our sign): negative phase
    signal[40:44, 40:44] *= np.exp(+1j * 1.5)  # diamagnetic: positive phase
    swi = swi_from_complex(signal)
    assert swi[22, 22, 0] < 0.3 and swi[42, 42, 0] > 0.9 and swi[5, 5, 0] > 0.9


@pytest.fixture(scope="module")
def tiny_scans():
    gen = PhysicsPhantomGenerator(PHYSICS_PRESETS["physics_tiny"], seed=1)
    return [gen.generate(i) for i in range(4)], gen


def test_scans_are_deterministic_by_seed_and_differ_between_seeds(tiny_scans) -> None:
    scans, _ = tiny_scans
    again = PhysicsPhantomGenerator(PHYSICS_PRESETS["physics_tiny"], seed=1).generate(2)
    other = PhysicsPhantomGenerator(PHYSICS_PRESETS["physics_tiny"], seed=2).generate(2)
    np.testing.assert_array_equal(again.image, scans[2].image)
    assert not np.array_equal(other.image, scans[2].image)


def test_cmbs_are_labelled_dark_and_bloom_beyond_their_cores(tiny_scans) -> None:
    scans, gen = tiny_scans
    assert [s.info["n_cmbs"] for s in scans] == gen.counts[:4] and sum(gen.counts[:4]) >= 2
    for scan in scans:
        brain = (scan.tissue == 4) & (scan.instances == 0)
        level = np.median(scan.image[brain])
        for label, centre in enumerate(scan.centroids_vox, start=1):
            core = scan.instances == label
            assert core.any() and np.linalg.norm(np.argwhere(core).mean(0) - centre) < 1.5
            assert scan.image[core].mean() < 0.5 * level  # dark
            # blooming: the shell of voxels just outside the core is darkened by intravoxel dephasing too
            shell = ndimage.binary_dilation(core, iterations=1) & ~core & (scan.tissue == 4)
            assert scan.image[shell].mean() < 0.8 * level


def test_a_physics_preset_writes_the_nifti_layout(tmp_path: Path) -> None:
    from cmb.data.readers import NiftiDataset
    from cmb.data.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "phys", "physics_tiny", seed=0, progress=False)
    ds = NiftiDataset(root)
    counts = PhysicsPhantomGenerator(PHYSICS_PRESETS["physics_tiny"], 0).counts
    assert ds.scan_ids() == [f"synth{i:03d}" for i in range(4)]
    assert [len(ds.load(s).cmbs) for s in ds.scan_ids()] == counts
