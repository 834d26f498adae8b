"""ResNet (He et al. 2016, Table 1) and the paper models built on it with operator slots:
DDF-ResNet (every bottleneck 3×3 conv is a DDF slot), DCD ResNet (every block conv is a DCD slot,
DYCls classifier), and RedNet (models/rednet.py: 7×7 involution slots, its own stem).

Module names follow timm/torchvision inside the stages (`layer1.0.conv2`, `downsample.0`, `fc`); the
stem is `stem` (`stem.conv`, `stem.bn`). `width` scales every channel count (to multiples of 16, so
that operators with 16-channel groups fit); `small_input` swaps the 7×7/2 stem and max-pool for a
3×3/1 conv, for 28–96 px inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d

from dynconv.replace import Slot

from ._backbone import Backbone, PooledClassifier, level
from ._factory import register
from ._layers import ConvNormAct, kaiming_conv_init, make_divisible, timm_init

# a block's spatial conv: (channels, stride) → module
Spatial = Callable[[int, int], nn.Module]


def conv3x3(ch: int, stride: int) -> nn.Module:
    return nn.Conv2d(ch, ch, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, spatial: Spatial = conv3x3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = spatial(planes, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    """1×1 → spatial k×k (carries the stride, 'pytorch' style) → 1×1 ×4, residual."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, spatial: Spatial = conv3x3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = spatial(planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.act = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + (self.downsample(x) if self.downsample is not None else x))


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 26: (Bottleneck, (1, 2, 4, 1)), 34: (BasicBlock, (3, 4, 6, 3)),
          38: (Bottleneck, (2, 3, 5, 2)), 50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
          152: (Bottleneck, (3, 8, 36, 3))}


def plain_stem(in_chans: int, out_ch: int, small_input: bool) -> nn.Sequential:
    if small_input:
        return ConvNormAct(in_chans, out_ch, 3, 1)
    stem = ConvNormAct(in_chans, out_ch, 7, 2)
    stem.add_module("pool", nn.MaxPool2d(3, 2, 1))
    return stem


class ResNet(PooledClassifier, Backbone):
    """`stem` → four stages of blocks (`layer1`…`layer4`) → global average pool → dropout → `fc`; feature
    levels: the stem, then each stage."""

    def __init__(self, depth: int, num_classes: int = 1000, in_chans: int = 3, width: float = 1.0,
                 small_input: bool = False, drop_rate: float = 0.0, stem: nn.Module | None = None,
                 spatial: Spatial = conv3x3, zero_init_last: bool = True,
                 make_classifier: Callable[[int, int], nn.Module] = nn.Linear):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth {depth} is not one of {sorted(DEPTHS)}")
        block, layers = DEPTHS[depth]
        in_ch = make_divisible(64 * width, 16)
        self.stem = stem if stem is not None else plain_stem(in_chans, in_ch, small_input)
        reduction = 1 if small_input else 4
        self.trunk, self.feature_info = ["stem"], [level(in_ch, reduction, "stem")]
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            planes = make_divisible(planes * width, 16)
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, planes, 2 if i > 0 and j == 0 else 1, spatial))
                in_ch = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            reduction *= 2 if i > 0 else 1  # layer1 keeps the stem's resolution
            self.trunk.append(f"layer{i + 1}")
            self.feature_info.append(level(in_ch, reduction, f"layer{i + 1}"))
        self.num_features = self.head_hidden_size = in_ch
        self.make_classifier = make_classifier
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)
        kaiming_conv_init(self)
        if zero_init_last:  # each block starts as the identity (Goyal et al. 2017)
            for b in self.blocks():
                nn.init.zeros_((b.bn3 if isinstance(b, Bottleneck) else b.bn2).weight)

    def blocks(self) -> list[nn.Module]:
        return [b for i in range(1, 5) for b in getattr(self, f"layer{i}")]


def slot3x3(ch: int, stride: int) -> Slot:
    return Slot(ch, ch, 3, stride)


