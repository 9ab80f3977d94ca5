from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy.io import savemat

from cmb.data.io import vox_to_mm
from cmb.data.readers import DouDataset, NiftiDataset, SyntheticDataset, ValdoDataset, instances_from_label_map
from tests.conftest import AFFINE, make_volume, save

REPO = Path(__file__).resolve().parents[1]


def test_nifti_labels_give_instances_and_centroids(nifti_root: Path) -> None:
    ds = NiftiDataset(nifti_root)
    assert ds.scan_ids() == ["s0", "s1", "s2"]
    s0 = ds.load("s0")
    assert len(s0.cmbs) == 2
    found = sorted(tuple(np.round(c.centroid_vox).astype(int)) for c in s0.cmbs)
    assert found == [(12, 12, 8), (28, 26, 14)]
    c = s0.cmbs[0]
    np.testing.assert_allclose(c.centroid_mm, vox_to_mm(np.array(c.centroid_vox), AFFINE)[0])
    assert s0.spacing_mm == pytest.approx((0.45, 0.45, 0.9))
    assert ds.load("s2").cmbs == []


def test_label_map_binary_splits_components_and_ids_stay_whole() -> None:
    labels = np.zeros((10, 10, 10))
    labels[1:3, 1:3, 1:3] = 1
    labels[6:8, 6:8, 6:8] = 1
    assert instances_from_label_map(labels).max() == 2
    labels[6:8, 6:8, 6:8] = 5
    labels[1, 8, 8] = 5  # id 5 in two pieces: still one CMB
    inst = instances_from_label_map(labels)
    assert inst.max() == 2 and len(np.unique(inst[labels == 5])) == 1


def test_instance_statistics_equal_whole_volume_ones() -> None:
    """Centroids and sizes computed in each CMB's bounding box equal scipy's whole-volume statistics, for CMBs of
    any shape, ids that are not consecutive and an id in two pieces."""
    from scipy import ndimage

    from cmb.data.readers import cmbs_from_instances

    rng = np.random.default_rng(3)
    labels = np.zeros((40, 36, 24))
    for value in (2, 7, 9, 30):
        centre = rng.integers(4, 20, 3)
        blob = rng.random((5, 4, 3)) < 0.6
        blob[2, 2, 1] = True
        labels[centre[0]:centre[0] + 5, centre[1]:centre[1] + 4, centre[2]:centre[2] + 3][blob] = value
    labels[39, 35, 23] = 9  # id 9 also in a far corner: still one CMB
    affine = np.diag([0.5, 0.6, 1.2, 1.0])
    affine[:3, 3] = [-10, 4, 7]
    inst = instances_from_label_map(labels)
    cmbs = cmbs_from_instances(inst, affine)
    ids = np.arange(1, inst.max() + 1)
    expected = np.array(ndimage.center_of_mass(inst > 0, inst, ids))
    assert [c.label for c in cmbs] == list(ids) and len(ids) == 4
    np.testing.assert_allclose([c.centroid_vox for c in cmbs], expected, atol=1e-9)
    np.testing.assert_allclose([c.centroid_mm for c in cmbs], vox_to_mm(expected, affine), atol=1e-9)
    assert [c.n_voxels for c in cmbs] == [int(n) for n in ndimage.sum_labels(inst > 0, inst, ids)]
    assert [c.n_voxels for c in cmbs] == [int((labels == v).sum()) for v in (2, 7, 9, 30)]
    assert cmbs_from_instances(np.zeros((5, 5, 5), np.int32), affine) == []


def test_nifti_points_layout(tmp_path: Path) -> None:
    root = tmp_path / "pts"
    image, _ = make_volume(0, [(10, 11, 12)])
    save(image, root / "images" / "a.nii")
    save(image, root / "images" / "b.nii.gz")
    (root / "annotations.csv").write_text("scan_id,i,j,k\na,10,11,12\n")
    ds = NiftiDataset(root)
    a, b = ds.load("a"), ds.load("b")
    assert a.instances is None and len(a.cmbs) == 1 and b.cmbs == []
    np.testing.assert_allclose(a.cmbs[0].centroid_vox, (10, 11, 12))


