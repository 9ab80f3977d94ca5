from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cmb.data import preprocess as pp
from cmb.data.phantom import PRESETS, PhantomGenerator
from cmb.data.readers import SyntheticDataset


@pytest.fixture(scope="module")
def phantom_scan():
    return PhantomGenerator(PRESETS["demo"], seed=0).generate(1)


def test_histogram_peak_normalization_maps_peak_to_half() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(300, 10, 50_000), rng.normal(700, 30, 10_000)]).astype(np.float32)
    assert pp.histogram_peak(values) == pytest.approx(300, rel=0.02)
    out = pp.HistogramPeakNormalized("image")({"image": values.reshape(60, 100, 10), "mask": np.ones((60, 100, 10), bool)})
    assert pp.histogram_peak(out["image"].ravel()) == pytest.approx(0.5, abs=0.01)


def test_chain_on_phantom_mask_and_peak(phantom_scan) -> None:
    data = {"image": phantom_scan.image, "mask": None, "spacing": (0.45, 0.45, 0.9), "affine": phantom_scan.affine}
    out = pp.preprocessing_chain(pp.PreprocessConfig(), "threshold")(data)
    mask, tissue = out["mask"], phantom_scan.tissue
    assert out["mask_method"] == "threshold"
    assert (mask & (tissue == 4)).sum() / (tissue == 4).sum() > 0.98  # covers the brain
    assert (mask & (tissue == 1)).sum() / (tissue == 1).sum() < 0.01  # no scalp
    assert (mask & (tissue == 2)).sum() / (tissue == 2).sum() < 0.10  # skull only at its inner edge
    assert pp.histogram_peak(out["image"][mask]) == pytest.approx(0.5, abs=0.02)
    assert np.all(out["image"][~mask] == 0)


def test_n4_flattens_a_bias_field() -> None:
    rng = np.random.default_rng(0)
    shape = (48, 48, 32)
    grid = np.indices(shape).astype(float)
    bias = np.exp(0.4 * (grid[0] / shape[0] - 0.5))
    image = (1000 * bias * (1 + 0.02 * rng.standard_normal(shape))).astype(np.float32)
    mask = np.ones(shape, bool)
    out = pp.N4BiasCorrectiond("image", shrink=2)({"image": image, "mask": mask, "spacing": (1.0, 1.0, 1.0)})
    before = image[:8].mean() / image[-8:].mean()
    after = out["image"][:8].mean() / out["image"][-8:].mean()
    assert abs(np.log(after)) < 0.3 * abs(np.log(before))


def test_user_mask_wins_and_cache_avoids_rerun(tiny_synthetic: Path, tmp_path: Path, monkeypatch) -> None:
    ds = SyntheticDataset("tiny", 0, tiny_synthetic)
    scan = ds.load(ds.scan_ids()[0])
    cfg = pp.PreprocessConfig()
    first = pp.preprocess_scan(scan, cfg, tmp_path)
    calls = []
    monkeypatch.setattr(pp, "preprocessing_chain", lambda c, m: calls.append(c) or (_ for _ in ()).throw(AssertionError("re-ran")))
    second = pp.preprocess_scan(scan, cfg, tmp_path)
    assert calls == []
    np.testing.assert_array_equal(first.image, second.image)
    assert first.meta["mask_method"] == "threshold"
    monkeypatch.undo()
    user = np.zeros(scan.shape, bool)
    user[10:50, 10:50, 5:25] = True
    out = pp.BrainMaskd("image", method="user")({"image": scan.image, "mask": user, "spacing": scan.spacing_mm, "affine": scan.affine})
    assert out["mask_method"] == "user" and np.array_equal(out["mask"], user)


def test_hdbet_is_skipped_with_reason_when_absent(tmp_path: Path) -> None:
    ok, why = pp.hdbet_available(str(tmp_path / "no-weights"))
    assert not ok and ("not installed" in why or "weights are not in" in why)


