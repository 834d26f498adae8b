"""The face data configs build their datasets (keys: DataConfig's plus the face keys of data/face/build.py)."""
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from data.config import DataConfig
from data.face.build import FACE_DATASETS

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"
FACE_KEYS = {"num_test", "fold", "val_sets", "pairs_root"}


def load(name):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    assert set(cfg) <= set(asdict(DataConfig())) | FACE_KEYS, set(cfg) - set(asdict(DataConfig())) - FACE_KEYS
    return SimpleNamespace(**{**asdict(DataConfig()), "num_test": 10, "fold": 0, **cfg})


def test_orl_config_builds():
    train, val_sets, info = FACE_DATASETS["orl"](load("orl"))
    assert info.num_classes == 30 and info.input_size == (96, 96) and info.mean == (0.5,) * 3
    assert train[0][0].shape == (3, 96, 96) and [v.name for v in val_sets] == ["orl"]


@pytest.mark.parametrize("name", ["face_rec", "face_folder"])
def test_folder_configs_need_a_root(name):
    with pytest.raises(ValueError, match="needs data.root"):
        FACE_DATASETS[name](load(name))