def test_non_canonical_orientation_keeps_world_positions(tmp_path: Path) -> None:
    """An LPS-stored scan is reoriented to RAS; its CMB keeps its world position."""
    lps = np.diag([-0.45, -0.45, 0.9, 1.0])
    lps[:3, 3] = [20, 20, 0]
    image, labels = make_volume(0, [(10, 30, 8)])
    save(image, tmp_path / "o" / "images" / "x.nii.gz", lps)
    save(labels, tmp_path / "o" / "labels" / "x.nii.gz", lps)
    scan = NiftiDataset(tmp_path / "o").load("x")
    assert np.all(np.diag(scan.affine)[:3] > 0)
    np.testing.assert_allclose(scan.cmbs[0].centroid_mm, vox_to_mm(np.array([10, 30, 8]), lps)[0], atol=1e-6)
    assert scan.image[tuple(np.round(scan.cmbs[0].centroid_vox).astype(int))] < 400


def test_valdo_layout(tmp_path: Path) -> None:
    for sub, centres in (("sub-101", [(15, 15, 10)]), ("sub-102", [])):
        image, labels = make_volume(1, centres)
        save(image, tmp_path / sub / f"{sub}_space-T2S_desc-masked_T2S.nii.gz")
        save(labels, tmp_path / sub / f"{sub}_space-T2S_CMB.nii.gz")
    ds = ValdoDataset(tmp_path)
    assert ds.scan_ids() == ["sub-101", "sub-102"]
    assert len(ds.load("sub-101").cmbs) == 1 and ds.load("sub-102").cmbs == []


def _write_v73(path: Path, cen: np.ndarray) -> None:
    """A MATLAB v7.3 file: HDF5 with a 512-byte header, arrays stored column-major."""
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("cen", data=np.asarray(cen, dtype=float).T)
        f.create_dataset("gt_num", data=np.array([[len(cen)]], dtype=float))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116, b" "))


@pytest.mark.parametrize("fmt", ["v5", "v73"])
def test_dou_layout_both_mat_formats_and_1_based(tmp_path: Path, fmt: str) -> None:
    lps = np.diag([-0.45, -0.45, 0.9, 1.0])
    image, _ = make_volume(2, [(10, 20, 6), (30, 8, 16)])
    save(image, tmp_path / "nii" / "01.nii", lps)
    cen = np.array([[11, 21, 7], [31, 9, 17]], dtype=float)  # MATLAB 1-based
    (tmp_path / "ground_truth").mkdir()
    mat = tmp_path / "ground_truth" / "01.mat"
    if fmt == "v5":
        savemat(mat, {"cen": cen, "gt_num": 2})
    else:
        _write_v73(mat, cen)
    scan = DouDataset(tmp_path).load("01")
    assert len(scan.cmbs) == 2
    expected_mm = vox_to_mm(cen - 1, lps)
    np.testing.assert_allclose([c.centroid_mm for c in scan.cmbs], expected_mm, atol=1e-6)
    for c in scan.cmbs:  # the canonical voxel is dark: orientation handled through the affine
        assert scan.image[tuple(np.round(c.centroid_vox).astype(int))] < 400


def test_dou_paper_subset_needs_its_scans(tmp_path: Path) -> None:
    image, _ = make_volume(0, [])
    save(image, tmp_path / "nii" / "01.nii")
    (tmp_path / "ground_truth").mkdir()
    savemat(tmp_path / "ground_truth" / "01.mat", {"cen": np.zeros((0, 3)), "gt_num": 0})
    assert DouDataset(tmp_path).load("01").cmbs == []
    with pytest.raises(Exception, match="subset=paper needs scans"):
        DouDataset(tmp_path, subset="paper")


def test_synthetic_layout_reads_back(tiny_synthetic: Path) -> None:
    ds = SyntheticDataset("tiny", 0, tiny_synthetic)
    assert len(ds) == 4
    scan = ds.load(ds.scan_ids()[0])
    assert scan.shape == (64, 64, 32) and scan.instances is not None


