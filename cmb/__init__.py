"""cmb: two-stage cerebral microbleed detection in susceptibility-weighted MRI."""

__version__ = "0.2.0"

WINDOW: tuple[int, int, int] = (20, 20, 16)
"""Network window in voxels along (i, j, k); k is the slice axis of an axial SWI."""


def input_window(net: object) -> tuple[int, int, int]:
    """The window a network takes around a centre: its `input_window` (a CNN with a context view,
    `cmb.models.discriminator.DouCNN`), else `WINDOW`."""
    return tuple(getattr(net, "input_window", WINDOW))  # type: ignore[return-value]


def user_cache_dir() -> str:
    """Where `cmb` caches the synthetic phantom and preprocessed scans, wherever it is run from:
    `$CMB_CACHE`, else `$XDG_CACHE_HOME/cmb`, else `~/.cache/cmb` (the config's `paths.cache_dir`)."""
    import os
    from pathlib import Path

    if os.environ.get("CMB_CACHE"):
        return str(Path(os.environ["CMB_CACHE"]).expanduser())
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base).expanduser() / "cmb")


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cmb.user_cache"):
        OmegaConf.register_new_resolver("cmb.user_cache", user_cache_dir)


_register_resolvers()
