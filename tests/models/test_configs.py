"""Every configs/model, configs/op and configs/policy file builds what it names."""
import inspect
from pathlib import Path

import pytest
import torch
import yaml

import dynconv
import models
from dynconv.replace import Policy

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def load(path: Path) -> dict:
    assert path.read_text().startswith("# "), f"{path} must start with a one-line comment"
    return yaml.safe_load(path.read_text())


OURS = sorted(p for p in (CONFIGS / "model").glob("*.yaml") if p.stem != "timm")


@pytest.mark.parametrize("path", OURS, ids=lambda p: p.stem)
def test_model_configs_build(path):
    cfg = load(path)
    assert cfg["name"] in models.list_models()  # the file name may be a preset (resnet50_small)
    face = path.stem.startswith("face")
    with torch.device("meta"):
        model, _ = models.build(cfg, None, load(CONFIGS / "policy" / "none.yaml"), num_classes=512 if face else 10,
                                input_size=(96, 96) if face else (64, 64))
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("path", OURS, ids=lambda p: p.stem)
def test_model_configs_hold_only_what_differs_from_the_builder(path):
    cfg = load(path)
    spec = models._factory._MODELS[cfg.pop("name")]
    defaults = {k: p.default for k, p in inspect.signature(spec.builder).parameters.items()}
    assert all(k in defaults and k not in spec.fixed and v != defaults[k] for k, v in cfg.items()), (cfg, defaults)


def test_timm_config_builds_timms_model():
    cfg = load(CONFIGS / "model" / "timm.yaml")
    with torch.device("meta"):
        model, report = models.build(cfg, None, load(CONFIGS / "policy" / "none.yaml"), num_classes=10)
    assert type(model).__module__.startswith("timm.models.") and report == []


def test_op_configs_cover_every_operator():
    ops = {p.stem: load(p) for p in (CONFIGS / "op").glob("*.yaml")}
    assert set(ops) - {"default"} == set(dynconv.list_ops())
    assert ops["default"]["name"] is None
    for name, cfg in ops.items():
        if name == "default":
            continue
        opts = {k: v for k, v in cfg.items() if k != "name"}
        assert cfg["name"] == name
        extra = {"input_size": (8, 8)} if name == "tvconv" else {}
        op = dynconv.create_op(name, 16, 16, 3, **opts, **extra)
        assert op(torch.randn(2, 16, 8, 8)).shape == (2, 16, 8, 8)


def test_policy_configs_parse():
    for path in (CONFIGS / "policy").glob("*.yaml"):
        assert Policy.parse(load(path)).name == path.stem