def test_summary_command(nifti_root: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "cmb.data.summary", "data=nifti", f"data.root={nifti_root}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "scans: 3 cmbs: 3"
    assert lines[0].startswith("s0") and "40x40x24" in lines[0] and "0.45x0.45x0.9" in lines[0] and lines[0].endswith("cmbs 2")


def test_summary_command_missing_root_is_clear(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "cmb.data.summary", "data=nifti", f"data.root={tmp_path}/nope"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2
    assert "nope: data root does not exist" in out.stderr and "Traceback" not in out.stderr


def test_synthetic_cli_writes_nifti_layout_and_refuses_overwrite(tmp_path: Path) -> None:
    from cmb.data.synthetic import main

    assert main([str(tmp_path / "ph"), "--preset", "tiny", "--n-scans", "2"]) == 0
    ds = NiftiDataset(tmp_path / "ph")
    assert ds.scan_ids() == ["synth000", "synth001"]
    assert nib.load(str(tmp_path / "ph" / "images" / "synth000.nii.gz")).shape == (64, 64, 32)
    assert main([str(tmp_path / "ph"), "--preset", "tiny"]) == 2  # never overwritten


def test_fractional_binary_label_map_keeps_its_cmbs_and_other_fractions_are_refused(tmp_path: Path) -> None:
    """A resampled binary mask (values 0.5) must not lose its CMBs to rounding; fractional ids above 1 are refused."""
    from cmb.data.readers import build_scan
    from cmb.errors import DataError

    image, labels = make_volume(0, [(12, 12, 8), (28, 26, 14)])
    img = save(image, tmp_path / "img.nii.gz")
    half = save((labels > 0).astype(np.float32) * 0.5, tmp_path / "half.nii.gz")
    scan = build_scan("s", img, label_path=half)
    assert len(scan.cmbs) == 2
    odd = save(np.where(labels > 0, labels + 0.5, 0).astype(np.float32), tmp_path / "odd.nii.gz")
    with pytest.raises(DataError, match=r"non-integer values \(e.g. 1.5\) among ids up to 2.5"):
        build_scan("s", img, label_path=odd)


def test_float_noise_in_a_binary_label_map_is_not_hundreds_of_cmbs(tmp_path: Path, caplog) -> None:
    """1e-6 left by a resampling tool in 1% of the voxels: before, each such voxel counted as a CMB (350 CMBs)."""
    from cmb.data.readers import build_scan

    image, labels = make_volume(0, [(12, 12, 8), (28, 26, 14)])
    noisy = (labels > 0).astype(np.float32)
    noisy[(np.random.default_rng(0).random(noisy.shape) < 0.01) & (noisy == 0)] = 1e-6
    with caplog.at_level("WARNING"):
        scan = build_scan("s", save(image, tmp_path / "img.nii.gz"), label_path=save(noisy, tmp_path / "noisy.nii.gz"))
    assert len(scan.cmbs) == 2
    assert all(a >= b for a, b in zip(sorted(c.n_voxels for c in scan.cmbs), sorted(int((labels == v).sum()) for v in (1, 2))))  # each CMB whole (noise beside it may join)
    assert any("component(s) that never reach 0.5 (interpolation noise) are not CMBs" in r.getMessage() for r in caplog.records)


def test_files_and_folders_written_through_a_temporary_name_get_a_plain_write_s_permissions(tmp_path: Path) -> None:
    """mkstemp/mkdtemp make 0600/0700 entries; renamed into place, they hid a shared run's report.md from the group."""
    import os

    from cmb.data.io import atomic_write_text, temp_file, temp_folder

    saved = os.umask(0o022)
    try:
        assert atomic_write_text("x", tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
        handle, name = temp_file(tmp_path, ".picture-", ".png")
        os.close(handle)
        assert os.stat(name).st_mode & 0o777 == 0o644
        assert temp_folder(tmp_path, ".entry-").stat().st_mode & 0o777 == 0o755
        os.umask(0o077)  # a user who keeps their files private still gets private files
        assert atomic_write_text("x", tmp_path / "private.md").stat().st_mode & 0o777 == 0o600
        assert temp_folder(tmp_path, ".private-").stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(saved)
