"""Settings checked at the door: every value a user commonly types on the command line is checked
before anything is read or written, and a bad one is one line naming the key, the value and what
is allowed (a `ConfigError`: exit status 2).

Hydra itself refuses unknown keys and malformed overrides before `main` runs.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cmb.errors import ConfigError
from cmb.mixes import NOT_DRAWABLE, stage_draws

STAGES = ("unet", "cnn", "mine", "fold", "all", "score")
UNET_MODES = ("fast", "faithful")
SCORE_FUSIONS = ("cnn", "mean", "geometric")  # inference.score_fusion (cmb.inference.cnn_scores.fuse_scores)
CANDIDATE_POINTS = ("centroid", "peak")  # inference.candidate_point (cmb.inference.candidates.extract_candidates)
STAGE2_WINDOWS = ("candidate", "max_far")  # inference.stage2_window (cmb.inference.cnn_scores.score_candidates)
MINING_MODES = ("leak_free", "paper")  # mining.mode (cmb.protocol.mining)
MASK_METHODS = ("auto", "user", "deepbet", "hdbet", "threshold")  # preprocess.mask (cmb.data.preprocess.brain_mask_method)


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, DictConfig) else None
    return node


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def probability(cfg: DictConfig, key: str, *, allow_none: bool = False, open_low: bool = False) -> None:
    """`key` must be a number in [0, 1] ((0, 1] with `open_low`), or null with `allow_none`."""
    value = _get(cfg, key)
    if value is None and allow_none:
        return
    low = "(0" if open_low else "[0"
    if not _is_number(value) or math.isnan(value) or not (
            (0 < value if open_low else 0 <= value) and value <= 1):
        raise ConfigError(f"{key}={value!r} is not allowed: a number in {low}, 1]{' or null' if allow_none else ''}")


def integer(cfg: DictConfig, key: str, minimum: int, why: str = "") -> None:
    value = _get(cfg, key)
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{key}={value!r} is not allowed: a whole number >= {minimum}{why}")


def positive_number(cfg: DictConfig, key: str) -> None:
    value = _get(cfg, key)
    if not _is_number(value) or math.isnan(value) or value <= 0:
        raise ConfigError(f"{key}={value!r} is not allowed: a number > 0")


def one_of(cfg: DictConfig, key: str, allowed: tuple, allow_none: bool = False) -> None:
    value = _get(cfg, key)
    if (value is None and allow_none) or value in allowed:
        return
    raise ConfigError(f"{key}={value!r} is not allowed: one of {', '.join(map(str, allowed))}{' or null' if allow_none else ''}")


def fold_value(cfg: DictConfig, key: str = "fold", allow_none: bool = False) -> None:
    value = _get(cfg, key)
    if (value is None and allow_none) or value == "final" or (_is_int(value) and value >= 0):
        return
    raise ConfigError(f"{key}={value!r} is not allowed: a fold number (0, 1, ...) or 'final'{' or null' if allow_none else ''}")


def check_train(cfg: DictConfig) -> None:
    """The settings of `train.py` (see conf/train.yaml and its groups)."""
    one_of(cfg, "stage", STAGES)
    run_name(cfg)
    fold_value(cfg)
    fold_value(cfg, "transfer_fold", allow_none=True)
    if _get(cfg, "stage") == "score" and not _get(cfg, "model_dir"):
        raise ConfigError("stage=score needs model_dir=RUN_DIR: the finished run whose models score data=...")
    integer(cfg, "batch_size", 2, " (batch norm needs at least 2 windows per batch)")
    integer(cfg, "seed", 0)
    for stage_key in ("unet", "cnn"):
        integer(cfg, f"{stage_key}.max_steps", 1)
        integer(cfg, f"{stage_key}.steps_per_epoch", 1)
        sizes = _get(cfg, f"{stage_key}.batch_sizes")
        if not sizes or any(not _is_int(b) or b < 2 for b in sizes):
            raise ConfigError(f"{stage_key}.batch_sizes={list(sizes) if sizes else sizes!r} is not allowed: a list of whole numbers >= 2")
    stage = _get(cfg, "stage")
    if stage in ("unet", "cnn"):  # one member: it must be one the ensemble uses
        sizes = list(_get(cfg, f"{stage}.batch_sizes"))
        if _get(cfg, "batch_size") not in sizes:
            raise ConfigError(f"batch_size={_get(cfg, 'batch_size')!r} is not a member of the {stage} ensemble ({stage}.batch_sizes={sizes}); "
                              f"train one of those, or change {stage}.batch_sizes for the whole run")
    if _get(cfg, "unet.centroid_target") not in (None, True, False):
        raise ConfigError(f"unet.centroid_target={_get(cfg, 'unet.centroid_target')!r} is not allowed: true or false")
    positive_number(cfg, "data_options.point_target_radius_mm")
    bloom = _get(cfg, "unet.bloom")
    if bloom is not None:
        if not isinstance(bloom, DictConfig) or set(bloom.keys()) != {"ratio", "radius_mm"}:
            raise ConfigError(f"unet.bloom={bloom!r} is not allowed: null or {{ratio: R, radius_mm: MM}}")
        probability(cfg, "unet.bloom.ratio", open_low=True)
        positive_number(cfg, "unet.bloom.radius_mm")
    probability(cfg, "inference.unet_threshold", open_low=True)
    probability(cfg, "mining.threshold", open_low=True)
    one_of(cfg, "inference.unet.mode", UNET_MODES)
    one_of(cfg, "inference.score_fusion", SCORE_FUSIONS)
    one_of(cfg, "inference.candidate_point", CANDIDATE_POINTS)
    one_of(cfg, "inference.stage2_window", STAGE2_WINDOWS)
    one_of(cfg, "mining.mode", MINING_MODES)
    positive_number(cfg, "eval.target_fp_per_scan")
    positive_number(cfg, "eval.match_radius_mm")
    positive_number(cfg, "eval.thresholds.step")
    probability(cfg, "eval.thresholds.start")
    probability(cfg, "eval.thresholds.stop")
    if _get(cfg, "eval.thresholds.start") >= _get(cfg, "eval.thresholds.stop"):
        raise ConfigError(f"eval.thresholds: start ({_get(cfg, 'eval.thresholds.start')}) must be below stop "
                          f"({_get(cfg, 'eval.thresholds.stop')})")
    brain_mask(cfg)
    spacing = _get(cfg, "preprocess.spacing")
    if spacing is not None and spacing != "median":
        spacing_mm(spacing, "median or null")
    if _get(cfg, "protocol.train_scans") is not None:
        integer(cfg, "protocol.train_scans", 1, " or null (all of each fold's training scans)")
    for stage_key in ("unet", "cnn"):
        synthetic_cmbs(cfg, stage_key)
        window_zoom(cfg, f"{stage_key}.zoom")
        window_contrast(cfg, f"{stage_key}.contrast")
        sampling_mix(cfg, f"{stage_key}.sampling")
    if _get(cfg, "unet.refine.sampling") is not None:
        sampling_mix(cfg, "unet.refine.sampling")
    if _get(cfg, "cnn.net.context_zoom") is not None:
        integer(cfg, "cnn.net.context_zoom", 2, " or null (off: the paper's 20x20x16 window alone)")


def run_name(cfg: DictConfig) -> None:
    """`name`: the run folder under paths.runs_dir, as one or more path parts (a/b nests), none empty, "." or "..", no
    control characters: an empty name would make the runs folder itself the run, ".." a folder outside it."""
    name = _get(cfg, "name")
    text = str(name) if _is_int(name) or isinstance(name, str) else ""
    parts = text.replace("\\", "/").split("/")
    if not text.strip() or any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 for c in text):
        raise ConfigError(f"name={name!r} is not allowed: the run folder's name under paths.runs_dir, e.g. name=my_run "
                          "(parts separated by / nest; none may be empty, '.' or '..')")


def sampling_mix(cfg: DictConfig, key: str) -> None:
    """A sampling mix: shares (numbers >= 0) of known window kinds (cmb.data.patches.PatchDataset), at least one above 0."""
    mix = _get(cfg, key)
    shares = dict(mix.items()) if isinstance(mix, DictConfig) else None
    if not shares:
        raise ConfigError(f"{key}={mix!r} is not allowed: shares of window kinds (e.g. positive: 0.5, random: 0.5)")
    from cmb.data.patches import PatchDataset  # torch and scipy: imported when a training run is checked, not by infer.py's checks

    for kind, share in shares.items():
        if kind not in PatchDataset.KINDS:
            raise ConfigError(f"{key}.{kind} is not a window kind: one of {', '.join(PatchDataset.KINDS)}")
        if not _is_number(share) or share < 0:
            raise ConfigError(f"{key}.{kind}={share!r} is not allowed: a share >= 0")
        if share > 0 and kind in NOT_DRAWABLE.get(key, {}):
            raise ConfigError(f"{key}.{kind}={share!r} is not allowed: {NOT_DRAWABLE[key][kind]}")
    if sum(shares.values()) <= 0:
        raise ConfigError(f"{key}: every share is 0; give at least one window kind a share above 0")


def synthetic_cmbs(cfg: DictConfig, stage_key: str) -> None:
    """A stage whose sampling mixes draw "synthetic" windows has valid `<stage>.synthetic` settings."""
    if not stage_draws(_get(cfg, stage_key), "synthetic"):
        return
    from cmb.data.synthetic_cmb import SyntheticCMBConfig  # only here: it imports torch (the physics phantom's FFTs)

    settings = _get(cfg, f"{stage_key}.synthetic")
    try:
        SyntheticCMBConfig.from_dict(OmegaConf.to_container(settings, resolve=True) if isinstance(settings, DictConfig) else None)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{stage_key}.synthetic: {err}") from None


def window_zoom(cfg: DictConfig, key: str) -> None:
    """`<stage>.zoom`: null, or {share: in (0, 1], factors: [low, high] with 0.5 <= low <= high <= 2}."""
    _share_and_range(cfg, key, "factors", 0.5, 2)


def window_contrast(cfg: DictConfig, key: str) -> None:
    """`<stage>.contrast`: null, or {share: in (0, 1], gamma: [low, high] with 0.1 <= low <= high <= 10}."""
    _share_and_range(cfg, key, "gamma", 0.1, 10)


def _share_and_range(cfg: DictConfig, key: str, range_key: str, lowest: float, highest: float) -> None:
    """`key`: null, or {share: s in (0, 1], <range_key>: [low, high] with lowest <= low <= high <= highest}."""
    value = _get(cfg, key)
    if value is None:
        return
    what = f"{key}={OmegaConf.to_container(value) if isinstance(value, DictConfig) else value!r} is not allowed: null or " \
           f"{{share: s, {range_key}: [low, high]}} with s in (0, 1] and {lowest:g} <= low <= high <= {highest:g}"
    if not isinstance(value, DictConfig) or set(value.keys()) != {"share", range_key}:
        raise ConfigError(what)
    bounds = value.get(range_key)
    if not _is_number(value.get("share")) or not 0 < float(value.share) <= 1 or not isinstance(bounds, ListConfig) \
            or len(bounds) != 2 or not all(_is_number(b) for b in bounds) or not lowest <= float(bounds[0]) <= float(bounds[1]) <= highest:
        raise ConfigError(what)


def spacing_mm(value: Any, other_values: str) -> tuple[float, float, float]:
    """`value` (preprocess.spacing) as three finite voxel sizes > 0 in mm along i, j, k; otherwise a ConfigError
    that also names what else the setting may be (`other_values`)."""
    values = [] if isinstance(value, str) else list(value)
    if len(values) != 3 or not all(_is_number(v) and math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"preprocess.spacing={value!r} is not allowed: three voxel sizes in mm > 0 (i, j, k), {other_values}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def brain_mask(cfg: DictConfig) -> None:
    """`preprocess.mask` is a known method, and one asked for by name can run here (installed, weights on disk)."""
    one_of(cfg, "preprocess.mask", MASK_METHODS)
    method = _get(cfg, "preprocess.mask")
    if method not in ("deepbet", "hdbet"):
        return
    from cmb.data.preprocess import brain_mask_method

    brain_mask_method(method, False, _get(cfg, "preprocess.hdbet_weights"))  # a ConfigError saying what is missing


def check_infer(cfg: DictConfig) -> None:
    """The settings of `infer.py` (conf/infer.yaml)."""
    probability(cfg, "threshold", allow_none=True)
    one_of(cfg, "unet_mode", UNET_MODES, allow_none=True)
    fold_value(cfg, allow_none=True)
    for key in ("overwrite", "progress"):
        if not isinstance(_get(cfg, key), bool):
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not allowed: true or false")


# Hydra flags that take a value (the value is not an override); flags that point Hydra at another config
_FLAGS_WITH_VALUE = ("-c", "--cfg", "-p", "--package", "--info", "-sc", "--shell-completion", "--experimental-rerun")
_OTHER_CONFIG = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")


def command_line_overrides(argv: list[str]) -> list[str] | None:
    """The `key=value` overrides of a Hydra command line; None when it points Hydra at another config."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.split("=", 1)[0] in _OTHER_CONFIG:
            return None
        if arg in _FLAGS_WITH_VALUE:
            skip = arg not in ("--info",)  # --info takes an optional value; a following key=value is an override
            continue
        if not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{prefix}{key}"
            keys.append(full)
            keys += _dotted_keys(node._get_node(key), f"{full}.")
    return keys


