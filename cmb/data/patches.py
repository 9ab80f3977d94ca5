"""Training patches: CMB-centred positives, transplanted CMBs (`cmb.data.transplant`),
synthetic CMBs (`cmb.data.synthetic_cmb`), random brain negatives, dark negatives,
vessel-like negatives (dark against their surroundings) and mined mimics, each augmented
by `cmb.data.augment`.

Sampling is a pure function of (seed, epoch, index), so results do not depend on the
number of data-loader workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from cmb import WINDOW
from cmb.data.augment import augment_window, crop_centred, region_size, scale_log_contrast, window_augmentation, zoomed_region
from cmb.data.preprocess import Preprocessed
from cmb.data.scan import Scan
from cmb.data.synthetic_cmb import SyntheticCMBConfig, draw_cmb, insert_cmb, next_to, plausible_site
from cmb.data.transplant import cut_stamps, paste_stamp

MAX_POOL = 200_000  # negatives are drawn from at most this many stored voxel positions per scan


@dataclass
class TrainingVolume:
    """What the samplers need of one training scan.

    image: normalized float32 (I, J, K); target: uint8 (I, J, K) CMB voxels;
    cmb_centres: (N, 3) int voxel centres; brain/dark/vessel: (M, 3) int candidate negative centres;
    mimics: (P, 3) int centres of mined stage-1 false positives; stage1_hits: (H, 3) int centres of mined
    stage-1 components that hit a CMB (where the U-Nets place them); spacing_mm: voxel size (i, j, k).
    """

    scan_id: str
    image: np.ndarray
    target: np.ndarray
    cmb_centres: np.ndarray
    brain: np.ndarray
    dark: np.ndarray
    mimics: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=int))
    vessel: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=int))
    stage1_hits: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=int))
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)


def point_target(shape: tuple[int, int, int], centroids: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Balls of `radius_mm` around centroids (for centroid-only truth); uint8 (I, J, K)."""
    target = np.zeros(shape, dtype=np.uint8)
    sp = np.asarray(spacing)
    reach = np.ceil(radius_mm / sp).astype(int)
    for c in np.asarray(centroids).reshape(-1, 3):
        lo = np.maximum(np.floor(c).astype(int) - reach, 0)
        hi = np.minimum(np.ceil(c).astype(int) + reach + 1, shape)
        grid = np.ix_(*[np.arange(a, b) for a, b in zip(lo, hi)])
        d2 = sum(((g - ci) * s) ** 2 for g, ci, s in zip(grid, c, sp))
        target[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= (d2 <= radius_mm**2).astype(np.uint8)
    return target


@dataclass(frozen=True)
class TargetOptions:
    """What the U-Net is trained to mark (`unet.centroid_target`, `unet.bloom`).

    centroid_balls: balls of `point_radius_mm` about each centroid instead of the label map. bloom_ratio: grow
    each CMB's target into the contiguous hypointensity about it (`bloom_target`): voxels below `bloom_ratio`
    times the local background within `bloom_radius_mm` of the centroid; None: no growth.
    """

    centroid_balls: bool = False
    bloom_ratio: float | None = None
    bloom_radius_mm: float = 4.0


def bloom_target(image: np.ndarray, mask: np.ndarray, core: np.ndarray, centroids: np.ndarray, spacing: tuple[float, float, float],
                 ratio: float, radius_mm: float, background_mm: float = 8.0) -> np.ndarray:
    """Each CMB's target grown into the dark region ("bloom") it lies in; uint8 (I, J, K).

    For each centroid (voxels, (N, 3)): the local background is the median in-mask intensity in a box of
    +-`background_mm` about it (3 voxels clear of `core`); the bloom is every 26-connected component of
    {in-mask voxels below `ratio` x background, within `radius_mm` of the centroid} that touches `core` there
    (the CMB's own target voxels within `radius_mm`). Written here because no library grows a label map into
    its hypointensity; in SWI the visible dark dot is several times the susceptibility core (dephasing).
    """
    out = core.astype(np.uint8).copy()
    sp = np.asarray(spacing, dtype=float)
    reach = np.ceil(max(background_mm, radius_mm) / sp).astype(int)
    for c in np.asarray(centroids, dtype=float).reshape(-1, 3):
        lo = np.maximum(np.floor(c).astype(int) - reach, 0)
        hi = np.minimum(np.ceil(c).astype(int) + reach + 1, image.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.ix_(*[np.arange(a, b) for a, b in zip(lo, hi)])
        near = sum(((g - ci) * s) ** 2 for g, ci, s in zip(grid, c, sp)) <= radius_mm**2
        own_core = (core[box] > 0) & near
        if not own_core.any():
            continue
        inside = mask[box] > 0
        around = inside & ~ndimage.binary_dilation(own_core, iterations=3)
        if not around.any():
            continue
        dark = inside & near & (image[box] < ratio * float(np.median(image[box][around])))
        comps, _ = ndimage.label(dark | own_core, structure=np.ones((3, 3, 3)))
        touching = np.unique(comps[own_core])
        out[box] |= np.isin(comps, touching[touching > 0]).astype(np.uint8)
    return out


def build_training_volume(scan: Scan, pre: Preprocessed, *, point_radius_mm: float = 1.5, dark_threshold: float = 0.3,
                          vessel_contrast: float | None = 0.15, seed: int = 0,
                          target_options: TargetOptions = TargetOptions()) -> TrainingVolume:
    """Assemble targets and negative pools for one preprocessed training scan.

    target: the label map's CMBs; where only centroids are known, or with `target_options.centroid_balls`, balls
    of `point_radius_mm` about each centroid (every CMB then weighs the same in the U-Net's loss, however
    large its label); with `target_options.bloom_ratio`, grown into the hypointensity about each CMB
    (`bloom_target`). Negatives keep 3 voxels clear of the label components and of the target alike.

    dark: in-brain voxels below `dark_threshold` (normalized intensity; mostly iron-rich
    nuclei, sulci and veins). vessel: dark voxels at least `vessel_contrast` below the mean
    of their ~4x4x4 mm neighbourhood (9x9x5 voxels): veins crossing bright tissue, the
    mimic a CMB detector confuses most, which are a small minority of `dark`. With
    `vessel_contrast=None` the vessel pool is left empty (it costs a whole-volume filter).
    """
    image = np.asarray(pre.image)
    mask = np.asarray(pre.mask)
    labelled = scan.instances > 0 if scan.instances is not None else np.zeros(image.shape, bool)
    use_balls = target_options.centroid_balls or scan.instances is None
    target = (point_target(image.shape, scan.centroids_vox, scan.spacing_mm, point_radius_mm) if use_balls
              else labelled.astype(np.uint8))
    if target_options.bloom_ratio is not None:
        target = bloom_target(image, mask, target, scan.centroids_vox, scan.spacing_mm, target_options.bloom_ratio,
                              target_options.bloom_radius_mm)
    keep_clear = labelled | (target > 0)
    centres = np.rint(scan.centroids_vox).astype(int).reshape(-1, 3)
    near_cmb = ndimage.binary_dilation(keep_clear, iterations=3)
    rng = np.random.default_rng(seed)
    brain = np.argwhere(mask & ~near_cmb)
    is_dark = mask & ~near_cmb & (image < dark_threshold) & (image > 0)
    dark = np.argwhere(is_dark)
    brain = brain[rng.permutation(len(brain))[:MAX_POOL]]
    dark = dark[rng.permutation(len(dark))[:MAX_POOL]]
    vessel = np.zeros((0, 3), dtype=int)
    if vessel_contrast is not None:
        vessel = np.argwhere(is_dark & (image < ndimage.uniform_filter(image, (9, 9, 5)) - vessel_contrast))
        vessel = vessel[rng.permutation(len(vessel))[:MAX_POOL]]
    spacing = tuple(float(v) for v in scan.spacing_mm)
    return TrainingVolume(scan.scan_id, image, target, centres, brain, dark, vessel=vessel, spacing_mm=spacing)  # type: ignore[arg-type]


class PatchDataset(Dataset):
    """Random augmented 20x20x16 windows from training volumes.

    Each item picks a kind by `mix` (weights over "positive", "hit", "transplant", "synthetic", "random",
    "dark", "vessel", "mimic"; kinds with nothing to draw from are skipped), a volume and a centre,
    then augments. A "hit" is a positive centred where the stage-1 U-Nets placed a candidate that hit a
    training CMB (mined, `TrainingVolume.stage1_hits`): off-centre for a large or irregular CMB, as
    the candidates stage 2 scores are. A "transplant" is a training CMB (any volume's) laid onto a centre drawn
    from the `transplant_sites` pools, darkened by ratio**gamma with gamma uniform in
    `transplant_gamma`; it is a positive. A "synthetic" is a CMB simulated by the SWI forward model
    (`cmb.data.synthetic_cmb`, settings `synthetic`) and multiplied into the window at a plausible
    site drawn from `synthetic.sites` (parenchyma, or next to a dark voxel); it is a positive.
    `positive_weights` (one per training CMB, in the order of `cmb.models.health.cmb_windows`):
    relative draw weights of the positives
    (None: uniform). `window`: the window cut (20x20x16; larger for a CNN with a context view,
    `cmb.models.discriminator.DouCNN.input_window`). `zoom` (share, low, high): that share of the windows, of every
    kind, is cut enlarged about its centre by a factor uniform in [low, high] (`zoomed_region`), before the other
    augmentation; None: none. `contrast` (share, low, high, anchor): that share of the windows, of every kind, has its
    log-contrast about the normalized peak `anchor` scaled by gamma, log-uniform in [low, high] (`scale_log_contrast`),
    after the CMB is placed and before the flips; None: none. Returns {"image": (1, *window) float32,
    "target": (1, *window) float32, "label": () float32 (1 for a CMB-centred window)}.
    """

    KINDS = ("positive", "hit", "transplant", "synthetic", "random", "dark", "vessel", "mimic")
    SITE_TRIES = 20  # draws for a plausible synthetic-CMB site before one from the parenchyma pool is taken as it is
    POOL_ATTR = {"random": "brain", "dark": "dark", "vessel": "vessel", "mimic": "mimics"}

    def __init__(self, volumes: list[TrainingVolume], n_samples: int, mix: dict[str, float], seed: int = 0,
                 max_shift: int = 1, flip: bool = True, rotate: bool = True, negative_shift: int | None = None,
                 transplant_sites: tuple[str, ...] = ("dark", "mimic"), transplant_gamma: tuple[float, float] = (0.75, 1.25),
                 positive_weights: np.ndarray | None = None, synthetic: SyntheticCMBConfig | None = None,
                 window: tuple[int, int, int] = WINDOW, zoom: tuple[float, float, float] | None = None,
                 contrast: tuple[float, float, float, float] | None = None) -> None:
        if not volumes:
            raise ValueError("PatchDataset needs at least one training volume")
        self.volumes = volumes
        self.n_samples = int(n_samples)
        self.seed = seed
        self.epoch = 0
        self.max_shift = max_shift
        self.negative_shift = max_shift if negative_shift is None else negative_shift
        self.window = tuple(int(w) for w in window)
        self.zoom = None if zoom is None else tuple(float(z) for z in zoom)
        self.contrast = None if contrast is None else tuple(float(c) for c in contrast)
        self.augmentations = {shift: window_augmentation(shift, self.window, flip, rotate) for shift in {self.max_shift, self.negative_shift}}
        unknown = set(mix) - set(self.KINDS)
        if unknown:
            raise ValueError(f"unknown sampling kind(s) {sorted(unknown)}; known: {self.KINDS}")
        self._pools = {  # drawn from as one list over all volumes; the other kinds pick a volume first
            "positive": [(v, c) for v, vol in enumerate(volumes) for c in vol.cmb_centres],
            "mimic": [(v, c) for v, vol in enumerate(volumes) for c in vol.mimics],
            "hit": [(v, c) for v, vol in enumerate(volumes) for c in vol.stage1_hits],
        }
        self.positive_p = None  # None: positives uniform over all training CMBs
        if positive_weights is not None:
            w = np.asarray(positive_weights, dtype=float)
            if w.shape != (len(self._pools["positive"]),) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"positive_weights needs one weight >= 0 per training CMB ({len(self._pools['positive'])}), "
                                 f"not all 0; got shape {w.shape}")
            self.positive_p = w / w.sum()
        weights = {k: float(mix.get(k, 0.0)) if k in ("transplant", "synthetic") or self._has(k) else 0.0 for k in self.KINDS}
        bad_sites = set(transplant_sites) - set(self.POOL_ATTR)
        if bad_sites:
            raise ValueError(f"transplant sites must be among {sorted(self.POOL_ATTR)}, got {sorted(bad_sites)}")
        self.transplant_sites = [k for k in transplant_sites if self._has(k)]
        self.transplant_gamma = tuple(float(g) for g in transplant_gamma)
        self.stamps = []
        if weights["transplant"] > 0:  # cut once per dataset (per epoch): tens of small crops, at most the 20x20x16 region
            size = region_size(max_shift)
            self.stamps = [s for vol in volumes for s in cut_stamps(vol.image, vol.target, vol.cmb_centres, size)]
        if not self.stamps or not self.transplant_sites:
            weights["transplant"] = 0.0
        self.synthetic = synthetic  # its sites were checked by SyntheticCMBConfig
        self.synthetic_sites = [k for k in (synthetic.sites if synthetic else ()) if self._has(k)]
        if not self.synthetic_sites or not self._has("random"):
            weights["synthetic"] = 0.0
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(f"nothing to sample with mix {mix}")
        self.kinds = [k for k in self.KINDS if weights[k] > 0]
        self.probs = np.array([weights[k] for k in self.kinds]) / total

    def _has(self, pool: str) -> bool:
        """Whether any volume has a centre to draw for `pool` (a kind other than "transplant")."""
        if pool in self._pools:
            return bool(self._pools[pool])
        return any(len(getattr(v, self.POOL_ATTR[pool])) for v in self.volumes)

    def __len__(self) -> int:
        return self.n_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draw(self, rng: np.random.Generator) -> tuple[str, int, np.ndarray]:
        """(kind, volume index, integer centre) of one sample."""
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.probs))]
        if kind == "synthetic":
            v, centre = self.synthetic_site(rng)
            return kind, v, centre
        pool = self.transplant_sites[int(rng.integers(len(self.transplant_sites)))] if kind == "transplant" else kind
        return (kind, *self._from_pool(pool, rng))

    def _from_pool(self, pool: str, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """(volume index, integer centre) drawn from `pool`."""
        if pool in self._pools:
            if pool == "positive" and self.positive_p is not None:
                pick = int(rng.choice(len(self.positive_p), p=self.positive_p))
            else:
                pick = int(rng.integers(len(self._pools[pool])))
            v, centre = self._pools[pool][pick]
            return v, np.asarray(centre)
        attr = self.POOL_ATTR[pool]
        candidates = [i for i, vol in enumerate(self.volumes) if len(getattr(vol, attr))]
        v = candidates[int(rng.integers(len(candidates)))]
        positions = getattr(self.volumes[v], attr)
        return v, positions[int(rng.integers(len(positions)))]

    def synthetic_site(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """(volume index, integer centre) for a synthetic CMB: a voxel of a `synthetic.sites` pool (beside it for
        "dark" and "vessel") that `plausible_site` accepts; after SITE_TRIES misses, a parenchyma-pool voxel."""
        assert self.synthetic is not None
        for _ in range(self.SITE_TRIES):
            pool = self.synthetic_sites[int(rng.integers(len(self.synthetic_sites)))]
            v, point = self._from_pool(pool, rng)
            vol = self.volumes[v]
            site = point if pool == "random" else next_to(point, vol.spacing_mm, self.synthetic, rng)
            if plausible_site(vol.image, vol.target, site, self.synthetic.parenchyma):
                return v, site
        return self._from_pool("random", rng)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        kind, v, centre = self.draw(rng)
        vol = self.volumes[v]
        is_cmb = kind in ("positive", "hit", "transplant", "synthetic")
        shift = self.max_shift if is_cmb else self.negative_shift
        size = region_size(shift, self.window)
        factor = 1.0
        if self.zoom is not None and rng.random() < self.zoom[0]:  # no draw at all without zoom: those windows stay as they were
            factor = float(rng.uniform(self.zoom[1], self.zoom[2]))
        if factor != 1.0:
            image = zoomed_region(vol.image, centre, size, factor, order=1).astype(np.float32)
            target = zoomed_region(vol.target, centre, size, factor, order=0).astype(np.float32)
        else:
            image = crop_centred(vol.image, centre, size).astype(np.float32)
            target = crop_centred(vol.target, centre, size).astype(np.float32)
        if kind == "transplant":
            stamp = self.stamps[int(rng.integers(len(self.stamps)))]
            paste_stamp(image, target, stamp, float(rng.uniform(*self.transplant_gamma)))
        elif kind == "synthetic":
            insert_cmb(image, target, draw_cmb(size, vol.spacing_mm, self.synthetic, rng), rng)
        geometry_seed = int(rng.integers(2**32, dtype=np.uint64))
        if self.contrast is not None and rng.random() < self.contrast[0]:  # drawn after the flips' seed: same geometry as without
            share, low, high, anchor = self.contrast
            image = scale_log_contrast(image, float(np.exp(rng.uniform(np.log(low), np.log(high)))), anchor)
        window = augment_window(self.augmentations[shift], {"image": image[None], "target": target[None]}, seed=geometry_seed)
        return {
            "image": torch.from_numpy(window["image"].astype(np.float32)),
            "target": torch.from_numpy(window["target"].astype(np.float32)),
            "label": torch.tensor(1.0 if is_cmb else 0.0),
        }
