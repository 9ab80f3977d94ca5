from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from monai.losses import DiceCELoss

from cmb import WINDOW, input_window
from cmb.data.augment import centred_window
from cmb.inference.cnn_scores import score_points
from cmb.data.patches import PatchDataset, TrainingVolume
from cmb.models.checkpoint import load_model, save_model
from cmb.models.discriminator import DouCNN
from cmb.models.lightning import UNetModule, CNNModule
from cmb.models.unet import DarkBlobContrast, LocalContrast, UNet3D, box_extreme_1d
from cmb.errors import DataError


def test_unet_shapes_on_window_and_tile() -> None:
    net = UNet3D(channels=(8, 16, 32)).eval()
    with torch.no_grad():
        out = torch.sigmoid(net(torch.randn(2, 1, *WINDOW)))
        assert out.shape == (2, 1, *WINDOW)
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        assert net(torch.randn(1, 1, 64, 48, 32)).shape == (1, 1, 64, 48, 32)
    with pytest.raises(ValueError, match="must divide by 4"):
        net(torch.randn(1, 1, 21, 20, 16))


@pytest.mark.parametrize(("channels", "local_contrast", "blob_contrast"),
                         [((4, 8), None, None), ((4, 8, 16), None, None), ((4, 8), (9, 9, 5), None),
                          pytest.param((4, 8), (9, 9, 5), (9, 9, 5), marks=pytest.mark.slow),
                          pytest.param((4, 8), (3, 3, 3), (5, 5, 3), marks=pytest.mark.slow)])
def test_unet_receptive_field_matches_the_voxels_an_output_depends_on(channels: tuple[int, ...], local_contrast, blob_contrast) -> None:
    torch.manual_seed(0)
    net = UNet3D(channels=channels, local_contrast=local_contrast, blob_contrast=blob_contrast).eval()
    grads = []
    for _ in range(16 if blob_contrast else 1):  # a box max passes gradient to its maxima only: the union over inputs spans the rest
        x = torch.rand(1, 1, 64, 64, 64, requires_grad=True)
        net(x)[0, 0, 32, 32, 32].backward()
        grad = x.grad[0, 0].abs()
        grads.append(grad > 1e-6 * grad.max())  # cumulative-sum box means leave rounding-level (<1e-9) leaks beyond the box
    support = torch.nonzero(torch.stack(grads).any(0))
    extent = (support.max(0).values - support.min(0).values + 1).tolist()
    assert extent == list(net.receptive_field)