def resnet(num_classes=1000, in_chans=3, *, depth: int = 50, width: float = 1.0, small_input: bool = False,
           drop_rate: float = 0.0) -> ResNet:
    """Plain ResNet (timm's init: kaiming fan_out, zero-init last BN of each block)."""
    return ResNet(depth, num_classes, in_chans, width, small_input, drop_rate)


def ddf_resnet(num_classes=1000, in_chans=3, *, depth: int = 50, width: float = 1.0, small_input: bool = False,
               drop_rate: float = 0.0) -> ResNet:
    """DDF-ResNet (DDF paper, `ddf_resnet.py` on timm's ResNet): every bottleneck 3×3 conv is a slot."""
    if DEPTHS.get(depth, (None,))[0] is not Bottleneck:
        raise ValueError(f"DDF-ResNet needs a bottleneck depth (26, 38, 50, 101, 152), got {depth}")
    return ResNet(depth, num_classes, in_chans, width, small_input, drop_rate, spatial=slot3x3)


def resnet_dcd(num_classes=1000, in_chans=3, *, depth: int = 50, width: float = 1.0, small_input: bool = False,
               drop_rate: float = 0.0) -> ResNet:
    """DCD ResNet (`resnet_dcd.py`): every block conv is a slot (conv_dy; BasicBlock convs take the 2×2
    pooled context of conv_basic_dy), the classifier is DYCls; the downsample convs stay static.
    No zero-init of the last BN (torchvision's default, which the official code keeps)."""
    from dynconv.ops.dcd import DYCls

    model = ResNet(depth, num_classes, in_chans, width, small_input, drop_rate, zero_init_last=False,
                   make_classifier=DYCls)
    for b in model.blocks():
        basic = isinstance(b, BasicBlock)
        for name in ("conv1", "conv2") if basic else ("conv1", "conv2", "conv3"):
            setattr(b, name, Slot.like(getattr(b, name), {"dcd": {"context": "pool2"}} if basic else None))
    return model


_RESNET = dict(first_conv="stem.conv", classifier="fc", paper_ids="arXiv:1512.03385",
               paper_name="Deep Residual Learning for Image Recognition")
# DDF's timm 0.4.5 config (ddf_resnet.py): bicubic
_DDF = dict(first_conv="stem.conv", classifier="fc", interpolation="bicubic",
            origin_url="https://github.com/theFoxofSky/ddfnet", paper_ids="arXiv:2104.14107",
            paper_name="Decoupled Dynamic Filter Networks")
# DYCls's layers with one output per class
_DCD = dict(first_conv="stem.conv", classifier=("fc.cls", "fc.cls_p", "fc.fc_scale"),
            origin_url="https://github.com/liyunsheng13/dcd", paper_ids="arXiv:2103.08756",
            paper_name="Revisiting Dynamic Convolution via Matrix Decomposition")
# `dynconv_` prefix: timm has its own resnet18/50/101, which `import models` must leave alone
register("dynconv_resnet", resnet, cfg=_RESNET, policy="all_3x3", init=timm_init)
for _d in (18, 50, 101):
    register(f"dynconv_resnet{_d}", resnet, cfg=_RESNET, fixed={"depth": _d}, policy="all_3x3", init=timm_init)
register("ddf_resnet", ddf_resnet, cfg=_DDF, op="ddf", init=timm_init)
for _d in (50, 101):
    for _c in ("mul", "add"):
        register(f"ddf_{_c}_resnet{_d}", ddf_resnet, cfg=_DDF, fixed={"depth": _d}, op="ddf",
                 op_kwargs={"kernel_combine": _c}, init=timm_init)
register("resnet_dcd", resnet_dcd, cfg=_DCD, op="dcd", init=timm_init)
for _d in (18, 50):
    register(f"resnet{_d}_dcd", resnet_dcd, cfg=_DCD, fixed={"depth": _d}, op="dcd", init=timm_init)
__all__ = ["ResNet", "BasicBlock", "Bottleneck", "DEPTHS", "resnet", "ddf_resnet", "resnet_dcd"]
