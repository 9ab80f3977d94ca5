from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cmb import WINDOW
from cmb.data.patches import PatchDataset, TrainingVolume
from cmb.models.health import cmb_windows, is_capped, replay_weights, training_cmb_peaks
from cmb.models.lightning import PatchDataModule


class DarkDotDetector(nn.Module):
    """A hand-made 'member': logit = gain * (0.5 - image), so dark voxels score high; `cap` limits the logit."""

    def __init__(self, gain: float, cap: float | None = None) -> None:
        super().__init__()
        self.gain, self.cap = gain, cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gain * (0.5 - x)
        return logits.clamp(max=self.cap) if self.cap is not None else logits


def _volume() -> TrainingVolume:
    image = np.full((40, 40, 24), 0.6, dtype=np.float32)
    centres = np.array([[10, 10, 8], [30, 25, 12], [1, 38, 0]])  # the last one at the border: its window is part zeros
    for c in centres:
        image[tuple(slice(max(v - 1, 0), v + 2) for v in c)] = 0.1
    return TrainingVolume("synthA", image, np.zeros(image.shape, np.uint8), centres, np.zeros((0, 3), int), np.zeros((0, 3), int))


def test_windows_are_centred_on_the_cmb_and_zero_outside_the_image() -> None:
    vol = _volume()
    windows = cmb_windows([vol])
    assert windows.shape == (3, 1, *WINDOW) and windows.dtype == np.float32
    half = np.array(WINDOW) // 2
    for window in windows:
        assert window[0][tuple(half)] == np.float32(0.1)  # the dark dot sits at the window centre
    np.testing.assert_array_equal(windows[0, 0], vol.image[0:20, 0:20, 0:16])
    assert float(windows[2, 0, : half[0] - 1].max()) == 0.0  # i < 0 lies outside the image


def test_a_capped_member_is_told_from_a_healthy_one_on_its_training_cmbs() -> None:
    vols = [_volume()]
    healthy = training_cmb_peaks(DarkDotDetector(gain=40.0), vols)
    capped = training_cmb_peaks(DarkDotDetector(gain=40.0, cap=0.2), vols)  # sigmoid(0.2) = 0.55 at best
    assert healthy.shape == (3,) and float(healthy.min()) > 0.99
    np.testing.assert_allclose(capped, 1 / (1 + np.exp(-0.2)), rtol=1e-5)
    assert not is_capped(healthy, 0.9) and is_capped(capped, 0.9)
    assert not is_capped(np.zeros(0), 0.9)  # no training CMBs: nothing to judge


def test_the_check_leaves_the_member_in_the_mode_it_found() -> None:
    net = nn.Sequential(nn.Conv3d(1, 1, 3, padding=1), nn.BatchNorm3d(1)).train()
    training_cmb_peaks(net, [_volume()])
    assert net.training
    running_mean = net[1].running_mean.clone()
    training_cmb_peaks(net, [_volume()])
    torch.testing.assert_close(net[1].running_mean, running_mean)  # eval mode: batch-norm statistics untouched


def test_replay_gives_slipping_cmbs_their_share_of_the_positive_draws() -> None:
    assert replay_weights(np.zeros(3, bool), share=0.5) is None  # none slipping: uniform draws
    weights = replay_weights(np.array([False, True, False, False]), share=0.5)
    np.testing.assert_allclose(weights, [0.125, 0.625, 0.125, 0.125])
    weights = replay_weights(np.array([True, True, False]), share=0.6)
    np.testing.assert_allclose(weights[:2].sum(), 0.6 + 2 * 0.4 / 3)
    np.testing.assert_allclose(weights.sum(), 1.0)


def test_positive_weights_steer_which_training_cmb_is_drawn() -> None:
    vol = _volume()
    rng = np.random.default_rng(0)
    uniform = PatchDataset([vol], 8, {"positive": 1.0}, seed=0)
    assert {tuple(uniform.draw(rng)[2]) for _ in range(60)} == {tuple(c) for c in vol.cmb_centres}
    only_last = PatchDataset([vol], 8, {"positive": 1.0}, seed=0, positive_weights=np.array([0.0, 0.0, 1.0]))
    assert {tuple(only_last.draw(rng)[2]) for _ in range(60)} == {tuple(vol.cmb_centres[2])}
    half = PatchDataset([vol], 8, {"positive": 1.0}, seed=0, positive_weights=np.array([1.0, 1.0, 2.0]))
    share = np.mean([np.array_equal(half.draw(rng)[2], vol.cmb_centres[2]) for _ in range(2000)])
    assert abs(share - 0.5) < 0.05
    with pytest.raises(ValueError, match="one weight >= 0 per training CMB"):
        PatchDataset([vol], 8, {"positive": 1.0}, positive_weights=np.ones(2))


def test_the_data_module_asks_for_positive_weights_once_every_epoch() -> None:
    from types import SimpleNamespace

    calls = []

    def weights() -> np.ndarray:
        calls.append(1)
        return np.array([0.0, 1.0, 0.0])

    data = PatchDataModule([_volume()], batch_size=4, steps_per_epoch=2, mix={"positive": 1.0}, positive_weights=weights)
    for epoch, expected in ((0, 1), (0, 1), (1, 2)):  # Lightning may build a loader twice for one epoch (a resume)
        data.trainer = SimpleNamespace(current_epoch=epoch, global_step=2 * epoch, world_size=1)
        loader = data.train_dataloader()
        assert len(calls) == expected
        np.testing.assert_allclose(loader.dataset.positive_p, [0.0, 1.0, 0.0])
    resumed = PatchDataModule([_volume()], batch_size=4, steps_per_epoch=2, mix={"positive": 1.0}, positive_weights=weights)
    resumed.load_state_dict(data.state_dict())  # the epoch's weights travel with the checkpoint
    resumed.trainer = SimpleNamespace(current_epoch=1, global_step=3, world_size=1)
    loader = resumed.train_dataloader()
    assert len(calls) == 2 and list(loader.sampler) == [4, 5, 6, 7]  # mid-epoch: the batch not yet trained on
    assert PatchDataModule([_volume()], 4, 2, {"positive": 1.0}).train_dataloader().dataset.positive_p is None
