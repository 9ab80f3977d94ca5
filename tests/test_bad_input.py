"""Each bad input gives a clear DataError naming the file and the problem."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cmb.data.readers import DouDataset, NiftiDataset
from cmb.errors import ConfigError, DataError
from tests.conftest import AFFINE, make_volume, save


def _dataset_with(tmp_path: Path, image: np.ndarray, labels: np.ndarray | None = None, label_affine=AFFINE) -> Path:
    root = tmp_path / "bad"
    save(image, root / "images" / "x.nii.gz")
    save(labels if labels is not None else np.zeros(image.shape[:3], np.int16), root / "labels" / "x.nii.gz", label_affine)
    return root


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data root does not exist"):
        NiftiDataset(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="data.root is not set"):
        NiftiDataset(None)  # type: ignore[arg-type]


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="empty dataset"):
        NiftiDataset(tmp_path)


def test_file_that_is_not_nifti(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: not a NIfTI"):
        NiftiDataset(tmp_path)


def test_corrupt_nifti(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "x.nii.gz").write_bytes(b"garbage")
    (tmp_path / "labels" / "x.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"x\.nii\.gz: cannot read image"):
        NiftiDataset(tmp_path).load("x")


def test_corrupt_mat(tmp_path: Path) -> None:
    image, _ = make_volume(0, [])
    save(image, tmp_path / "nii" / "01.nii")
    (tmp_path / "ground_truth").mkdir()
    (tmp_path / "ground_truth" / "01.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match=r"01\.mat: cannot read"):
        DouDataset(tmp_path).load("01")


@pytest.mark.parametrize("shape,match", [((40, 40), "must be a 3D volume, got 2D"),
                                         ((40, 40, 24, 2), r"got 4D with shape \(40, 40, 24, 2\): 2 volumes \(several echoes"),
                                         ((40, 40, 24, 2, 1), r"got 4D with shape \(40, 40, 24, 2\): 2 volumes")])
def test_2d_and_4d_images(tmp_path: Path, shape, match) -> None:
    root = _dataset_with(tmp_path, np.ones(shape, np.float32), np.zeros((40, 40, 24), np.int16))
    with pytest.raises(DataError, match=match):
        NiftiDataset(root).load("x")


def test_a_volume_with_trailing_singleton_axes_is_read_as_3d(tmp_path: Path) -> None:
    image, labels = make_volume(0, [(12, 12, 8)])
    root = _dataset_with(tmp_path, image[..., None, None], labels)
    assert NiftiDataset(root).load("x").image.shape == image.shape


def test_nan_inf_and_all_zero(tmp_path: Path) -> None:
    image, _ = make_volume(0, [])
    image[3, 3, 3] = np.nan
    image[4, 4, 4] = np.inf
    with pytest.raises(DataError, match="2 NaN/Inf voxels"):
        NiftiDataset(_dataset_with(tmp_path / "a", image)).load("x")
    with pytest.raises(DataError, match="all zeros"):
        NiftiDataset(_dataset_with(tmp_path / "b", np.zeros((40, 40, 24), np.float32))).load("x")


def test_a_phase_image_is_refused_and_a_few_negative_voxels_are_not(tmp_path: Path) -> None:
    phase = np.random.default_rng(0).uniform(-np.pi, np.pi, (40, 40, 24)).astype(np.float32)
    with pytest.raises(DataError, match=r"x\.nii\.gz: 50% of the image's non-zero voxels are negative .*a phase image\?"):
        NiftiDataset(_dataset_with(tmp_path / "a", phase)).load("x")
    image, _ = make_volume(0, [])
    image.reshape(-1)[::50] = -3.0  # 2%: interpolation ringing, say
    assert NiftiDataset(_dataset_with(tmp_path / "b", image)).load("x").image.min() == -3.0


def test_a_complex_or_rgb_image_is_refused_not_cast(tmp_path: Path) -> None:
    image, labels = make_volume(0, [(20, 20, 12)])
    complex_image = image * np.exp(1j * 2.0)  # real part ~ -0.4 |z|: the cast kept only it (with a NumPy warning)
    with pytest.raises(DataError, match=r"x\.nii\.gz: image has complex voxel values \(complex\d+\): save the SWI or magnitude"):
        NiftiDataset(_dataset_with(tmp_path / "a", complex_image.astype(np.complex64))).load("x")
    rgb = np.zeros(image.shape, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]))
    for channel in "RGB":
        rgb[channel] = (image / 4).astype(np.uint8)
    with pytest.raises(DataError, match=r"x\.nii\.gz: image has voxel values of type .*an RGB"):
        NiftiDataset(_dataset_with(tmp_path / "b", rgb)).load("x")
    root = _dataset_with(tmp_path / "c", image, labels.astype(np.complex64))
    with pytest.raises(DataError, match=r"labels.x\.nii\.gz: label map has complex voxel values"):
        NiftiDataset(root).load("x")


def test_label_map_shape_or_affine_mismatch(tmp_path: Path) -> None:
    image, labels = make_volume(0, [(10, 10, 10)])
    with pytest.raises(DataError, match=r"labels/x\.nii\.gz: label map shape"):
        NiftiDataset(_dataset_with(tmp_path / "a", image, labels[:-1])).load("x")
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    with pytest.raises(DataError, match="label map affine differs"):
        NiftiDataset(_dataset_with(tmp_path / "b", image, labels, shifted)).load("x")


def test_a_brain_mask_given_as_the_label_map_is_refused(tmp_path: Path) -> None:
    image, _ = make_volume(0, [])
    brain = np.zeros(image.shape, np.int16)
    brain[5:35, 5:35, 3:21] = 1  # 30x30x18 voxels of 0.45x0.45x0.9 mm: ~2950 mm^3, an 18 mm ball, passes
    NiftiDataset(_dataset_with(tmp_path / "a", image, brain)).load("x")
    big = AFFINE.copy()
    big[:3, :3] *= 2  # the same voxels at 0.9x0.9x1.8 mm: ~23600 mm^3, a 36 mm ball
    save(image, tmp_path / "b" / "bad" / "images" / "x.nii.gz", big)
    save(brain, tmp_path / "b" / "bad" / "labels" / "x.nii.gz", big)
    with pytest.raises(DataError, match=r"labels/x\.nii\.gz: the labelled CMB centred at .* mm RAS covers \d+ mm\^3 \(a ball 36 mm "
                                        r"across\); microbleeds are 2-10 mm .*brain mask or tissue map"):
        NiftiDataset(tmp_path / "b" / "bad").load("x")


def test_centroid_outside_volume(tmp_path: Path) -> None:
    image, _ = make_volume(0, [])
    save(image, tmp_path / "images" / "x.nii.gz")
    (tmp_path / "annotations.csv").write_text("scan_id,i,j,k\nx,10,10,99\n")
    with pytest.raises(DataError, match=r"annotations\.csv: centroid .* outside the image"):
        NiftiDataset(tmp_path).load("x")


def test_annotations_for_unknown_scan(tmp_path: Path) -> None:
    image, _ = make_volume(0, [])
    save(image, tmp_path / "images" / "x.nii.gz")
    (tmp_path / "annotations.csv").write_text("scan_id,i,j,k\ny,1,1,1\n")
    with pytest.raises(DataError, match="'y' has no image"):
        NiftiDataset(tmp_path)


@pytest.mark.parametrize("rows, match", [
    ("x,nan,11,12", r"line 2: i,j,k must be finite numbers"),
    ("x,10,11,12\nx,10,11,12", r"line 3 repeats line 2 \(x at voxel \[10.0, 11.0, 12.0\]\)"),
    ("x.nii.gz,10,11,12", r"line 2: scan_id 'x.nii.gz' has no image in images/ \(give the scan id 'x'"),
])
def test_annotation_rows_that_cannot_be_cmbs(tmp_path: Path, rows: str, match: str) -> None:
    image, _ = make_volume(0, [])
    save(image, tmp_path / "images" / "x.nii.gz")
    (tmp_path / "annotations.csv").write_text(f"scan_id,i,j,k\n{rows}\n")
    with pytest.raises(DataError, match=r"annotations\.csv: " + match):
        NiftiDataset(tmp_path).load("x")


@pytest.mark.parametrize("content, match", [
    (b"\x1f\x8b\x08\x00 gzipped", r"annotations are not UTF-8 text \(invalid start byte at byte 1\): save them as CSV"),
    ("scan_id,i,j,k\nx,10,11,12 # J\xf6rg\n".encode("latin-1"), r"annotations are not UTF-8 text"),  # a Latin-1 export
    (b"scan_id,i,j,k\nx,10,11,12" + b"7" * 200_000 + b"\n", r"annotations are not a readable CSV file \(field larger than field limit"),
])
def test_an_annotations_file_that_is_not_csv_text_is_refused(tmp_path: Path, content: bytes, match: str) -> None:
    """Before: a UnicodeDecodeError or csv.Error traceback."""
    image, _ = make_volume(0, [])
    save(image, tmp_path / "images" / "x.nii.gz")
    (tmp_path / "annotations.csv").write_bytes(content)
    with pytest.raises(DataError, match=r"annotations\.csv: " + match):
        NiftiDataset(tmp_path)


def test_one_cmb_marked_twice_is_refused_and_two_close_cmbs_are_not(tmp_path: Path) -> None:
    """Centres 0.9 mm apart (one slice) are one CMB marked twice; 2.7 mm apart are two CMBs."""
    image, _ = make_volume(0, [])
    save(image, tmp_path / "images" / "x.nii.gz")
    (tmp_path / "annotations.csv").write_text("scan_id,i,j,k\nx,10,11,12\nx,30,30,8\nx,10,11,13\n")
    with pytest.raises(DataError, match=r"annotations\.csv: centroids \[10.0, 11.0, 12.0\] and \[10.0, 11.0, 13.0\] \(voxels\) "
                                        r"are 0.90 mm apart: one CMB marked twice"):
        NiftiDataset(tmp_path).load("x")
    (tmp_path / "annotations.csv").write_text("scan_id,i,j,k\nx,10,11,12\nx,30,30,8\nx,10,11,15\n")
    assert len(NiftiDataset(tmp_path).load("x").cmbs) == 3



def test_the_marked_twice_check_needs_memory_linear_in_the_number_of_centres() -> None:
    """20,000 centres on one scan (a point list written by a tool, not a reader) are checked without an N x N matrix,
    which would need ~9.6 GB; the closest pair is still found and named."""
    import tracemalloc

    from cmb.data.readers import cmbs_from_points

    points = np.stack(np.meshgrid(*[np.arange(0, 500, 18.0)] * 3, indexing="ij"), -1).reshape(-1, 3)[:20000]
    points = np.vstack([points, points[123] + [0.0, 0.0, 0.5]])
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"are 0.50 mm apart: one CMB marked twice"):
            cmbs_from_points(points, np.eye(4), np.eye(4), (512, 512, 512), Path("points.csv"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200e6

def test_a_spreadsheet_saved_annotations_file_is_read(tmp_path: Path) -> None:
    """A byte-order mark (UTF-8 CSV from a spreadsheet) and spaces after the commas are not errors."""
    image, _ = make_volume(0, [])
    save(image, tmp_path / "images" / "x.nii.gz")
    (tmp_path / "annotations.csv").write_text("\ufeffscan_id, i, j, k\r\nx, 10, 11, 12\r\n", encoding="utf-8")
    np.testing.assert_allclose(NiftiDataset(tmp_path).load("x").cmbs[0].centroid_vox, (10, 11, 12))


def test_a_volume_too_large_to_hold_is_refused_from_its_header(tmp_path: Path) -> None:
    """A header declaring 2048x2048x128 voxels (what a few MB of gzipped zeros can declare) is refused before any
    voxel is read, naming the file and the size."""
    img = nib.Nifti1Image(np.ones((20, 20, 16), np.float32), AFFINE)
    img.header.set_data_shape((2048, 2048, 128))
    save(np.ones((40, 40, 20), np.float32), tmp_path / "bad" / "labels" / "x.nii.gz")
    (tmp_path / "bad" / "images").mkdir(parents=True)
    (tmp_path / "bad" / "images" / "x.nii").write_bytes(img.header.binaryblock + bytes(4 + 1000))
    with pytest.raises(DataError, match=r"images/x\.nii: image has 536,870,912 voxels \(shape \(2048, 2048, 128\)\), more than "
                                        r"cmb reads .* crop it to the head or resample it"):
        NiftiDataset(tmp_path / "bad").load("x")


def test_a_label_map_given_as_the_image_is_refused_and_an_8_bit_image_is_not(tmp_path: Path) -> None:
    image, labels = make_volume(0, [(12, 12, 8), (28, 26, 14)])
    root = _dataset_with(tmp_path, labels.astype(np.float32), labels)
    with pytest.raises(DataError, match=r"images/x\.nii\.gz: image has only 2 distinct non-zero value\(s\) \(1, 2\): a label map or "
                                        r"brain mask, not an SWI"):
        NiftiDataset(root).load("x")
    eight_bit = np.round(255 * image / image.max()).astype(np.uint8)
    assert len(NiftiDataset(_dataset_with(tmp_path / "ok", eight_bit, labels)).load("x").cmbs) == 2


def test_data_root_pointed_at_the_images_folder_says_which_folder_to_give(tmp_path: Path) -> None:
    image, labels = make_volume(0, [(12, 12, 8)])
    root = _dataset_with(tmp_path, image, labels)
    with pytest.raises(DataError, match=r"images/images: missing the images/ folder of the nifti layout; .*images itself holds NIfTI "
                                        r"files: give the folder that holds images/ and labels/"):
        NiftiDataset(root / "images")
    with pytest.raises(DataError, match=r"missing the images/ folder of the nifti layout$"):
        NiftiDataset(tmp_path)  # a folder without NIfTI files gets no hint


def test_a_label_map_or_mask_without_an_image_or_given_twice_is_refused(tmp_path: Path) -> None:
    """Before: an image missing from images/ left its label map unread, and the run trained on one scan fewer."""
    image, labels = make_volume(0, [(12, 12, 8)])
    root = _dataset_with(tmp_path, image, labels)
    (root / "labels" / "notes.txt").write_text("rater 2")  # not NIfTI: not looked at
    assert NiftiDataset(root).scan_ids() == ["x"]
    save(labels, root / "labels" / "y.nii.gz")
    with pytest.raises(DataError, match=r"labels: 1 label map file\(s\) without an image in images/: y\.nii\.gz; add their images"):
        NiftiDataset(root)
    (root / "labels" / "y.nii.gz").unlink()
    save(labels, root / "labels" / "x.nii")
    with pytest.raises(DataError, match=r"labels: two label map files for one scan: x\.nii and x\.nii\.gz; keep one"):
        NiftiDataset(root)
    (root / "labels" / "x.nii").unlink()
    save((image > 0).astype(np.uint8), root / "masks" / "z.nii.gz")
    with pytest.raises(DataError, match=r"masks: 1 brain mask file\(s\) without an image in images/: z\.nii\.gz"):
        NiftiDataset(root)


def test_image_smaller_than_window(tmp_path: Path) -> None:
    root = _dataset_with(tmp_path, np.ones((40, 40, 10), np.float32), np.zeros((40, 40, 10), np.int16))
    with pytest.raises(DataError, match=r"smaller than one \(20, 20, 16\) window"):
        NiftiDataset(root).load("x")


def test_missing_label_file(tmp_path: Path) -> None:
    image, _ = make_volume(0, [])
    save(image, tmp_path / "images" / "x.nii.gz")
    save(image, tmp_path / "images" / "y.nii.gz")
    save(np.zeros(image.shape, np.int16), tmp_path / "labels" / "x.nii.gz")
    with pytest.raises(DataError, match=r"no label map for scan\(s\) \['y'\]"):
        NiftiDataset(tmp_path)


def _raw_header(sform: np.ndarray | None, pixdim: tuple[float, float, float]) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape((30, 30, 20))
    header.set_data_dtype(np.float32)
    header.set_qform(None, code=0)
    header.set_sform(sform, code=1 if sform is not None else 0)
    header["pixdim"][1:4] = pixdim
    return header


def test_singular_affine_and_unknown_voxel_size_are_refused(tmp_path: Path) -> None:
    from cmb.data.io import load_volume

    data = (800 + np.random.default_rng(0).standard_normal((30, 30, 20))).astype(np.float32)
    singular = np.diag([0.0, 1.0, 1.0, 1.0])
    path = tmp_path / "singular.nii.gz"
    nib.save(nib.Nifti1Image(data, None, header=_raw_header(singular, (1, 1, 1))), str(path))
    with pytest.raises(DataError, match="singular.nii.gz: image affine is singular"):
        load_volume(path)
    path = tmp_path / "pixdim0.nii"
    nib.save(nib.Nifti1Image(data, None, header=_raw_header(None, (1, 1, 1))), str(path))
    with open(path, "r+b") as handle:  # nibabel refuses to write pixdim 0 itself: patch pixdim[1:4] in the stored header
        handle.seek(80)
        handle.write(np.zeros(3, "<f4").tobytes())
    with pytest.raises(DataError, match=r"pixdim0.nii: image has no sform/qform and voxel size pixdim \[0.0, 0.0, 0.0\]"):
        load_volume(path)
    path = tmp_path / "pixdim_only.nii.gz"  # no sform/qform but a real voxel size: read, with a warning
    nib.save(nib.Nifti1Image(data, None, header=_raw_header(None, (0.5, 0.5, 1.0))), str(path))
    _, affine = load_volume(path)
    np.testing.assert_allclose(np.abs(np.diag(affine))[:3], [0.5, 0.5, 1.0])


def test_header_units_are_converted_to_mm_and_implausible_voxel_sizes_refused(tmp_path: Path, caplog) -> None:
    from cmb.data.io import load_volume

    # nibabel gives the affine in the header's spatial units: a scan saved in meters read as mm would have
    # 0.5 um voxels, and every distance (match radius, working grid, CMB size) would be off by 1000
    image, labels = make_volume(0, [(20, 20, 10)])
    for unit, scale in (("meter", 1e-3), ("micron", 1e3)):
        root = tmp_path / unit
        for sub, data in (("images", image), ("labels", labels)):
            img = nib.Nifti1Image(data, np.diag([0.5 * scale, 0.5 * scale, 1.0 * scale, 1.0]))
            img.header.set_xyzt_units(unit)
            (root / sub).mkdir(parents=True)
            nib.save(img, root / sub / "x.nii.gz")
        with caplog.at_level("WARNING"):
            scan = NiftiDataset(root).load("x")
        np.testing.assert_allclose(scan.spacing_mm, (0.5, 0.5, 1.0), rtol=1e-5)
        assert len(scan.cmbs) == 1 and f"the header gives positions in {unit}s; converted to mm" in caplog.text
    bad_unit = nib.Nifti1Image(image, np.diag([0.5, 0.5, 1.0, 1.0]))
    bad_unit.header["xyzt_units"] = 7  # no NIfTI unit: before, a KeyError from nibabel
    nib.save(bad_unit, tmp_path / "unit7.nii.gz")
    with pytest.raises(DataError, match=r"unit7.nii.gz: image header gives a spatial unit NIfTI does not define \(code 7"):
        load_volume(tmp_path / "unit7.nii.gz")
    # voxel sizes no MRI head scan has (a header in cm read as mm, or pixdim in the wrong field): refused, naming the file
    for name, sizes in (("coarse", (12.0, 12.0, 12.0)), ("fine", (0.01, 0.01, 0.02))):
        root = _dataset_with(tmp_path / name, image, labels)
        for sub in ("images", "labels"):
            save(nib.load(root / sub / "x.nii.gz").get_fdata().astype(np.float32), root / sub / "x.nii.gz", np.diag([*sizes, 1.0]))
        with pytest.raises(DataError, match=rf"{name}/bad/images/x.nii.gz: image voxel size .* is not that of an MRI head scan"):
            NiftiDataset(root).load("x")


def test_infer_inputs_skip_cmbs_own_outputs(tmp_path: Path) -> None:
    from cmb.inference.predictor import list_inputs

    image, _ = make_volume(0, [])
    save(image, tmp_path / "scan.nii.gz")
    save(image, tmp_path / "scan_stage1_prob.nii.gz")  # an earlier run wrote its outputs into the input folder
    assert [p.name for p in list_inputs(tmp_path)] == ["scan.nii.gz"]


def test_infer_inputs_skip_hidden_files_as_training_does(tmp_path: Path) -> None:
    """A folder copied from a Mac holds `._scan.nii.gz` AppleDouble files (metadata, not images): training's
    reader skips hidden files, so infer.py does too, instead of failing on them as unreadable scans."""
    from cmb.data.readers import _nifti_files
    from cmb.inference.predictor import list_inputs

    image, _ = make_volume(0, [])
    save(image, tmp_path / "scan.nii.gz")
    (tmp_path / "._scan.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    assert [p.name for p in list_inputs(tmp_path)] == ["scan.nii.gz"] == [p.name for p in _nifti_files(tmp_path).values()]
    assert list_inputs(tmp_path / "._scan.nii.gz") == [tmp_path / "._scan.nii.gz"]  # named on its own: read (and refused there)


def test_a_broken_link_is_named_not_skipped(tmp_path: Path) -> None:
    """A scan moved or deleted after a link to it was made: before, infer.py skipped it without a word (its folder
    listing kept files only) and training said "no label map for scan(s) ['y']"."""
    from cmb.data.io import load_volume
    from cmb.inference.predictor import list_inputs

    image, _ = make_volume(0, [])
    save(image, tmp_path / "images" / "x.nii.gz")
    save(np.zeros(image.shape, np.int16), tmp_path / "labels" / "x.nii.gz")
    (tmp_path / "images" / "y.nii.gz").symlink_to(tmp_path / "moved" / "y.nii.gz")
    with pytest.raises(DataError, match=r"images/y.nii.gz: a broken link \(to .*moved/y.nii.gz\) in the images folder"):
        NiftiDataset(tmp_path)
    assert [p.name for p in list_inputs(tmp_path / "images")] == ["x.nii.gz", "y.nii.gz"]  # infer.py: one bad scan of the batch
    with pytest.raises(DataError, match=r"y.nii.gz: image is a broken link \(to .*moved/y.nii.gz\)"):
        load_volume(tmp_path / "images" / "y.nii.gz")


def test_summary_lists_every_bad_scan_and_keeps_the_good_ones(nifti_root: Path) -> None:
    from cmb.data.summary import summarize

    save(np.zeros((40, 40, 24), np.float32), nifti_root / "images" / "s9.nii.gz")
    save(np.zeros((40, 40, 24), np.int16), nifti_root / "labels" / "s9.nii.gz")
    lines, errors = summarize(NiftiDataset(nifti_root))
    assert lines[-1] == "scans: 3 cmbs: 3"
    assert list(errors) == ["s9"] and "s9.nii.gz: image is all zeros" in errors["s9"]


def test_a_failure_wrapped_by_monai_is_reported_as_the_user_error_inside() -> None:
    from monai.transforms import Compose

    from cmb.errors import describe_scan_failure

    def fails(data):
        raise DataError("scan.nii.gz", "brain mask is empty")

    with pytest.raises(RuntimeError) as wrapped:
        Compose([fails])({"image": 1})
    assert describe_scan_failure(wrapped.value, "scan.nii.gz") == "scan.nii.gz: brain mask is empty"
    assert describe_scan_failure(ValueError("bad\nmore"), "x.nii") == "x.nii: unexpected ValueError: bad"