def test_local_contrast_is_the_same_for_a_dark_dot_on_dark_and_on_bright_tissue() -> None:
    """The ratio channel ignores the surround's level: a dot at 0.5x its surround reads 0.5-ish on both."""
    lc = LocalContrast((9, 9, 5))
    volume = torch.full((1, 1, 40, 40, 16), 0.5)
    volume[..., 20:, :, :] = 0.2  # an iron-dark "nucleus" filling the upper half along i
    for centre, level in (((10, 20, 8), 0.5), ((30, 20, 8), 0.2)):
        i, j, k = centre
        volume[0, 0, i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = 0.5 * level
    out = lc(volume)
    assert out.shape == (1, 2, 40, 40, 16)
    torch.testing.assert_close(out[:, :1], volume)
    bright, dark = out[0, 1, 10, 20, 8], out[0, 1, 30, 20, 8]
    assert float(bright) < 0.6 and abs(float(bright) - float(dark)) < 1e-4  # the image channel differs 2.5x
    assert float(out[0, 1, 5, 5, 8]) == pytest.approx(1.0)  # flat tissue away from edges: ratio 1
    assert float(lc(torch.zeros(1, 1, 20, 20, 16)).abs().max()) == 0.0  # background stays 0
    x = torch.rand(2, 1, 20, 20, 16)  # the separable mean is the in-input 9x9x5 box mean, borders included
    box = torch.nn.functional.avg_pool3d(x, (9, 9, 5), stride=1, padding=(4, 4, 2), count_include_pad=False)
    torch.testing.assert_close(lc(x)[:, 1:], x / box.clamp_min(lc.floor))
    with pytest.raises(ValueError, match="odd"):
        LocalContrast((8, 9, 5))


def test_dark_blob_contrast_marks_small_dark_blobs_on_any_tissue_but_not_the_edge_of_a_nucleus() -> None:
    """The closing ratio reads a dot at half its surround as 0.5 in white matter, inside a dark
    nucleus and on its rim, and 1 on the nucleus's edge, where the local-mean ratio dips."""
    blob = DarkBlobContrast((9, 9, 5))
    volume = torch.full((1, 1, 48, 40, 16), 0.5)
    volume[..., 24:, :, :] = 0.2  # an iron-dark "nucleus" filling the upper half along i
    dots = {(10, 20, 8): 0.5, (36, 20, 8): 0.2, (24, 10, 8): 0.2}  # white matter, inside, on the rim (half in, half out)
    for (i, j, k), level in dots.items():
        volume[0, 0, i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = 0.5 * level
    out = blob(volume)
    assert out.shape == volume.shape
    for (i, j, k), level in dots.items():
        assert float(out[0, 0, i, j, k]) == pytest.approx(0.5, abs=1e-6)
    edge = (23, 30, 8)  # the nucleus's outermost voxel row, away from the dots
    assert float(out[0, 0, edge[0], edge[1], edge[2]]) == pytest.approx(1.0)
    assert float(out[0, 0, edge[0] + 1, edge[1], edge[2]]) == pytest.approx(1.0)
    local_mean_ratio = LocalContrast((9, 9, 5))(volume)[0, 1, edge[0] + 1, edge[1], edge[2]]
    assert float(local_mean_ratio) < 0.75  # what the local-mean channel says there: a CMB-like dip
    assert float(blob(torch.zeros(1, 1, 20, 20, 16)).abs().max()) == 0.0  # background stays 0
    x = torch.rand(1, 1, 40, 40, 24)  # away from the borders: scipy's grey closing over the same box
    from scipy import ndimage

    closing = torch.from_numpy(ndimage.grey_closing(x[0, 0].numpy(), size=(9, 9, 5)))
    torch.testing.assert_close(blob(x)[0, 0, 8:-8, 8:-8, 4:-4], (x[0, 0] / closing.clamp_min(blob.floor))[8:-8, 8:-8, 4:-4])
    with pytest.raises(ValueError, match="odd"):
        DarkBlobContrast((9, 9, 4))


@pytest.mark.parametrize("k", [1, 3, 5, 9, 15, 31])
def test_box_extreme_equals_scipy_running_max_and_min_up_to_the_borders(k: int) -> None:
    """Only voxels inside count, so at a border the window shrinks: scipy's mode='nearest' gives the same extremes."""
    from scipy import ndimage

    x = torch.rand(2, 1, 23, 19, 17)
    for dim in (2, 3, 4):
        for largest, scipy_filter in ((True, ndimage.maximum_filter1d), (False, ndimage.minimum_filter1d)):
            expected = scipy_filter(x.numpy(), k, axis=dim, mode="nearest")
            assert torch.equal(box_extreme_1d(x, dim, k, largest), torch.from_numpy(expected))


@pytest.mark.parametrize("experiment", ["lotcv", "paper"])
def test_configured_unet_sees_only_the_window_in_plane_at_its_centre(experiment: str) -> None:
    """Fast whole-scan tiles match window training only if the window's centre sees no zero padding.

    The local-contrast box (experiment=paper) averages only voxels inside the input, so only
    the convolutions count here."""
    with initialize_config_dir(config_dir=str(Path(__file__).parents[1] / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"])
    net = instantiate(cfg.unet.net)
    assert isinstance(net, UNet3D)
    conv_field = UNet3D(channels=list(cfg.unet.net.channels)).receptive_field
    assert conv_field[0] <= WINDOW[0] and conv_field[1] <= WINDOW[1]
    assert conv_field[2] <= WINDOW[2] + 2  # along k the centre sees at most one padded slice per side


def test_a_leaky_unet_can_score_above_its_head_bias_where_a_relu_unet_is_capped(tmp_path: Path) -> None:
    """With every head weight negative a ReLU net tops out at sigmoid(bias) on any input; the leaky net does not."""
    torch.manual_seed(0)
    relu_net, leaky_net = UNet3D(channels=(4, 8)).eval(), UNet3D(channels=(4, 8), leaky_slope=0.1).eval()
    assert sum(isinstance(m, torch.nn.ReLU) for m in relu_net.modules()) == 6
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in leaky_net.modules()) == 6
    leaky_net.load_state_dict(relu_net.state_dict())  # same weights: only the activations differ
    for net in (relu_net, leaky_net):
        with torch.no_grad():
            net.head.weight.copy_(-net.head.weight.abs() - 0.1)
            net.head.bias.fill_(-0.3)
    windows = torch.rand(8, 1, *WINDOW) * 1.3
    with torch.no_grad():
        relu_max = float(relu_net(windows).max())
        leaky_max = float(leaky_net(windows).max())
    assert relu_max <= -0.3 + 1e-6
    assert leaky_max > -0.3 + 1e-3
    save_model(leaky_net, {"channels": [4, 8], "leaky_slope": 0.1}, tmp_path / "m.pt", stage="unet")
    loaded, _ = load_model(tmp_path / "m.pt", stage="unet")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(windows), leaky_net(windows))
    with pytest.raises(ValueError, match="leaky_slope"):
        UNet3D(channels=(4, 8), leaky_slope=-0.1)


def test_dou_cnn_shapes() -> None:
    net = DouCNN().eval()
    assert net(torch.randn(3, 1, *WINDOW)).shape == (3, 2)


def test_context_view_is_the_paper_window_plus_the_zoomed_out_surroundings() -> None:
    """With context_zoom 2 the net takes a 40x40x32 window; its first channel is exactly the central 20x20x16
    (the window the paper's net sees, centred on the same voxel) and its second the whole averaged 2x2x2."""
    net = DouCNN(context_zoom=2).eval()
    assert net.input_window == (40, 40, 32) and input_window(net) == (40, 40, 32) and input_window(DouCNN()) == WINDOW
    volume = np.random.default_rng(0).random((70, 66, 50)).astype(np.float32)
    centre = np.array([33, 30, 24])
    big = torch.from_numpy(centred_window(volume, centre, (40, 40, 32)))[None, None]
    views = net.views(big)
    assert views.shape == (1, 2, *WINDOW)
    np.testing.assert_array_equal(views[0, 0].numpy(), centred_window(volume, centre, WINDOW))
    np.testing.assert_allclose(views[0, 1, 10, 10, 8].item(), volume[33:35, 30:32, 24:26].mean(), rtol=1e-6)
    assert net(big).shape == (1, 2)
    with pytest.raises(ValueError, match=r"expects windows of \(40, 40, 32\)"):
        net(torch.zeros(1, 1, *WINDOW))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="context_zoom"):
            DouCNN(context_zoom=bad)


def test_context_members_train_on_and_score_their_own_larger_windows(tmp_path: Path) -> None:
    """The training windows a context member gets, its saved file and its scores: the window it takes, the same CMB at
    the centre, and an ensemble of a context member and a plain one scores each with its own window."""
    vols = _blob_volumes()
    plain = PatchDataset(vols, 4, {"positive": 1.0}, seed=3)
    wide = PatchDataset(vols, 4, {"positive": 1.0}, seed=3, window=(40, 40, 32))
    for i in range(4):
        small, large = plain[i], wide[i]
        assert small["image"].shape == (1, *WINDOW) and large["image"].shape == (1, 40, 40, 32)
        assert large["label"] == 1 and large["target"][0, 19:22, 19:22, 15:18].sum() > 0  # the CMB stays at the centre (+-1)
    torch.manual_seed(0)
    net = DouCNN(context_zoom=2).eval()
    loaded, _ = load_model(save_model(net, {"context_zoom": 2}, tmp_path / "model.pt", stage="cnn"))
    assert loaded.input_window == (40, 40, 32)
    image, points = vols[0].image, vols[0].cmb_centres
    paper_net = DouCNN().eval()
    both = score_points([loaded, paper_net], image, points)
    alone = [score_points([m], image, points) for m in (loaded, paper_net)]
    np.testing.assert_allclose(both, (alone[0] + alone[1]) / 2, rtol=1e-5)
    wide_windows = torch.from_numpy(np.stack([centred_window(image, p, (40, 40, 32)) for p in points])[:, None])
    flips = [torch.softmax(net(torch.flip(wide_windows, d) if d else wide_windows), 1)[:, 1] for d in ((), (2,), (3,), (2, 3))]
    with torch.no_grad():
        np.testing.assert_allclose(alone[0], torch.stack(flips).mean(0).numpy(), rtol=1e-5)


def _blob_volumes(n: int = 2) -> list[TrainingVolume]:
    rng = np.random.default_rng(0)
    vols = []
    for s in range(n):
        image = (0.5 + 0.03 * rng.standard_normal((48, 48, 32))).astype(np.float32)
        target = np.zeros(image.shape, np.uint8)
        centres = np.array([[14, 14, 10], [32, 30, 20]])
        grid = np.indices(image.shape)
        for c in centres:
            ball = ((grid - c[:, None, None, None]) ** 2).sum(0) <= 4
            image[ball] = 0.1
            target[ball] = 1
        brain = np.argwhere(target == 0)[::50]
        vols.append(TrainingVolume(f"v{s}", image, target, centres, brain, np.zeros((0, 3), int)))
    return vols


def _steps(module, dataset, steps: int, batch: int = 8) -> list[float]:
    opt = module.configure_optimizers()["optimizer"]
    losses = []
    for step in range(steps):
        items = [dataset[step * batch + i] for i in range(batch)]
        b = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        loss = module.training_step(b, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
def test_stage1_training_lowers_loss(monkeypatch) -> None:
    torch.manual_seed(0)
    module = UNetModule(UNet3D(channels=(8, 16, 32)), DiceCELoss(sigmoid=True, batch=True), lambda p: torch.optim.AdamW(p, lr=3e-3), 30)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    ds = PatchDataset(_blob_volumes(), 30 * 8, {"positive": 0.6, "random": 0.4}, seed=0)
    losses = _steps(module, ds, 30)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])


