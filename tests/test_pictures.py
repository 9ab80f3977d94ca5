"""Pictures of detections: one tile per detection, the circled voxel is the detection's voxel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cmb.pictures import MAX_TILES, Tile, VIEWS, crop_view, robust_window, write_index, write_tiles


def _scan() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(100, 200, size=(40, 36, 20)).astype(np.float32)


@pytest.mark.parametrize("voxel", [(20, 18, 10), (0, 0, 0), (39, 35, 19), (3.4, 30.6, 17.5)])
def test_the_centre_of_every_view_is_the_detection_voxel(voxel) -> None:
    image = _scan()
    spacing = (0.5, 0.6, 1.2)
    target = tuple(int(v) for v in np.clip(np.round(voxel), 0, np.array(image.shape) - 1))
    image[target] = 999.0  # a voxel no other voxel equals
    for name, axis in VIEWS:
        crop, (row, col) = crop_view(image, np.array(voxel), spacing, axis)
        assert crop[row, col] == 999.0, name
        first, second = [a for a in range(3) if a != axis]
        assert crop.shape == (2 * round(12 / spacing[second]) + 1, 2 * round(12 / spacing[first]) + 1)  # +-12 mm
        assert np.isnan(crop).any() == (min(target[first], target[second]) < 12 or target[first] > image.shape[first] - 25
                                        or target[second] > image.shape[second] - 25)
        # one voxel along the first in-plane axis is one column to the right; along the second, one row up
        if 0 < target[first] < image.shape[first] - 1:
            step = list(target)
            step[first] += 1
            assert crop[row, col + 1] == image[tuple(step)]
        if 0 < target[second] < image.shape[second] - 1:
            step = list(target)
            step[second] += 1
            assert crop[row + 1, col] == image[tuple(step)]


def test_one_tile_per_detection_and_a_complete_png(tmp_path: Path) -> None:
    image = _scan()
    tiles = [Tile(np.array([10.0 + n, 12.0, 8.0]), f"#{n + 1}") for n in range(3)]
    path = tmp_path / "scan_detections.png"
    assert write_tiles(image, (0.5, 0.5, 1.0), tiles, path, "scan") == 3
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*"))
    from PIL import Image

    one = Image.open(path).size
    assert write_tiles(image, (0.5, 0.5, 1.0), tiles[:1], tmp_path / "one.png", "scan") == 1
    assert one[1] > 2 * Image.open(tmp_path / "one.png").size[1]  # a row per detection
    many = [Tile(np.array([10.0, 12.0, 8.0]), "x")] * (MAX_TILES + 5)
    assert write_tiles(image, (0.5, 0.5, 1.0), many, tmp_path / "many.png", "scan") == MAX_TILES
    assert write_tiles(image, (0.5, 0.5, 1.0), [], tmp_path / "none.png", "scan") == 0 and (tmp_path / "none.png").is_file()


def test_window_and_index() -> None:
    image = np.zeros((10, 10, 10), np.float32)
    image[2:8, 2:8, 2:8] = np.linspace(0, 1000, 216).reshape(6, 6, 6)
    lo, hi = robust_window(image)
    assert 0 < lo < 20 and 990 < hi <= 1000
    assert robust_window(np.zeros((4, 4, 4))) == (0.0, 1.0)


def test_index_lists_scans_with_their_pictures(tmp_path: Path) -> None:
    page = write_index(tmp_path, [("a<1>", 2, "a_detections.csv", "a_detections.png"), ("b", 0, "b_detections.csv", None)], "t").read_text()
    assert "a&lt;1&gt;" in page and '<img src="a_detections.png"' in page and page.count("<tr>") == 3


def test_review_tiles_are_the_missed_cmbs_then_the_top_false_positives() -> None:
    from cmb.eval.matching import FP
    from cmb.eval.run_files import ScanRecord, StageDetections

    points = np.array([[5.0, 5, 5], [9, 9, 9], [20, 20, 10], [30, 30, 12], [31, 2, 3]])
    scores = np.array([0.9, 0.3, 0.8, 0.95, 0.1])
    status = np.array([0, 1, FP, FP, FP])  # CMB 0 found at 0.5; CMB 1 only at 0.3; CMB 2 never a candidate
    two = StageDetections(scores, points, status)
    record = ScanRecord("s", 0, 3, [2.0, 4.0, None], two, two)
    centroids = np.array([[5.0, 5, 5], [9, 9, 9], [15, 3, 4]])
    from cmb.eval.review import review_tiles

    tiles = review_tiles(record, centroids, 0.5, n_false_positives=1)
    assert [t.colour for t in tiles] == ["red", "red", "yellow"]
    assert "missed CMB 1, 4.0 mm" in tiles[0].label and "stage 2 score 0.300 < 0.5" in tiles[0].label
    assert "not a stage-1 candidate" in tiles[1].label and np.array_equal(tiles[1].voxel, centroids[2])
    assert np.array_equal(tiles[2].voxel, points[3]) and "0.950" in tiles[2].label  # the highest-scoring FP only
