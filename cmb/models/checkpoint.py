"""Exported model files (`model.pt`): weights plus a plain description of the network.

Loaded with `torch.load(weights_only=True)`; the network class comes from an allowlist,
never from a name stored in a user's file being imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmb.errors import DataError
from cmb.models.discriminator import DouCNN
from cmb.models.unet import UNet3D

NETWORKS: dict[str, type[nn.Module]] = {"UNet3D": UNet3D, "DouCNN": DouCNN}
STAGE_NETWORK = {"unet": "UNet3D", "cnn": "DouCNN"}  # the network each stage's members must be


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_model(net: nn.Module, net_kwargs: dict, path: str | Path, **meta: Any) -> Path:
    """Write `model.pt` atomically: {"network", "kwargs", "state_dict", "meta"} (plain types only)."""
    name = type(net).__name__
    if name not in NETWORKS:
        raise ValueError(f"unknown network class {name}")
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    torch.save({"network": name, "kwargs": _plain(net_kwargs), "state_dict": state, "meta": _plain(meta)}, tmp)
    tmp.replace(path)
    return path


def load_model(path: str | Path, map_location: str | torch.device = "cpu", stage: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the network from `model.pt` safely; returns (net in eval mode, meta).

    With `stage` ("unet" or "cnn"), a file of the other stage (by its network and its saved
    metadata) is refused with a message naming both."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "model file does not exist")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling refused or corrupt file
        raise DataError(path, f"cannot load model safely ({type(err).__name__}: {err})") from None
    name = blob.get("network") if isinstance(blob, dict) else None
    if name not in NETWORKS:
        raise DataError(path, f"unknown network {name!r}; expected one of {sorted(NETWORKS)}")
    saved_stage = (blob.get("meta") or {}).get("stage")
    if stage is not None and (name != STAGE_NETWORK[stage] or saved_stage not in (None, stage)):
        raise DataError(path, f"this is a {saved_stage or '?'} member ({name}), but a {stage} member ({STAGE_NETWORK[stage]}) "
                              "belongs here; was the file copied into the wrong folder?")
    net = NETWORKS[name](**blob.get("kwargs", {}))
    net.load_state_dict(blob["state_dict"])
    return net.eval(), dict(blob.get("meta", {}))
