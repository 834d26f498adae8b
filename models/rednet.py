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
from ._layers import ConvNormAct, make_divisible, mmcv_init, recomputed
from .resnet import ResNet


class RedNetStem(nn.Sequential):
    """conv3×3/2 (32) → 3×3 slot → BN → ReLU → conv3×3 (64) [→ max-pool], children numbered as mmcls.

    With `recompute` (the default) autograd keeps none of the stem's activations (seven maps at
    half resolution, where ResNet's stem keeps two and the pooling indices) but the image, and the
    backward recomputes them: 9.5% of RedNet-50's forward MACs (0.25 of 2.65 G), for the values and gradients of
    the plain stem and its BatchNorm running statistics updated once.
    """

    def __init__(self, in_chans: int, width: float, small_input: bool, kernel_size: int, recompute: bool = True):
        mid, out = make_divisible(32 * width, 16), make_divisible(64 * width, 16)
        layers = [ConvNormAct(in_chans, mid, 3, 1 if small_input else 2), Slot(mid, mid, kernel_size),
                  nn.BatchNorm2d(mid), nn.ReLU(inplace=True), ConvNormAct(mid, out, 3)]
        super().__init__(*layers, *([] if small_input else [nn.MaxPool2d(3, 2, 1)]))
        self.recompute = recompute

    def forward(self, x):
        return recomputed(list(self), x) if self.recompute else super().forward(x)


def rednet(num_classes=1000, in_chans=3, *, depth: int = 50, width: float = 1.0, small_input: bool = False,
           drop_rate: float = 0.0, kernel_size: int = 7, stem_kernel_size: int = 3,
           recompute_stem: bool = True) -> ResNet:
    """RedNet-`depth` (26, 38, 50, 101, 152); `kernel_size`/`stem_kernel_size` are the slots' sizes;
    `recompute_stem` trades the stem's first half's kept activations for a recomputation (`RedNetStem`)."""
    if depth not in (26, 38, 50, 101, 152):
        raise ValueError(f"RedNet depth must be one of 26, 38, 50, 101, 152; got {depth}")
    model = ResNet(depth, num_classes, in_chans, width, small_input, drop_rate,
                   stem=RedNetStem(in_chans, width, small_input, stem_kernel_size, recompute_stem),
                   spatial=partial(_slot, kernel_size))
    if num_classes:
        nn.init.normal_(model.fc.weight, 0, 0.01)
        nn.init.zeros_(model.fc.bias)
    return model


def _slot(kernel_size: int, ch: int, stride: int) -> Slot:
    return Slot(ch, ch, kernel_size, stride)


# the official checkpoints' eval transform: mmcls's ImageNet test pipeline (resize 256, center crop 224, bilinear)
_CFG = dict(first_conv="stem.0.conv", classifier="fc", origin_url="https://github.com/d-li14/involution",
            paper_ids="arXiv:2103.06255",
            paper_name="Involution: Inverting the Inherence of Convolution for Visual Recognition")
register("rednet", rednet, cfg=_CFG, op="involution", init=mmcv_init)
for _d in (26, 38, 50, 101, 152):
    register(f"rednet{_d}", rednet, cfg=_CFG, fixed={"depth": _d}, op="involution", init=mmcv_init)