def test_the_mask_method_is_resolved_with_its_reason_and_one_asked_for_must_run(monkeypatch) -> None:
    from cmb.errors import ConfigError

    monkeypatch.setattr(pp, "hdbet_available", lambda weights: (False, "HD-BET is not installed; pip install -e '.[hdbet]'"))
    assert pp.brain_mask_method("auto", True) == ("user", "the scan's masks/<id> file")
    method, why = pp.brain_mask_method("auto", False)
    assert method == "threshold" and why == "the SimpleITK threshold fallback (HD-BET is not installed; pip install -e '.[hdbet]')"
    assert pp.brain_mask_method("threshold", True)[0] == "threshold"  # asked for: the user's mask file is not used
    with pytest.raises(ConfigError, match="preprocess.mask=user needs a masks/<id> file"):
        pp.brain_mask_method("user", False)
    with pytest.raises(ConfigError, match="preprocess.mask=hdbet: HD-BET is not installed"):
        pp.brain_mask_method("hdbet", False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"preprocess.mask=deepbet: deepbet is not installed; pip install -e '.\[deepbet\]'"):
        pp.brain_mask_method("deepbet", False)
    with pytest.raises(ConfigError, match="preprocess.mask='bogus' is not allowed"):
        pp.PreprocessConfig(mask="bogus")


def test_run_folders_written_before_the_rename_read_their_mask_settings() -> None:
    cfg = pp.PreprocessConfig.from_settings({"_target_": "cmb.data.preprocess.PreprocessConfig", "mask_method": "threshold",
                                             "hdbet_params_dir": "/w"}, "old/config.yaml")
    assert (cfg.mask, cfg.hdbet_weights) == ("threshold", "/w")


def test_the_cache_key_holds_the_method_used_not_auto(tiny_synthetic: Path, tmp_path: Path, monkeypatch) -> None:
    """Installing HD-BET after a run must not serve the threshold masks cached under `auto` before."""
    ds = SyntheticDataset("tiny", 0, tiny_synthetic)
    scan = ds.load(ds.scan_ids()[0])
    first = pp.preprocess_scan(scan, pp.PreprocessConfig(), tmp_path)
    assert first.meta["mask_method"] == "threshold"
    box = np.zeros(scan.shape, bool)
    box[8:56, 8:56, 4:28] = True
    monkeypatch.setattr(pp, "hdbet_available", lambda weights: (True, "/weights"))
    monkeypatch.setattr(pp, "hdbet_mask", lambda image, affine, weights, source=None: box)
    second = pp.preprocess_scan(scan, pp.PreprocessConfig(), tmp_path)
    assert second.meta["mask_method"] == "hdbet" and np.array_equal(np.asarray(second.mask), box)
    assert len(list((tmp_path / "preprocess").iterdir())) == 2


@pytest.mark.slow
def test_deepbet_masks_the_phantom_brain_when_installed(phantom_scan) -> None:
    pytest.importorskip("deepbet")
    mask = pp.deepbet_mask(phantom_scan.image, phantom_scan.affine)
    brain = phantom_scan.tissue == 4
    assert mask.shape == brain.shape and mask.dtype == bool
    assert (mask & brain).sum() / brain.sum() > 0.9  # a learned T1 model finds the SWI phantom's brain (0.96-0.99 measured)
    assert (mask & (phantom_scan.tissue == 1)).sum() / mask.sum() < 0.02  # and leaves the scalp out


