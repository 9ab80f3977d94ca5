from __future__ import annotations

import numpy as np
from scipy import ndimage

from cmb.data.phantom import PRESETS, PhantomGenerator, cmb_counts


def test_counts_distribution_and_forced_total() -> None:
    counts = cmb_counts(2000, np.random.default_rng(0))
    assert min(counts) == 0 and max(counts) <= 13 and np.median(counts) == 2
    assert sum(cmb_counts(15, np.random.default_rng(1), total=40)) == 40
    assert sum(PhantomGenerator(PRESETS["paper"], 0).counts) == 40


def test_deterministic_by_seed() -> None:
    a = PhantomGenerator(PRESETS["tiny"], seed=3).generate(1)
    b = PhantomGenerator(PRESETS["tiny"], seed=3).generate(1)
    c = PhantomGenerator(PRESETS["tiny"], seed=4).generate(1)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.instances, b.instances)
    assert not np.array_equal(a.image, c.image)


def test_cmbs_are_darker_than_surroundings_and_counted() -> None:
    gen = PhantomGenerator(PRESETS["demo"], seed=0)
    for index in range(3):
        scan = gen.generate(index)
        n = scan.info["n_cmbs"]
        assert n == gen.counts[index] == scan.instances.max() == len(scan.centroids_vox)
        for label in range(1, n + 1):
            comp = scan.instances == label
            ring = ndimage.binary_dilation(comp, iterations=4) & ~ndimage.binary_dilation(comp, iterations=2)
            assert scan.image[comp].mean() < 0.85 * np.median(scan.image[ring])
            centre = tuple(np.round(scan.centroids_vox[label - 1]).astype(int))
            assert scan.instances[centre] == label


def test_phantom_has_head_tissues_and_veins() -> None:
    scan = PhantomGenerator(PRESETS["demo"], seed=0).generate(0)
    assert set(np.unique(scan.tissue)) == {0, 1, 2, 3, 4}
    brain = scan.tissue == 4
    # many dark non-CMB structures (veins, nuclei) inside the brain
    dark = brain & (scan.image < 0.6 * np.median(scan.image[brain])) & (scan.instances == 0)
    _, n_dark = ndimage.label(dark)
    assert dark.sum() > 1000 and n_dark > 20
