"""Official checkpoints → our models: key converters and `load_official`.

Operators name their submodules like the official ones, so a converter only maps the backbone's
layout: mmcls's `backbone.`/`head.fc.` prefixes (RedNet), timm/torchvision's top-level `conv1`/`bn1`
stem and `classifier.0` (DDF-ResNet, DCD), the DCD MobileNetV2's flat block numbering, and the face
nets' `output_layer`. Official buffers that hold no state (TVConv's stored sizes) are dropped.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn

# official key → our key, or None for a buffer we drop; `model` gives layout facts the keys lack
Converter = Callable[[str, nn.Module], "str | None"]

# TVConv's constructor arguments, stored as buffers by the official module
_TVCONV_SIZE_BUFFERS = re.compile(r"\.(TVConv_k|TVConv_k_square|stride|channels|h|w)$")


def _sub(rules: list[tuple[str, str]]) -> Converter:
    def convert(key: str, model: nn.Module) -> str:
        for pattern, repl in rules:
            key, n = re.subn(pattern, repl, key)
            if n:
                return key
        return key

    return convert


_TORCH_RESNET = [(r"^conv1\.", "stem.conv."), (r"^bn1\.", "stem.bn."), (r"^classifier\.0\.", "fc.")]
rednet_keys = _sub([(r"^backbone\.", ""), (r"^head\.fc\.", "fc.")])
resnet_keys = _sub(_TORCH_RESNET)  # timm 0.4.5 (DDF-ResNet) and DCD's torchvision-style ResNet

# DCD MobileNetV2 numbers each block's layers flat; ours nests conv-BN-ReLU6 like torchvision
_DCD_BLOCK = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_DCD_BLOCK_T1 = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}


def mobilenetv2_dcd_keys(key: str, model: nn.Module) -> str:
    m = re.match(r"^features\.(\d+)\.conv\.(\d+)\.(.*)$", key)
    if m:
        block, idx, rest = m.groups()
        table = _DCD_BLOCK_T1 if len(model.features[int(block)].conv) == 3 else _DCD_BLOCK
        return f"features.{block}.conv.{table.get(idx, idx)}.{rest}"
    return _sub([(r"^conv\.", f"features.{len(model.features) - 1}."), (r"^classifier\.0\.", "head.fc.")])(key, model)


def face_keys(key: str, model: nn.Module) -> str | None:
    if _TVCONV_SIZE_BUFFERS.search(key):
        return None
    return _sub([(r"^output_layer\.layer1\.", "head.norm."), (r"^output_layer\.layer2\.0\.", "head.fc."),
                 (r"^output_layer\.layer2\.1\.", "head.bn.")])(key, model)


class OfficialKeysError(KeyError):
    """An official checkpoint that does not fit the model; `missing`, `unexpected` and `mismatched` list the keys."""

    def __init__(self, arch: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        super().__init__(arch, missing, unexpected, mismatched)
        self.arch, self.missing, self.unexpected, self.mismatched = arch, missing, unexpected, mismatched

    def __str__(self) -> str:
        return (f"official {self.arch} checkpoint does not fit the model: missing keys {self.missing}; "
                f"unexpected keys {self.unexpected}; shape mismatches {self.mismatched}")


def converter(arch: str) -> Converter:
    """The key converter of registered model `arch`."""
    for pattern, conv in ((r"^rednet\d*$", rednet_keys), (r"^ddf_(mul|add)_resnet\d+$|^ddf_resnet$", resnet_keys),
                          (r"^resnet\d*_dcd$", resnet_keys), (r"^mobilenetv2_dcd$", mobilenetv2_dcd_keys),
                          (r"^face_mobilenetv2(_x\d_\d)?$", face_keys)):
        if re.match(pattern, arch):
            return conv
    raise ValueError(f"no official checkpoint layout for {arch!r}; known: rednet*, ddf_{{mul,add}}_resnet*, "
                     "resnet{18,50}_dcd, mobilenetv2_dcd, face_mobilenetv2_*")


def convert_state_dict(model: nn.Module, state_dict: dict, arch: str | None = None) -> dict:
    """Map an official state_dict onto `model`'s keys, checking that every key is used and every shape
    matches; the error names the missing, unexpected and mismatched keys."""
    arch = arch or getattr(model, "arch", None)
    if arch is None:
        raise ValueError("the model does not know its architecture (build it with timm.create_model or "
                         "models.build); pass arch=")
    convert = converter(arch)
    ours = model.state_dict()
    out, unexpected, mismatched, hit = {}, [], [], set()
    for key, value in state_dict.items():
        new = convert(key, model)
        if new is None:
            continue
        if new not in ours:
            unexpected.append(key)
            continue
        hit.add(new)
        if tuple(ours[new].shape) != tuple(value.shape):
            mismatched.append(f"{key} {tuple(value.shape)} → {new} {tuple(ours[new].shape)}")
        else:
            out[new] = value
    missing = [k for k in ours if k not in hit]
    if unexpected or missing or mismatched:
        raise OfficialKeysError(arch, missing, unexpected, mismatched)
    return out


def load_official(model: nn.Module, state_dict: dict, arch: str | None = None) -> nn.Module:
    """Load an official checkpoint (a state_dict, or a dict holding one under `state_dict`) into `model`."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DataParallel/DDP saves
    with torch.no_grad():
        model.load_state_dict(convert_state_dict(model, state_dict, arch), strict=True)
    return model


__all__ = ["load_official", "convert_state_dict", "converter", "OfficialKeysError"]
