"""A run folder is data, never code: a hostile config.yaml cannot make infer.py (or the benchmarks)
call anything, and a member file in the wrong stage's slot is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cmb.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A run folder with untrained (freshly initialized) final members and a chosen threshold."""
    from hydra.utils import instantiate

    from cmb.models.checkpoint import save_model

    cfg = _compose(["data.preset=tiny"])
    run = tmp_path / "run"
    for stage, node in (("unet", cfg.unet), ("cnn", cfg.cnn)):
        for bs in node.batch_sizes:
            member = run / "fold_final" / f"{stage}_bs{bs}"
            member.mkdir(parents=True)
            kwargs = OmegaConf.to_container(node.net, resolve=True)
            kwargs.pop("_target_")
            save_model(instantiate(node.net), kwargs, member / "model.pt", stage=stage, fold="final", batch_size=int(bs))
    cfg.preprocess.spacing = [0.5, 0.5, 1.0]  # a run writes the median voxel size it resolved (cmb.protocol.run), never "median"
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run / "results.json").write_text(json.dumps({"chosen_operating_point": {"threshold": 0.5, "rule": "test"}}))
    return run


def test_the_predictor_loads_a_normal_run_folder(run_folder: Path) -> None:
    from cmb.inference.predictor import Predictor

    predictor = Predictor(run_folder, progress=False)
    assert predictor.pre_cfg.n4 is True and predictor.threshold == 0.5


@pytest.mark.parametrize("hostile", ["top", "nested"])
def test_a_hostile_config_calls_nothing(run_folder: Path, tmp_path: Path, hostile: str) -> None:
    from cmb.inference.predictor import Predictor

    victim = tmp_path / "created_by_the_config"
    cfg = OmegaConf.load(run_folder / "config.yaml")
    attack = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    if hostile == "top":
        cfg.preprocess = attack
    else:
        cfg.preprocess.extra = {"payload": attack}
    (run_folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(DataError, match="not allowed") as err:
        Predictor(run_folder, progress=False)
    assert str(run_folder / "config.yaml") in str(err.value)
    assert not victim.exists()


def test_benchmarks_rebuild_only_allow_listed_datasets(tmp_path: Path) -> None:
    from cmb.conf_utils import dataset_from_run_config

    victim = tmp_path / "created_by_the_config"
    node = OmegaConf.create({"_target_": "builtins.open", "file": str(victim), "mode": "w"})
    with pytest.raises(DataError, match="is not one of the dataset readers"):
        dataset_from_run_config(node, tmp_path / "config.yaml")
    node = OmegaConf.create({"_target_": "cmb.data.readers.NiftiDataset", "root": {"_target_": "builtins.open", "file": str(victim),
                                                                                   "mode": "w"}})
    with pytest.raises(DataError, match="nested _target_"):
        dataset_from_run_config(node, tmp_path / "config.yaml")
    assert not victim.exists()


def test_a_cnn_member_in_a_unet_slot_is_refused(run_folder: Path) -> None:
    from cmb.inference.predictor import Predictor

    shutil.copy(run_folder / "fold_final" / "cnn_bs20" / "model.pt", run_folder / "fold_final" / "unet_bs20" / "model.pt")
    with pytest.raises(DataError, match="this is a cnn member .DouCNN., but a unet member .UNet3D. belongs here"):
        Predictor(run_folder, progress=False)
