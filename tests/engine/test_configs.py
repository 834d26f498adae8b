"""Every config in configs/ composes against the schema; experiments override only existing keys."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from engine.config import validate
from tests.engine.conftest import compose_cfg

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONFIGS / g).glob("*.yaml"))]
# groups selected in train.yaml's defaults list are overridden; the others are added with `+`
PRIMARY = {line.split(":")[0].strip(" -") for line in (CONFIGS / "train.yaml").read_text().splitlines()
           if line.startswith("  - ")}


def _compose(overrides):
    return compose_cfg(overrides)


def test_default_config_composes():
    cfg = _compose([])
    assert cfg.model.name and cfg.op.name is None and cfg.policy.name == "none"  # op: the model's own
    assert cfg.data.name == "fashion_mnist" and cfg.task.name == "classification"


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    cfg = _compose([f"{'' if group in PRIMARY else '+'}{group}={option}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    validate(cfg)  # only schema keys, every value in range


def test_misspelt_key_is_rejected_at_compose_time():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        _compose(["trainer.epoch=3"])
    assert "epoch" in str(err.value.__cause__ or err.value)


def test_wrong_type_is_rejected_at_compose_time():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose(["optim.momentum=fast"])
