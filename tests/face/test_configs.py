"""The face data configs build their datasets (keys: DataConfig's plus the face keys of data/face/build.py)."""
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import random

import pytest
import torch
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


def test_face_training_augmentation_options_reach_the_train_set_only():
    """crop_padding shifts and random erasing (TVConv's augmentation ablation) apply to training images;
    the verification set stays un-augmented; augment=false turns everything off, flips included."""
    base = load("orl")
    plain_train, plain_val, _ = FACE_DATASETS["orl"](SimpleNamespace(**{**vars(base), "augment": False}))
    strong = SimpleNamespace(**{**vars(base), "hflip": 0.0, "crop_padding": 8, "reprob": 1.0, "remode": "const"})
    train, val_sets, _ = FACE_DATASETS["orl"](strong)
    torch.manual_seed(0)
    random.seed(0)
    x, ref = train[0][0], plain_train[0][0]
    assert x.shape == ref.shape and not torch.equal(x, ref)
    assert (x == 0).sum() > (ref == 0).sum()  # the erased box and the shift's padding are zeros
    torch.testing.assert_close(val_sets[0].images[0][0], plain_val[0].images[0][0])
    assert val_sets[0].images.erase is None and val_sets[0].images.crop_padding == 0
    shifted = SimpleNamespace(**{**vars(strong), "reprob": 0.0})
    train, _, _ = FACE_DATASETS["orl"](shifted)
    h = ref.shape[-1]
    torch.manual_seed(1)
    y = train[0][0]
    assert any(torch.equal(y[..., max(0, dy):h + min(0, dy), max(0, dx):h + min(0, dx)],
                           ref[..., max(0, -dy):h + min(0, -dy), max(0, -dx):h + min(0, -dx)])
               for dy in range(-8, 9) for dx in range(-8, 9))  # a pure shift of the plain image
