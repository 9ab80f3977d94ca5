"""Sampling mixes: a training round's share of windows per kind (`cmb.data.patches.PatchDataset.KINDS`).

One place answers "does this stage draw kind X?" for the settings hash, the door checks and the
protocol (which pools to build, what to mine). Imports nothing heavy: the door checks use it
before torch is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Kinds a mix cannot draw, by where it is used, and why (checked at the door: a share there would
# silently draw nothing, because the pool those windows come from does not exist in that round).
NOT_DRAWABLE: dict[str, dict[str, str]] = {
    "unet.sampling": {
        "mimic": "the U-Nets' first round has no false positives yet; the hard-negative round draws them "
                 "(unet.refine.sampling.mimic)",
        "hit": "stage-1 hits come from the fold's trained U-Nets; only the CNNs draw them (cnn.sampling.hit)",
    },
    "unet.refine.sampling": {
        "hit": "stage-1 hits come from the fold's trained U-Nets; only the CNNs draw them (cnn.sampling.hit)",
    },
}


def share_of(mix: Any, kind: str) -> float:
    """The share `mix` (kind -> share; a dict or DictConfig) gives `kind`: 0 when the mix or the kind is absent or
    null, or the share is not a number (the door check names that case)."""
    if not isinstance(mix, Mapping):
        return 0.0
    share = mix.get(kind)
    return float(share) if isinstance(share, (int, float)) and not isinstance(share, bool) else 0.0


def stage_mixes(stage_cfg: Any) -> list[Any]:
    """The mixes a stage trains with (`unet` or `cnn` config group): its first-round `sampling` and, when its
    hard-negative round runs (`refine.steps` > 0), `refine.sampling`."""
    if not isinstance(stage_cfg, Mapping):
        return []
    mixes = [stage_cfg.get("sampling")]
    refine = stage_cfg.get("refine")
    steps = refine.get("steps") if isinstance(refine, Mapping) else None
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        mixes.append(refine.get("sampling"))
    return [m for m in mixes if isinstance(m, Mapping)]


def stage_draws(stage_cfg: Any, kind: str) -> bool:
    """Whether a stage (its first round or its hard-negative round) draws `kind` windows."""
    return any(share_of(m, kind) > 0 for m in stage_mixes(stage_cfg))
