"""Official-checkpoint loaders, tested with state_dicts built from the official key lists
(tests/models/official_keys: the listed shapes, random values)."""
import re
from pathlib import Path

import pytest
import timm
import torch

import models
from scripts import convert_checkpoint

KEYS = Path(__file__).parent / "official_keys"  # copied from the shared reference (key\tshape lists)
CASES = [("rednet26", "rednet26", None), ("rednet50", "rednet50", None), ("ddf_mul_resnet50", "ddf_mul_resnet50", None),
         ("resnet18_dcd", "resnet18_dcd", None), ("resnet50_dcd", "resnet50_dcd", None),
         ("mobilenetv2_dcd", "mobilenetv2_dcd", None), ("face_mobilenetv2_x1_0_base", "face_mobilenetv2_x1_0", None),
         ("face_mobilenetv2_x1_0_tvconv", "face_mobilenetv2_x1_0", "tvconv")]


def official_state_dict(file: str, seed: int = 0) -> dict:
    """The listed keys with the listed shapes; integer buffers get integers, the rest normal values."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for line in (KEYS / f"{file}.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape = line.split("\t")
        shape = tuple(int(s) for s in re.findall(r"\d+", shape))
        integer = key.endswith("num_batches_tracked") or re.search(r"\.(TVConv_k\w*|stride|channels|h|w)$", key)
        sd[key] = torch.randint(0, 100, shape, generator=g) if integer else torch.randn(shape, generator=g)
    return sd


def empty_model(arch, op=None):
    """The model's structure on the meta device, then uninitialised CPU storage: the checkpoint fills it."""
    with torch.device("meta"):
        model = timm.create_model(arch, op=op, input_size=(96, 96) if arch.startswith("face") else (64, 64))
    return model.to_empty(device="cpu")


@pytest.mark.parametrize("file,arch,op", CASES, ids=[c[0] for c in CASES])
def test_official_keys_load_one_by_one(file, arch, op):
    sd = official_state_dict(file)
    model = models.load_official(empty_model(arch, op), {"state_dict": {f"module.{k}": v for k, v in sd.items()}})
    ours, convert = model.state_dict(), models.official.converter(arch)
    used = 0
    for key, value in sd.items():
        new = convert(key, model)
        if new is not None:
            assert torch.equal(ours[new], value), key
            used += 1
    assert used == len(ours)  # every tensor of ours came from the checkpoint


def test_errors_name_missing_unexpected_and_mismatched_keys():
    model = empty_model("rednet26")
    sd = official_state_dict("rednet26")
    del sd["backbone.layer1.0.conv2.conv2.conv.bias"]
    sd["backbone.layer9.bogus.weight"] = torch.zeros(3)
    sd["head.fc.weight"] = torch.zeros(10, 2048)
    with pytest.raises(KeyError) as e:
        models.load_official(model, sd)
    msg = str(e.value)
    assert "missing keys ['layer1.0.conv2.conv2.conv.bias']" in msg
    assert "unexpected keys ['backbone.layer9.bogus.weight']" in msg
    assert "head.fc.weight (10, 2048) → fc.weight (1000, 2048)" in msg


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="no official checkpoint layout for 'dynconv_resnet50'"):
        models.official.converter("dynconv_resnet50")


def test_convert_checkpoint_script(tmp_path):
    sd = official_state_dict("rednet26", seed=1)
    torch.save({"state_dict": sd}, tmp_path / "official.pth")
    convert_checkpoint.main(["--arch", "rednet26", str(tmp_path / "official.pth"), str(tmp_path / "ours.pth")])
    ours = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert torch.equal(ours["stem.1.conv2.conv.weight"], sd["backbone.stem.1.conv2.conv.weight"])
    assert torch.equal(ours["fc.bias"], sd["head.fc.bias"])
    assert len(ours) == len(sd)