def test_discriminator_training_step_learns(monkeypatch) -> None:
    torch.manual_seed(0)
    module = CNNModule(DouCNN(), lambda p: torch.optim.AdamW(p, lr=1e-3), 25)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    ds = PatchDataset(_blob_volumes(), 25 * 8, {"positive": 0.5, "random": 0.5}, seed=1)
    losses = _steps(module, ds, 25)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


class _Arbitrary:
    pass


def test_model_file_roundtrip_is_safe(tmp_path: Path) -> None:
    net = UNet3D(channels=(4, 8), local_contrast=(9, 9, 5), blob_contrast=(5, 5, 3))
    path = save_model(net, {"channels": [4, 8], "local_contrast": (9, 9, 5), "blob_contrast": (5, 5, 3)}, tmp_path / "model.pt", fold="0")
    loaded, meta = load_model(path)
    assert meta["fold"] == "0"
    x = torch.randn(1, 1, *WINDOW)
    net.eval()
    torch.testing.assert_close(loaded(x), net(x))
    evil = tmp_path / "evil.pt"
    torch.save({"network": "UNet3D", "obj": _Arbitrary()}, evil)  # a pickled arbitrary object
    with pytest.raises(DataError, match="cannot load model safely"):
        load_model(evil)


def test_context_zoom_and_sampling_mixes_are_checked_at_the_door_and_enter_the_hash_only_when_on() -> None:
    from cmb.errors import ConfigError
    from cmb.protocol.settings import member_settings, settings_hash
    from cmb.validate import check_train

    conf = Path(__file__).resolve().parents[1] / "conf"

    def compose_train(overrides: list[str]):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            return compose(config_name="train", overrides=overrides)

    for override, message in [("cnn.net.context_zoom=1", r"cnn.net.context_zoom=1 is not allowed: a whole number >= 2 or null"),
                              ("cnn.net.context_zoom=2.5", "cnn.net.context_zoom=2.5 is not allowed"),
                              ("cnn.sampling.random=-0.1", r"cnn.sampling.random=-0.1 is not allowed: a share >= 0"),
                              ("+unet.sampling.veins=0.2", "unet.sampling.veins is not a window kind: one of positive, hit, transplant"),
                              ("cnn.sampling.positive=0 cnn.sampling.mimic=0 cnn.sampling.dark=0 cnn.sampling.random=0",
                               "cnn.sampling: every share is 0"),
                              # kinds whose pool does not exist in that round would silently draw nothing
                              ("+unet.sampling.mimic=0.2", "unet.sampling.mimic=0.2 is not allowed: the U-Nets' first round has no false "
                                                           r"positives yet; the hard-negative round draws them \(unet.refine.sampling.mimic\)"),
                              ("cnn.contrast={share:0.5,gamma:[2,1]}", r"cnn.contrast=\{'share': 0.5, 'gamma': \[2, 1\]\} is not allowed"),
                              ("unet.contrast={share:0,gamma:[0.5,2]}", "unet.contrast=.* is not allowed: null or"),
                              ("unet.contrast=2", "unet.contrast=2 is not allowed"),
                              ("+unet.refine.sampling.hit=0.1", r"unet.refine.sampling.hit=0.1 is not allowed: stage-1 hits come from the "
                                                                r"fold's trained U-Nets; only the CNNs draw them \(cnn.sampling.hit\)")]:
        with pytest.raises(ConfigError, match=message):
            check_train(compose_train(override.split()))
    split = {"fold": 0, "train": ["a", "b"], "test": ["c"]}
    default, off, on = (compose_train(o) for o in ([], ["cnn.net.context_zoom=null"], ["cnn.net.context_zoom=2"]))
    check_train(on)
    hashes = [settings_hash(member_settings(c, "cnn", split, 20)) for c in (default, off, on)]
    assert hashes[0] == hashes[1] != hashes[2]
    assert settings_hash(member_settings(on, "unet", split, 20)) == settings_hash(member_settings(default, "unet", split, 20))
    # contrast-scaled windows are on by default (the rule's setting); off (experiment=paper) leaves the hash of a member without them
    no_contrast, other_range = compose_train(["unet.contrast=null"]), compose_train(["unet.contrast={share:0.5,gamma:[0.5,2]}"])
    check_train(other_range)
    unet_hashes = {settings_hash(member_settings(c, "unet", split, 20)) for c in (default, no_contrast, other_range)}
    assert len(unet_hashes) == 3
    paper = compose_train(["experiment=paper"])
    assert paper.unet.contrast is None and paper.cnn.contrast is None and default.unet.contrast.share == 0.5
    assert "contrast" not in member_settings(no_contrast, "unet", split, 20)["stage"]
    assert member_settings(default, "unet", split, 20)["stage"]["contrast"] == {"share": 0.5, "gamma": [0.33, 3]}


