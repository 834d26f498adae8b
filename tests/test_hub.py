"""hubconf.py: `torch.hub.load(<clone>, name, source="local")` for the paper models, with `pretrained_file`."""
import importlib.util
from pathlib import Path

import pytest
import torch

import models

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_classes=10, input_size=(32, 32))  # RedNet-26 with a small head and a small dry pass


def hub_load(name, **kwargs):
    return torch.hub.load(str(ROOT), name, source="local", **kwargs)


@pytest.fixture(scope="module")
def reference():
    """RedNet-26's state_dict as built by `models`, with random weights the hub loads must reproduce."""
    torch.manual_seed(0)
    return {k: torch.randn_like(v) if v.is_floating_point() else v
            for k, v in models.create("rednet26", **SMALL).state_dict().items()}


def assert_weights(model, state):
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


def test_entry_points_are_the_registered_models():
    """What `torch.hub.list` and `torch.hub.help` report for a GitHub repo (they read no local folder)."""
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    names = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")]
    assert names == models.list_models()
    assert {"rednet26", "rednet50", "rednet152", "ddf_mul_resnet50", "ddf_add_resnet101", "resnet50_dcd",
            "mobilenetv2_dcd", "face_mobilenetv2_x1_0"} <= set(names)
    assert "pretrained_file" in hubconf.rednet50.__doc__


def test_load_builds_the_model():
    model = hub_load("rednet26", **SMALL).eval()
    assert model.arch == "rednet26"
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_pretrained_state_dict(tmp_path, reference):
    torch.save(reference, tmp_path / "ours.pth")
    assert_weights(hub_load("rednet26", pretrained_file=str(tmp_path / "ours.pth"), **SMALL), reference)


def test_pretrained_official_checkpoint(tmp_path, reference):
    """mmcls's layout (`backbone.` prefix, `head.fc.`, under `state_dict`) goes through `models.load_official`."""
    official = {("head." if k.startswith("fc.") else "backbone.") + k: v for k, v in reference.items()}
    torch.save({"state_dict": official, "meta": {"epoch": 130}}, tmp_path / "official.pth")
    assert_weights(hub_load("rednet26", pretrained_file=str(tmp_path / "official.pth"), **SMALL), reference)


def test_pretrained_trainer_checkpoint_and_its_ema(tmp_path, reference):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in reference.items()}
    torch.save({"model": reference, "ema": ema, "config": "model:\n  name: rednet26\n"}, tmp_path / "best.pt")
    assert_weights(hub_load("rednet26", pretrained_file=str(tmp_path / "best.pt"), use_ema=True, **SMALL), ema)


def test_pretrained_file_errors(tmp_path, reference):
    torch.save(reference, tmp_path / "ours.pth")
    fit = (r"does not fit rednet26 as built \(missing keys \[\], unexpected keys \[\], "
           r"other shapes \[.*'fc.bias \(10,\) vs \(5,\)'\]\)")
    with pytest.raises(ValueError, match=fit):
        hub_load("rednet26", pretrained_file=str(tmp_path / "ours.pth"), num_classes=5, input_size=(32, 32))
    torch.save({"model": reference, "ema": None, "config": ""}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"does not fit dynconv_resnet18 as built \(missing keys \['"):
        hub_load("dynconv_resnet18", pretrained_file=str(tmp_path / "last.pt"), **SMALL)
    with pytest.raises(ValueError, match="use_ema=True needs a last.pt/best.pt of train.py"):
        hub_load("rednet26", pretrained_file=str(tmp_path / "ours.pth"), use_ema=True, **SMALL)
    with pytest.raises(ValueError, match="holds no EMA weights"):
        hub_load("rednet26", pretrained_file=str(tmp_path / "last.pt"), use_ema=True, **SMALL)