def _damage(entry: Path, how: str) -> None:
    import json

    if how == "zeroed image":
        image = np.load(entry / "image.npy")
        np.save(entry / "image.npy", np.zeros_like(image))
    elif how == "truncated image":
        data = (entry / "image.npy").read_bytes()
        (entry / "image.npy").write_bytes(data[: len(data) // 2])
    elif how == "garbage meta":
        (entry / "meta.json").write_text("{not json")
    elif how == "missing mask":
        (entry / "mask.npy").unlink()
    elif how == "written before checksums":
        meta = json.loads((entry / "meta.json").read_text())
        del meta["checksums"]
        (entry / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["zeroed image", "truncated image", "garbage meta", "missing mask", "written before checksums"])
def test_a_damaged_cache_entry_is_recomputed_not_used(tiny_synthetic: Path, tmp_path: Path, how: str, caplog) -> None:
    ds = SyntheticDataset("tiny", 0, tiny_synthetic)
    scan = ds.load(ds.scan_ids()[0])
    cfg = pp.PreprocessConfig()
    first = pp.preprocess_scan(scan, cfg, tmp_path)
    (entry,) = (tmp_path / "preprocess").iterdir()
    _damage(entry, how)
    with caplog.at_level("INFO"):
        again = pp.preprocess_scan(scan, cfg, tmp_path)
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(first.image))
    np.testing.assert_array_equal(np.asarray(again.mask), np.asarray(first.mask))
    assert "recomputing" in caplog.text
    assert [p.name for p in (tmp_path / "preprocess").iterdir()] == [entry.name]  # the damaged copy is gone
    third = pp._read_entry(entry, scan.scan_id)  # and the new entry checks out
    np.testing.assert_array_equal(np.asarray(third.image), np.asarray(first.image))


def _fill(cache: str, scan_path: str, barrier, results) -> None:  # noqa: ANN001 (multiprocessing objects)
    from cmb.data.readers import build_scan

    scan = build_scan("s", Path(scan_path))
    barrier.wait()  # all three find the entry missing at once
    try:
        results.put(pp._checksum(np.asarray(pp.preprocess_scan(scan, pp.PreprocessConfig(), cache).image)))
    except Exception as err:
        results.put(f"failed: {type(err).__name__}: {err}")


def _run_three(target, *args) -> list[str]:  # noqa: ANN001
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return out


def test_processes_filling_one_cache_entry_at_once_all_succeed(tiny_synthetic: Path, tmp_path: Path) -> None:
    scan_path = next((tiny_synthetic / "synthetic").glob("tiny-*")) / "images" / "synth000.nii.gz"
    sums = _run_three(_fill, str(tmp_path), str(scan_path))
    assert len(set(sums)) == 1 and not sums[0].startswith("failed"), sums
    entries = [p.name for p in (tmp_path / "preprocess").iterdir()]
    assert len(entries) == 1 and not entries[0].startswith(".")


def _generate(cache: str, barrier, results) -> None:  # noqa: ANN001 (multiprocessing objects)
    from cmb.data.synthetic import ensure_synthetic_dataset

    barrier.wait()  # all three look at the empty cache at once
    try:
        results.put(str(ensure_synthetic_dataset("tiny", 3, Path(cache))))
    except Exception as err:  # reported to the test, not lost in a child's traceback
        results.put(f"failed: {type(err).__name__}: {err}")


def test_processes_generating_one_synthetic_dataset_at_once_all_succeed(tmp_path: Path) -> None:
    roots = _run_three(_generate, str(tmp_path))
    assert len(set(roots)) == 1 and (Path(roots[0]) / "phantom.json").is_file(), roots
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [Path(roots[0]).name]  # no temporary copies left


def test_labelled_cmbs_the_mask_leaves_out_are_named_once(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """A user mask that leaves out one of two CMBs: a warning names that CMB's position, once per scan and process;
    a mask that covers both gives none."""
    from tests.conftest import AFFINE, make_volume, save

    from cmb.data.readers import NiftiDataset

    image, labels = make_volume(0, [(12, 12, 8), (32, 32, 14)])
    save(image, tmp_path / "d" / "images" / "x.nii.gz")
    save(labels, tmp_path / "d" / "labels" / "x.nii.gz")
    mask = np.zeros(image.shape, np.uint8)
    mask[2:24, 2:24, 1:20] = 1
    save(mask, tmp_path / "d" / "masks" / "x.nii.gz")
    cfg = pp.PreprocessConfig(mask="user", n4=False)
    ds = NiftiDataset(tmp_path / "d")
    with caplog.at_level("WARNING", logger="cmb.data.preprocess"):
        pp.preprocess_on_working_grid(ds.load("x"), cfg, tmp_path / "cache")
        pp.preprocess_on_working_grid(ds.load("x"), cfg, tmp_path / "cache")
    outside = [r.getMessage() for r in caplog.records if "outside the brain mask" in r.getMessage()]
    centre_mm = ", ".join(f"{v:.0f}" for v in np.array([32, 32, 14]) * np.diag(AFFINE)[:3])
    assert len(outside) == 1 and f"x: 1 of 2 labelled CMBs lie outside the brain mask (user), at ({centre_mm}) mm" in outside[0]
    mask[:] = 1
    save(mask, tmp_path / "d" / "masks" / "x.nii.gz")
    caplog.clear()
    with caplog.at_level("WARNING", logger="cmb.data.preprocess"):
        pp.preprocess_on_working_grid(NiftiDataset(tmp_path / "d").load("x"), cfg, tmp_path / "cache")
    assert not [r for r in caplog.records if "outside the brain mask" in r.getMessage()]
