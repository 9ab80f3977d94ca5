"""DICOM series input: geometry and slice UIDs of series written by SimpleITK, and bad series refused."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cmb.data.dicom import is_dicom_folder, keep_locale, read_dicom_series
from cmb.errors import DataError

SERIES = "1.2.826.0.1.3680043.2.1125.7"


def write_series(volume: np.ndarray, folder: Path, spacing=(0.5, 0.6, 1.2), origin=(10.0, -20.0, 30.0),
                 direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), series_uid: str = SERIES, skip: tuple[int, ...] = (),
                 shift_mm: dict[int, float] | None = None, tilt: tuple[int, ...] = ()) -> None:
    """`volume` (I, J, K) int16 as one DICOM file per slice k (LPS `origin`, `direction` row-major, as SimpleITK).

    skip: slices left out; shift_mm: slice k's position moved along the slice axis; tilt: slices given
    another orientation (as if from another series)."""
    with keep_locale():  # SimpleITK's DICOM writer sets the C locale of the whole process
        _write_series(volume, folder, spacing, origin, direction, series_uid, skip, shift_mm, tilt)


def _write_series(volume, folder, spacing, origin, direction, series_uid, skip, shift_mm, tilt) -> None:  # noqa: ANN001
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.transpose(volume, (2, 1, 0)).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection([float(v) for v in direction])
    d = [float(v) for v in direction]
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.shape[2]):
        if k in skip:
            continue
        sl = image[:, :, k]
        tags = {"0020|000e": series_uid, "0020|000d": "1.2.3.4", "0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
                "0020|0037": "1\\0\\0\\0\\0.8\\0.6" if k in tilt else orientation, "0008|0018": f"{series_uid}.{k + 1}",
                "0020|0013": str(k + 1)}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k)))
        if shift_mm and k in shift_mm:
            position = position + shift_mm[k] * np.array(d[2::3])
        sl.SetMetaData("0020|0032", "\\".join(repr(float(p)) for p in position))
        writer.SetFileName(str(folder / f"IM{(k * 7919) % 1000:04d}_{k}_{series_uid[-3:]}.dcm"))  # names not in slice order
        writer.Execute(sl)


def _volume(shape=(40, 36, 24)) -> np.ndarray:
    return np.random.default_rng(0).integers(1, 1000, shape).astype(np.int16)


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (1, 0, 0, 0, -1, 0, 0, 0, -1), (0, 0, 1, 1, 0, 0, 0, 1, 0)])
def test_a_series_reads_as_its_voxels_on_a_ras_affine_with_one_uid_per_slice(tmp_path: Path, direction) -> None:
    volume = _volume()
    write_series(volume, tmp_path / "s", direction=direction)
    assert is_dicom_folder(tmp_path / "s") and not is_dicom_folder(tmp_path)
    vol = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(vol.data, volume)  # slice k of the series is k of the grid, whatever the file names
    lps = np.eye(4)
    lps[:3, :3] = np.array(direction, float).reshape(3, 3) * [0.5, 0.6, 1.2]
    lps[:3, 3] = [10.0, -20.0, 30.0]
    np.testing.assert_allclose(vol.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-6)  # RAS = LPS with x, y negated
    assert vol.slice_uids == [f"{SERIES}.{k + 1}" for k in range(volume.shape[2])] and vol.series_uid == SERIES


def test_the_largest_of_several_series_is_read_and_named(tmp_path: Path, caplog) -> None:
    write_series(_volume((40, 36, 24)), tmp_path / "s", series_uid=SERIES)
    write_series(_volume((40, 36, 18)), tmp_path / "s", series_uid=SERIES + "9")
    with caplog.at_level(logging.INFO):
        vol = read_dicom_series(tmp_path / "s")
    assert vol.series_uid == SERIES and vol.data.shape == (40, 36, 24)
    assert f"reading {SERIES} (24 files), the largest; ignoring {SERIES}9 (18 files)" in caplog.text


@pytest.mark.parametrize("damage, message", [
    ({"skip": (10,)}, "missing slices: a gap of 2.400 mm"),
    ({"shift_mm": {12: 0.4}}, "non-uniform slice spacing"),
    ({"tilt": (5,)}, "mixed series"),
    ({"shift_mm": {12: -1.2}}, "two slices at one position"),
])
def test_a_series_that_is_not_one_regular_volume_is_one_line_naming_the_folder(tmp_path: Path, damage: dict, message: str) -> None:
    write_series(_volume(), tmp_path / "bad", **damage)
    with pytest.raises(DataError, match=message) as err:
        read_dicom_series(tmp_path / "bad")
    assert str(tmp_path / "bad") in str(err.value) and "\n" not in str(err.value)


def test_a_series_too_large_to_hold_is_refused_before_its_pixels_are_read(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import cmb.data.io

    write_series(_volume(), tmp_path / "s")
    monkeypatch.setattr(cmb.data.io, "MAX_VOXELS", 40 * 36 * 24 - 1)
    with pytest.raises(DataError, match=r"s: DICOM series has 34,560 voxels \(shape \(40, 36, 24\)\), more than cmb reads"):
        read_dicom_series(tmp_path / "s")
    monkeypatch.setattr(cmb.data.io, "MAX_VOXELS", 40 * 36 * 24)
    assert read_dicom_series(tmp_path / "s").data.shape == (40, 36, 24)


def test_a_folder_without_dicom_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no DICOM series"):
        read_dicom_series(tmp_path)


def test_infer_inputs_take_a_series_folder_or_a_folder_of_series_folders(tmp_path: Path) -> None:
    from cmb.inference.predictor import list_inputs

    write_series(_volume(), tmp_path / "patients" / "b_swi", series_uid=SERIES)
    write_series(_volume(), tmp_path / "patients" / "a_swi", series_uid=SERIES + "1")
    (tmp_path / "patients" / "notes").mkdir()
    assert list_inputs(tmp_path / "patients" / "a_swi") == [tmp_path / "patients" / "a_swi"]
    assert list_inputs(tmp_path / "patients") == [tmp_path / "patients" / "a_swi", tmp_path / "patients" / "b_swi"]
    with pytest.raises(DataError, match="no .nii or .nii.gz files and no DICOM series"):
        list_inputs(tmp_path / "patients" / "notes")
    # NIfTI files and series side by side are all scans (before, the series were skipped without a word)
    import nibabel as nib

    nib.save(nib.Nifti1Image(_volume().astype(np.float32), np.eye(4)), str(tmp_path / "patients" / "c_swi.nii.gz"))
    assert list_inputs(tmp_path / "patients") == [tmp_path / "patients" / n for n in ("a_swi", "b_swi", "c_swi.nii.gz")]
    nib.save(nib.Nifti1Image(_volume().astype(np.float32), np.eye(4)), str(tmp_path / "patients" / "a_swi.nii.gz"))
    with pytest.raises(DataError, match=r"patients: scan id 'a_swi' appears twice \(a_swi, a_swi.nii.gz\); rename one"):
        list_inputs(tmp_path / "patients")


def test_reading_dicom_leaves_the_process_locale_and_utf8_text_files_alone(tmp_path: Path) -> None:
    """GDCM sets the C locale; before the fix, report.md's "…" failed to write after a DICOM input."""
    import locale

    write_series(_volume(), tmp_path / "s")
    before = locale.getpreferredencoding(False)
    assert is_dicom_folder(tmp_path / "s")
    read_dicom_series(tmp_path / "s")
    assert locale.getpreferredencoding(False) == before
    from cmb.data.io import atomic_write_text

    assert atomic_write_text("1/8 … 8 FP/scan", tmp_path / "r.md").read_text(encoding="utf-8") == "1/8 … 8 FP/scan"