def test_stage1_hits_are_mined_where_the_unets_place_them_and_drawn_as_positives(tmp_path: Path) -> None:
    """Mining splits the U-Net components into false positives (mimics) and components that hit a CMB; a "hit"
    window is centred (+-1 voxel) where the component was, not at the CMB's centroid, and labelled a CMB."""
    from cmb.data.scan import CMBInstance, Scan
    from cmb.protocol.mining import mine_leak_free
    from cmb.protocol.scans import candidate_voxels

    shape, affine = (48, 48, 32), np.diag([0.5, 0.5, 1.0, 1.0])
    scan = Scan("s0", np.zeros(shape, np.float32), affine, tmp_path / "s0.nii.gz", cmbs=[CMBInstance((14.0, 14.0, 10.0), (7.0, 7.0, 10.0))])
    prob = np.zeros(shape, np.float32)
    prob[16:19, 13:16, 9:12] = 0.9  # a component 3 voxels (1.5 mm) off the CMB's centre: a hit at 2.5 mm
    prob[35:38, 35:38, 20:23] = 0.8  # far from any CMB: a mimic
    mine_leak_free(["s0"], lambda s: (scan, None), lambda pre: prob, 0.15, 2.5, tmp_path / "mimics", tmp_path / "hits")
    np.testing.assert_array_equal(candidate_voxels(tmp_path / "mimics" / "s0.csv"), [[36, 36, 21]])
    np.testing.assert_array_equal(candidate_voxels(tmp_path / "hits" / "s0.csv"), [[17, 14, 10]])
    (tmp_path / "hits" / "s0.csv").unlink()  # a run mined before stage-1 hits were kept: its mimics stay as they are
    (tmp_path / "mimics" / "s0.csv").write_text((tmp_path / "mimics" / "s0.csv").read_text() + "\n")
    before = (tmp_path / "mimics" / "s0.csv").read_text()
    mine_leak_free(["s0"], lambda s: (scan, None), lambda pre: prob, 0.15, 2.5, tmp_path / "mimics", tmp_path / "hits")
    assert (tmp_path / "mimics" / "s0.csv").read_text() == before and (tmp_path / "hits" / "s0.csv").is_file()

    vols = [replace(v, stage1_hits=np.array([[20, 17, 10]]), cmb_centres=np.zeros((0, 3), int)) for v in _blob_volumes(1)]
    ds = PatchDataset(vols, 16, {"hit": 1.0, "positive": 1.0}, seed=0, flip=False, rotate=False)
    assert ds.kinds == ["hit"]  # no CMB centroids to draw "positive" from: only the hits
    for i in range(16):
        item = ds[i]
        assert item["label"] == 1
        off = np.argwhere(item["image"][0].numpy() < 0.3).mean(0) - np.array(WINDOW) // 2  # the CMB blob at (14, 14, 10)
        assert np.all(np.abs(off - np.array([-6, -3, 0])) <= 1.01)
