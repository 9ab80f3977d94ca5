"""Resolution-aware processing (cmb.data.resample): scans on the run's working voxel size, maps back."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cmb.data.io import mm_to_vox, vox_to_mm
from cmb.data.phantom import PRESETS, PhantomGenerator
from cmb.data.readers import build_scan
from cmb.data.resample import resample_to_grid, to_native_grid, working_grid, working_scan

REPO = Path(__file__).resolve().parents[1]


def _tiny_scan(tmp_path: Path):
    phantom = PhantomGenerator(PRESETS["tiny"], seed=3).generate(0)
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), str(tmp_path / "s.nii.gz"))
    nib.save(nib.Nifti1Image(phantom.instances.astype(np.int16), phantom.affine), str(tmp_path / "l.nii.gz"))
    return build_scan("s", tmp_path / "s.nii.gz", label_path=tmp_path / "l.nii.gz")


def test_the_working_grid_keeps_the_field_of_view_and_every_cmb_where_it_is(tmp_path: Path) -> None:
    scan = _tiny_scan(tmp_path)
    assert scan.spacing_mm == pytest.approx((0.45, 0.45, 0.9)) and len(scan.cmbs) >= 1
    coarse = working_scan(scan, (0.9, 0.9, 1.8))
    assert coarse.spacing_mm == pytest.approx((0.9, 0.9, 1.8)) and coarse.shape == (32, 32, 16)
    # same outer corners: the first and last voxels' outer faces are where they were
    for grid in (scan, coarse):
        corner = vox_to_mm(np.array([[-0.5, -0.5, -0.5], np.array(grid.shape) - 0.5]), grid.affine)
        np.testing.assert_allclose(corner, vox_to_mm(np.array([[-0.5, -0.5, -0.5], np.array(scan.shape) - 0.5]), scan.affine), atol=1e-6)
    assert [c.centroid_mm for c in coarse.cmbs] == [c.centroid_mm for c in scan.cmbs]
    np.testing.assert_allclose(vox_to_mm(coarse.centroids_vox, coarse.affine), vox_to_mm(scan.centroids_vox, scan.affine), atol=1e-6)
    for c in coarse.cmbs:  # every CMB keeps a label component, near its centroid, of about its volume in mm3
        voxels = np.argwhere(coarse.instances == c.label)
        assert len(voxels) >= 1 and np.min(np.linalg.norm((voxels - c.centroid_vox) * coarse.spacing_mm, axis=1)) < 1.0
    volumes = [(c.n_voxels * np.prod(scan.spacing_mm), k.n_voxels * np.prod(coarse.spacing_mm)) for c, k in zip(scan.cmbs, coarse.cmbs)]
    assert sum(v for _, v in volumes) == pytest.approx(sum(v for v, _ in volumes), rel=0.5)
    assert coarse.native_shape == scan.shape and np.allclose(coarse.native_affine, scan.affine)
    assert working_scan(scan, (0.45, 0.45, 0.9)) is scan and working_scan(scan, None) is scan


def test_a_map_goes_back_to_the_native_grid() -> None:
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    affine[:3, 3] = (-10.0, 4.0, 2.0)
    i, j, k = np.meshgrid(*(np.arange(n, dtype=float) for n in (40, 40, 20)), indexing="ij")
    world = vox_to_mm(np.stack([i, j, k], -1).reshape(-1, 3), affine).reshape(40, 40, 20, 3)
    smooth = np.exp(-((world - world.mean((0, 1, 2))) ** 2).sum(-1) / 40.0).astype(np.float32)  # a smooth blob, in mm
    work_affine, work_shape = working_grid(affine, smooth.shape, (1.0, 1.0, 1.0))
    on_work = resample_to_grid(smooth, affine, work_affine, work_shape, order=1)
    back = resample_to_grid(on_work, work_affine, affine, smooth.shape, order=1)
    assert np.abs(back - smooth)[2:-2, 2:-2, 2:-2].max() < 0.03
    peak = np.unravel_index(np.argmax(on_work), on_work.shape)
    np.testing.assert_allclose(vox_to_mm(np.array([peak]), work_affine), vox_to_mm(np.array([np.unravel_index(np.argmax(smooth), smooth.shape)]),
                                                                                  affine), atol=1.0)


@pytest.mark.slow
def test_a_run_at_one_voxel_size_scores_scans_at_another_as_its_out_of_fold_files_say(tmp_path: Path, tiny_synthetic: Path) -> None:
    """Training, out-of-fold detection and infer.py resample to the run's working voxel size by one code path:
    infer.py with fold 0's members on a scan fold 0 held out writes its out-of-fold candidates (in mm), and a
    scan stored at another voxel size gets its outputs on its own grid."""
    from hydra import compose, initialize_config_dir

    from cmb.inference.predictor import Predictor
    from cmb.protocol.run import Protocol

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=smoke", "data.preset=tiny", "inference.unet.tile=[32,32,32]",
                                                      f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", "name=coarse",
                                                      "preprocess.spacing=[0.9,0.9,1.8]", "unet.refine.steps=0", "unet.health=null"])
    protocol = Protocol(cfg)
    protocol.run_fold(0)
    heldout = protocol.fold_split(0)["test"][0]
    truth = json.loads(protocol.layout.scan_file(0, "truth", heldout).read_text())
    native = protocol.dataset.load(heldout)
    work = working_scan(native, (0.9, 0.9, 1.8))
    np.testing.assert_allclose(truth["centroids_vox"], mm_to_vox(np.array([c.centroid_mm for c in native.cmbs]), work.affine), atol=1e-3)
    import csv

    with open(protocol.layout.scan_file(0, "cnn_scores", heldout), newline="") as handle:
        oof = sorted(csv.DictReader(handle), key=lambda r: -float(r["score"]))
    predictor = Predictor(protocol.layout.root, fold=0, threshold=0.0, cache_dir=tiny_synthetic, progress=False)
    det = predictor.predict_scan(native.path, heldout)
    assert len(det.scores) == len(oof)
    np.testing.assert_allclose(np.sort(det.scores)[::-1], [float(r["score"]) for r in oof], rtol=0, atol=0)
    oof_mm = np.array([[float(r[a]) for a in ("x_mm", "y_mm", "z_mm")] for r in oof]).reshape(-1, 3)
    assert sorted(map(tuple, np.round(det.mm, 3))) == sorted(map(tuple, np.round(oof_mm, 3)))
    assert det.prob_map.shape == native.source_shape  # the map on the input's own grid

    # the same scan stored at a finer voxel size (0.3 mm in-plane): outputs on its grid, detections in the same mm
    fine_affine, fine_shape = working_grid(native.affine, native.shape, (0.3, 0.3, 0.9))
    fine = resample_to_grid(np.asarray(native.image), native.affine, fine_affine, fine_shape, order=1)
    nib.save(nib.Nifti1Image(fine.astype(np.float32), fine_affine), str(tmp_path / "fine.nii.gz"))
    det_fine = predictor.predict_scan(tmp_path / "fine.nii.gz")
    assert det_fine.prob_map.shape == fine_shape and np.allclose(det_fine.affine, fine_affine)
    assert len(det_fine.scores) > 0
    for point in det_fine.mm[:5]:  # each detection on the finer scan is one of the native scan's, within a working voxel
        assert np.min(np.linalg.norm(det.mm - point, axis=1)) < 1.8


def test_median_spacing_is_resolved_once_and_written_into_the_run(tmp_path: Path, tiny_synthetic: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cmb.errors import ConfigError
    from cmb.protocol.run import Protocol
    from cmb.validate import check_train

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=smoke", "data.preset=tiny", f"paths.cache_dir={tiny_synthetic}",
                                                      f"paths.runs_dir={tmp_path}", "name=median", "preprocess.spacing=median"])
        bad = compose(config_name="train", overrides=["preprocess.spacing=[0.5,0,1]"])
    check_train(cfg)
    with pytest.raises(ConfigError, match=r"preprocess.spacing=.* is not allowed: three voxel sizes in mm > 0"):
        check_train(bad)
    protocol = Protocol(cfg)
    assert list(cfg.preprocess.spacing) == [0.45, 0.45, 0.9]
    protocol.prepare()
    assert list(OmegaConf.load(protocol.layout.config).preprocess.spacing) == [0.45, 0.45, 0.9]


@pytest.mark.slow
def test_median_spacing_on_scans_of_one_voxel_size_leaves_the_out_of_fold_files_as_they_are(tmp_path: Path, tiny_synthetic: Path) -> None:
    """The working-voxel-size rule's first check (docs/experiments.md), at test scale: on a dataset of one voxel size
    `preprocess.spacing=median` is the identity, so fold 0 trained with it writes the same candidates and scores."""
    from hydra import compose, initialize_config_dir

    from cmb.protocol.run import Protocol

    files = {}
    for name, extra in (("own_grids", []), ("median", ["preprocess.spacing=median"])):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["debug=smoke", "data.preset=tiny", "inference.unet.tile=[32,32,32]",
                                                          f"paths.cache_dir={tiny_synthetic}", f"paths.runs_dir={tmp_path}", f"name={name}",
                                                          "unet.refine.steps=0", "unet.health=null", *extra])
        protocol = Protocol(cfg)
        protocol.run_fold(0)
        heldout = protocol.fold_split(0)["test"]
        files[name] = {(kind, s): protocol.layout.scan_file(0, kind, s).read_text() for kind in ("unet_candidates", "cnn_scores")
                       for s in heldout}
    assert files["own_grids"].keys() == files["median"].keys() and len(files["median"]) >= 2
    assert any(text.count("\n") > 1 for text in files["median"].values())  # at least one file lists candidates
    assert files["own_grids"] == files["median"]