def _near(name: str, candidates: list[str]) -> str:
    """', did you mean a or b?' for the candidates closest to `name` (whole dotted key, then its last part)."""
    import difflib

    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.75)
    if not close:
        parent, _, leaf = name.rpartition(".")
        siblings = [c for c in candidates if c.rpartition(".")[0] == parent]
        close = [c for c in siblings if c.rpartition(".")[2] in difflib.get_close_matches(leaf, [s.rpartition(".")[2] for s in siblings],
                                                                                           n=3, cutoff=0.6)]
    return f"; did you mean {' or '.join(close)}?" if close else ""


def check_command_line(config_name: str, argv: list[str], script: str) -> None:
    """Refuse a command line whose overrides Hydra cannot apply, before Hydra (exit 1, a hint about `+key`)
    or any loading runs: one line naming the override and the problem (a `ConfigError`), with the
    nearest existing keys for a mistyped one. Sweeps (`-m fold=0,1`) are checked key by key."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf import OmegaConf

    from cmb.conf_utils import CONFIG_DIR

    overrides = command_line_overrides(argv)
    if not overrides:
        return
    command = script if script.startswith("python") else f"python {script}"  # as the user types it
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(f"cannot read the command line {' '.join(overrides)!r}: {str(err).splitlines()[0]}") from None
    groups = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
    plain = [o.input_line for o in parsed if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    sweeps = [o for o in parsed if o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if sweeps and not multirun:
        raise ConfigError(f"{sweeps[0].input_line}: a comma-separated value needs -m to sweep over it, or [a,b] for a list, "
                          "or quotes for a string")

    def composed(lines: list[str]) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name=script):
            return compose(config_name=config_name, overrides=lines)

    try:
        cfg = composed(plain)
    except MissingConfigException as err:  # a config group option that does not exist
        text = str(err)
        first = text.splitlines()[0]
        options = []
        if "Available options" in text:
            for line in text.split("Available options", 1)[1].splitlines()[1:]:
                if not line.startswith("\t"):
                    break
                options.append(line.strip())
        bad = next((o.input_line for o in parsed if f"'{o.key_or_group}/" in first), " ".join(overrides))
        raise ConfigError(f"{bad}: {first.split(': ', 1)[-1]}{'; available: ' + ', '.join(options) if options else ''}") from None
    except HydraException as err:
        text = str(err)
        bad = next((o for o in parsed if f"'{o.key_or_group}'" in text.splitlines()[0]), None)
        if bad is not None and "Could not override" in text:
            others = [line for line in plain if line != bad.input_line]
            keys = _dotted_keys(composed(others)) + groups
            raise ConfigError(f"{bad.input_line}: {script} has no setting '{bad.key_or_group}'{_near(bad.key_or_group, keys)} "
                              f"(every setting: {command} --cfg job)") from None
        raise ConfigError(f"{' '.join(overrides)}: {text.splitlines()[0]}") from None
    if not multirun:
        return
    keys = _dotted_keys(cfg) + groups
    for sweep in sweeps:
        if sweep.key_or_group not in keys and OmegaConf.select(cfg, sweep.key_or_group, default=None) is None:
            raise ConfigError(f"{sweep.input_line}: {script} has no setting '{sweep.key_or_group}'{_near(sweep.key_or_group, keys)} "
                              f"(every setting: {command} --cfg job)")
