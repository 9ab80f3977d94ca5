"""Pictures of detections for a reader: one tile per detection, with axial, coronal and sagittal
crops (~24 mm) around it at the scan's own intensities, the detection circled.

Crops are taken from the scan in RAS orientation (`Scan.image`), shown in neurological
convention (patient's right on the right, anterior and superior up), with the voxel aspect
ratio of the scan. Used by `infer.py` (`<id>_detections.png`, `index.html`) and by
`python -m cmb.eval` (`review/`: missed CMBs and the highest-scoring false positives).
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmb.data.io import temp_file

VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # (name, axis held fixed); in-plane axes in increasing order
HALF_WIDTH_MM = 12.0
MAX_TILES = 40  # tiles per picture; the rest are counted in its title


@dataclass
class Tile:
    """One marked point: canonical (RAS) voxel position (3,), a label line and an edge colour."""

    voxel: np.ndarray
    label: str
    colour: str = "yellow"


def robust_window(image: np.ndarray, low: float = 1.0, high: float = 99.5) -> tuple[float, float]:
    """Display range: percentiles `low`..`high` of the non-zero voxels (a subsample of at most 10^6)."""
    values = image[image != 0]
    if values.size == 0:
        return 0.0, 1.0
    if values.size > 1_000_000:
        values = values[:: values.size // 1_000_000 + 1]
    lo, hi = np.percentile(values, [low, high])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def crop_view(image: np.ndarray, voxel: np.ndarray, spacing_mm: tuple[float, float, float], axis: int,
              half_width_mm: float = HALF_WIDTH_MM) -> tuple[np.ndarray, tuple[int, int]]:
    """The slice through round(`voxel`) across `axis`, cropped to +-`half_width_mm` around it.

    Returns (crop (rows, cols) float32, NaN beyond the volume; (row, col) of the voxel in it):
    columns follow the first in-plane axis, rows the second, so `imshow(crop, origin="lower")`
    shows R to the right and A (axial) or S (coronal, sagittal) up.
    """
    centre = np.clip(np.round(np.asarray(voxel, dtype=float)).astype(int), 0, np.array(image.shape) - 1)
    first, second = [a for a in range(3) if a != axis]
    halves = [max(1, int(round(half_width_mm / float(spacing_mm[a])))) for a in (first, second)]
    crop = np.full((2 * halves[1] + 1, 2 * halves[0] + 1), np.nan, dtype=np.float32)
    plane = np.take(image, centre[axis], axis=axis)  # (first, second)
    lo = [centre[first] - halves[0], centre[second] - halves[1]]
    src0 = slice(max(lo[0], 0), min(centre[first] + halves[0] + 1, image.shape[first]))
    src1 = slice(max(lo[1], 0), min(centre[second] + halves[1] + 1, image.shape[second]))
    crop[src1.start - lo[1]: src1.stop - lo[1], src0.start - lo[0]: src0.stop - lo[0]] = plane[src0, src1].T
    return crop, (halves[1], halves[0])


def write_tiles(image: np.ndarray, spacing_mm: tuple[float, float, float], tiles: list[Tile], path: Path, title: str,
                max_tiles: int = MAX_TILES) -> int:
    """Write one PNG with a row of three views per tile (at most `max_tiles`, in the given order);
    returns the number of tiles drawn. The file appears whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    shown = tiles[:max_tiles]
    vmin, vmax = robust_window(image)
    rows = max(1, len(shown))
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows + 0.6), squeeze=False)
    more = f" ({len(shown)} of {len(tiles)} shown)" if len(tiles) > len(shown) else ""
    fig.suptitle(f"{title}{more}", fontsize=10)
    if not shown:
        for ax in axes[0]:
            ax.axis("off")
        axes[0][1].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    for row, tile in zip(axes, shown):
        for ax, (name, axis) in zip(row, VIEWS):
            crop, (r, c) = crop_view(image, tile.voxel, spacing_mm, axis)
            first, second = [a for a in range(3) if a != axis]
            ax.imshow(crop, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest",
                      aspect=float(spacing_mm[second]) / float(spacing_mm[first]))
            # a circle of 3 mm radius on screen: its extent in voxels differs along the two in-plane axes
            ax.add_patch(Ellipse((c, r), 6.0 / float(spacing_mm[first]), 6.0 / float(spacing_mm[second]), fill=False,
                                 edgecolor=tile.colour, linewidth=1.2))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name, fontsize=8)
        row[0].set_ylabel(tile.label, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = temp_file(path.parent, f".{path.name}-", ".png")
    os.close(handle)
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(shown)


def write_index(folder: Path, rows: list[tuple[str, int, str | None, str | None]], title: str, count_name: str = "detections") -> Path:
    """`folder`/index.html: one row per scan (id, count, CSV link, picture), rebuilt from `rows` each time."""
    from cmb.data.io import atomic_write_text

    body = [f"<h1>{html.escape(title)}</h1>", "<table border=1 cellpadding=4>",
            f"<tr><th>scan</th><th>{html.escape(count_name)}</th><th>table</th><th>picture</th></tr>"]
    for scan_id, count, table, picture in rows:
        link = f'<a href="{html.escape(table)}">{html.escape(table)}</a>' if table else ""
        img = f'<a href="{html.escape(picture)}"><img src="{html.escape(picture)}" width="360"></a>' if picture else ""
        body.append(f"<tr><td>{html.escape(scan_id)}</td><td>{count}</td><td>{link}</td><td>{img}</td></tr>")
    body.append("</table>")
    page = "<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>\n" + "\n".join(body) + "\n"
    atomic_write_text(page, folder / "index.html")
    return folder / "index.html"
