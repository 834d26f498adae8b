"""build_datasets dispatch, the DataConfig schema, and every configs/data/*.yaml."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from data import DATASETS, DataConfig, build_datasets, data_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "data").glob("*.yaml"))


def test_unknown_name_lists_known():
    with pytest.raises(ValueError) as err:
        build_datasets({"name": "cifar10"})
    assert all(name in str(err.value) for name in DATASETS)


def test_schema_rejects_misspelt_key_and_wrong_type():
    with pytest.raises(ConfigKeyError, match="img_sise"):
        data_config({"img_sise": 32})
    with pytest.raises(ValidationError, match="channels"):
        data_config({"channels": "rgb"})
    with pytest.raises(ValueError, match=r"data.channels=2: must be 1 \(gray\) or 3 \(RGB\)"):
        build_datasets({"name": "synthetic", "channels": 2})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_file(path):
    """Each file (the face sets' too) has a comment on top, validates against DataConfig, names its dataset."""
    assert path.read_text().startswith("# ")
    cfg = data_config(OmegaConf.load(path))
    assert isinstance(cfg, DataConfig) and cfg.name == path.stem


NEED_A_ROOT = ("imagefolder", "face_rec", "face_folder")  # built on generated folders in their own tests


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem in DATASETS and p.stem not in NEED_A_ROOT],
                         ids=lambda p: p.stem)
def test_config_file_builds(path):
    cfg = OmegaConf.merge(OmegaConf.load(path), {"train_subset": 8, "img_size": 20})
    train, val, info = build_datasets(cfg)
    x, y = train[0]
    assert len(train) == 8 and len(val) > 0
    assert x.shape == (info.in_chans, 20, 20) and 0 <= y < info.num_classes


def test_every_config_is_listed():
    assert {p.stem for p in CONFIGS} >= set(DATASETS)