def test_a_multi_frame_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """One DICOM file holding every slice as frames (as enhanced MR does) is named as such, not as a single slice."""
    folder = tmp_path / "multiframe"
    folder.mkdir()
    image = sitk.GetImageFromArray(_volume((16, 16, 5)).transpose(2, 1, 0))
    for tag, value in {"0020|000e": SERIES, "0020|000d": "1.2.3.4", "0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4"}.items():
        image.SetMetaData(tag, value)
    with keep_locale():
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / "volume.dcm"))
        writer.Execute(image)
    with pytest.raises(DataError, match=r"volume.dcm is a multi-frame DICOM file \(5 frames in one file.*convert it to NIfTI"):
        read_dicom_series(folder)


def test_a_series_folder_in_images_trains_like_the_same_scan_as_nifti_with_a_label_map_in_another_axis_order(tmp_path: Path) -> None:
    """Training data: images/<id>/ may be a DICOM series; its label map (NIfTI) need only lie on the same voxels."""
    from cmb.data.io import to_canonical
    from cmb.data.readers import NiftiDataset
    from tests.conftest import make_volume, save

    image, labels = make_volume(0, [(10, 12, 8), (28, 25, 15)])
    write_series(np.rint(image).astype(np.int16), tmp_path / "dicom" / "images" / "x", direction=(1, 0, 0, 0, -1, 0, 0, 0, -1))
    series = read_dicom_series(tmp_path / "dicom" / "images" / "x")
    # the label map as a viewer or dcm2niix might save it: RAS axis order, so not the series' own voxel order
    canon_labels, canon_affine, _ = to_canonical(labels, series.affine)
    assert not np.allclose(canon_affine, series.affine)
    save(canon_labels.astype(np.int16), tmp_path / "dicom" / "labels" / "x.nii.gz", canon_affine)
    save(series.data, tmp_path / "nifti" / "images" / "x.nii.gz", series.affine)
    save(labels.astype(np.int16), tmp_path / "nifti" / "labels" / "x.nii.gz", series.affine)

    from_dicom, from_nifti = (NiftiDataset(tmp_path / name).load("x") for name in ("dicom", "nifti"))
    assert NiftiDataset(tmp_path / "dicom").scan_ids() == ["x"] and len(from_dicom.cmbs) == 2
    np.testing.assert_array_equal(from_dicom.image, from_nifti.image)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-6)
    np.testing.assert_array_equal(from_dicom.instances, from_nifti.instances)
    np.testing.assert_allclose([c.centroid_vox for c in from_dicom.cmbs], [c.centroid_vox for c in from_nifti.cmbs])

    shifted = canon_affine.copy()
    shifted[0, 3] += 2.0  # two mm off: not the series' voxels
    save(canon_labels.astype(np.int16), tmp_path / "dicom" / "labels" / "x.nii.gz", shifted)
    with pytest.raises(DataError, match=r"labels/x\.nii\.gz: label map affine differs from its image's \(x\): not the same voxels"):
        NiftiDataset(tmp_path / "dicom").load("x")


def test_a_training_folder_that_is_not_a_series_and_points_on_a_series_are_refused(tmp_path: Path) -> None:
    from cmb.data.readers import NiftiDataset

    write_series(_volume(), tmp_path / "images" / "x")
    (tmp_path / "images" / "notes").mkdir()
    (tmp_path / "annotations.csv").write_text("scan_id,i,j,k\nx,10,10,10\n")
    with pytest.raises(DataError, match=r"images/notes: a folder in the images folder without a DICOM series"):
        NiftiDataset(tmp_path)
    (tmp_path / "images" / "notes").rmdir()
    with pytest.raises(DataError, match=r"annotations\.csv: scan 'x' is a DICOM series: give its CMBs as a label map labels/x\.nii\.gz"):
        NiftiDataset(tmp_path)
    (tmp_path / "annotations.csv").write_text("scan_id,i,j,k\n")  # a series without CMBs needs no coordinates
    assert NiftiDataset(tmp_path).load("x").cmbs == []
