"""RedNet (Li et al., CVPR 2021, "Involution", §4.1; official mmcls `rednet.py`).

ResNet whose every bottleneck 3×3 conv is a 7×7 operator slot (involution in the paper), with the
stem conv3×3/2 (32) → 3×3 slot → BN → ReLU → conv3×3 (64) → max-pool. Module names equal the
official ones below the mmcls `backbone.` prefix (`stem.0.conv`, `stem.1`, `layer1.0.conv2`, ...).
Init as mmcls: kaiming (fan_out) convs with zero bias, zero-init last BN of each block, fc N(0, 0.01).
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn

from dynconv.replace import Slot

from ._factory import register
from ._layers import ConvNormAct, make_divisible, mmcv_init
from .resnet import ResNet


def rednet_stem(in_chans: int, width: float, small_input: bool, kernel_size: int) -> nn.Sequential:
    mid, out = make_divisible(32 * width, 16), make_divisible(64 * width, 16)
    layers = [ConvNormAct(in_chans, mid, 3, 1 if small_input else 2), Slot(mid, mid, kernel_size),
              nn.BatchNorm2d(mid), nn.ReLU(inplace=True), ConvNormAct(mid, out, 3)]
    return nn.Sequential(*layers, *([] if small_input else [nn.MaxPool2d(3, 2, 1)]))


def rednet(num_classes=1000, in_chans=3, *, depth: int = 50, width: float = 1.0, small_input: bool = False,
           drop_rate: float = 0.0, kernel_size: int = 7, stem_kernel_size: int = 3) -> ResNet:
    """RedNet-`depth` (26, 38, 50, 101, 152); `kernel_size`/`stem_kernel_size` are the slots' sizes."""
    if depth not in (26, 38, 50, 101, 152):
        raise ValueError(f"RedNet depth must be one of 26, 38, 50, 101, 152; got {depth}")
    model = ResNet(depth, num_classes, in_chans, width, small_input, drop_rate,
                   stem=rednet_stem(in_chans, width, small_input, stem_kernel_size),
                   spatial=partial(_slot, kernel_size))
    nn.init.normal_(model.fc.weight, 0, 0.01)
    nn.init.zeros_(model.fc.bias)
    return model


def _slot(kernel_size: int, ch: int, stride: int) -> Slot:
    return Slot(ch, ch, kernel_size, stride)


register("rednet", rednet, op="involution", init=mmcv_init)
for _d in (26, 38, 50, 101, 152):
    register(f"rednet{_d}", rednet, fixed={"depth": _d}, op="involution", init=mmcv_init)
