"""MobileNetV2 (Sandler et al. 2018, Table 2), in torchvision's module layout, and the paper models built
on it: the DCD MobileNetV2 (both 1×1 convs of every t ≠ 1 block are DCD slots, DYCls classifier) and
the TVConv face MobileNetV2 (models/face.py).

`width` is the width multiplier; `small_input` makes the stem and the first stride-2 stage stride 1
(total stride 8, for 28–96 px inputs).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dynconv.replace import Slot

from ._backbone import Backbone, ClassifierHead, HeadDelegate, level
from ._factory import register
from ._layers import kaiming_conv_init, make_divisible, mobilenet_init

# (expansion t, channels c, blocks n, stride s) per stage, Table 2
SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn_act(in_ch: int, out_ch: int, k: int, stride: int = 1, groups: int = 1, slot: bool = False) -> nn.Sequential:
    """conv (or an operator slot) → BN → ReLU6, numbered like torchvision's Conv2dNormActivation."""
    conv = (Slot(in_ch, out_ch, k, stride, groups=groups) if slot
            else nn.Conv2d(in_ch, out_ch, k, stride, (k - 1) // 2, groups=groups, bias=False))
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1×1 expand → 3×3 depthwise (stride) → 1×1 project, residual when shapes allow (§3.3)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, t: int, dw_slot: bool = False, pw_slot: bool = False):
        super().__init__()
        hidden = int(round(in_ch * t))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers = [conv_bn_act(in_ch, hidden, 1, slot=pw_slot)] if t != 1 else []
        layers.append(conv_bn_act(hidden, hidden, 3, stride, groups=hidden, slot=dw_slot))
        project = (Slot(hidden, out_ch, 1) if pw_slot and t != 1
                   else nn.Conv2d(hidden, out_ch, 1, bias=False))
        layers += [project, nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(HeadDelegate, Backbone):
    """`features` (stem, inverted residuals, last 1×1 conv) then `head` (pool + classifier, or the face
    nets' embedding layer); a feature level at the last layer of each resolution."""

    def __init__(self, head: nn.Module, in_chans: int = 3, width: float = 1.0, setting=SETTING,
                 stem_stride: int = 2, last_channel: int = 1280, dw_slots: bool = False, pw_slots: bool = False):
        super().__init__()
        in_ch = make_divisible(32 * width)
        self.num_features = make_divisible(last_channel * max(1.0, width))
        layers, shapes = [conv_bn_act(in_chans, in_ch, 3, stem_stride)], [(in_ch, stem_stride)]
        for t, c, n, s in setting:
            out_ch = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t, dw_slots, pw_slots))
                shapes.append((out_ch, s if i == 0 else 1))
                in_ch = out_ch
        layers.append(conv_bn_act(in_ch, self.num_features, 1))
        shapes.append((self.num_features, 1))
        self.features = nn.Sequential(*layers)
        self.trunk = [f"features.{i}" for i in range(len(layers))]
        self.feature_info, reduction = [], 1
        for i, (channels, stride) in enumerate(shapes):
            reduction *= stride
            if i == len(shapes) - 1 or shapes[i + 1][1] > 1:
                self.feature_info.append(level(channels, reduction, f"features.{i}"))
        self.head = head
        self.num_classes, self.head_hidden_size = head.num_classes, head.head_hidden_size
        kaiming_conv_init(self, zero_bias=True, linear_std=0.01)


def _setting(small_input: bool):
    # the first stride-2 stage keeps its resolution on small inputs
    return tuple((t, c, n, 1 if small_input and c == 24 else s) for t, c, n, s in SETTING)


def mobilenetv2(num_classes=1000, in_chans=3, *, width: float = 1.0, small_input: bool = False,
                dropout: float = 0.2) -> MobileNetV2:
    """ImageNet MobileNetV2 (torchvision layout; 3,504,872 parameters at width 1.0)."""
    last = make_divisible(1280 * max(1.0, width))
    return MobileNetV2(ClassifierHead(last, num_classes, dropout), in_chans, width, _setting(small_input),
                       1 if small_input else 2)


def mobilenetv2_dcd(num_classes=1000, in_chans=3, *, width: float = 1.0, small_input: bool = False,
                    dropout: float = 0.2) -> MobileNetV2:
    """DCD MobileNetV2 (`mobilenetv2_dcd.py`): both 1×1 convs of every t ≠ 1 block are slots, filled by
    `dcd_mbv2` (DYModule) by default; depthwise convs and the t = 1 block stay static; DYCls classifier."""
    from dynconv.ops.dcd import DYCls

    last = make_divisible(1280 * max(1.0, width))
    head = ClassifierHead(last, num_classes, dropout, DYCls)
    return MobileNetV2(head, in_chans, width, _setting(small_input), 1 if small_input else 2, pw_slots=True)


_CFG = dict(first_conv="features.0.0", classifier="head.fc", paper_ids="arXiv:1801.04381",
            paper_name="MobileNetV2: Inverted Residuals and Linear Bottlenecks")
register("mobilenetv2", mobilenetv2, cfg=_CFG, policy="all_3x3", init=mobilenet_init)
register("mobilenetv2_dcd", mobilenetv2_dcd, op="dcd_mbv2", init=mobilenet_init, cfg={
    **_CFG, "classifier": ("head.fc.cls", "head.fc.cls_p", "head.fc.fc_scale"),
    "origin_url": "https://github.com/liyunsheng13/dcd", "paper_ids": "arXiv:2103.08756",
    "paper_name": "Revisiting Dynamic Convolution via Matrix Decomposition"})
