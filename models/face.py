"""Face-recognition backbones of the TVConv paper (Chen et al., CVPR 2022; official `mobilenetv2.py`,
`shufflenetv2.py`): 96×96 input, stride-1 stem, and a 512-d embedding layer.

Every depthwise 3×3 conv is an operator slot: `op=dwconv` (the default) is the baseline,
`op=tvconv` the paper's TVConv model (each TVConv gets its layer's input size from the dry pass).
The backbones return the embedding; the margin head (AM-Softmax) is separate (models/face_heads.py).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from dynconv.replace import Slot

from ._factory import register
from ._layers import kaiming_conv_init, mobilenet_init
from .mobilenetv2 import SETTING, MobileNetV2

EMBEDDING_DIM = 512


def embedding_head(in_channels: int, embedding_dim: int, dropout: float) -> nn.Sequential:
    """Official `OutputLayer`: BN2d → dropout → average pool → Linear → BN1d."""
    return nn.Sequential(OrderedDict(
        norm=nn.BatchNorm2d(in_channels), drop=nn.Dropout(dropout), pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(1), fc=nn.Linear(in_channels, embedding_dim), bn=nn.BatchNorm1d(embedding_dim)))


def _embedding_dim(num_classes, embedding_dim: int) -> int:
    if num_classes not in (None, 0, embedding_dim):
        raise ValueError(f"face backbones output an embedding_dim={embedding_dim} embedding, not {num_classes} "
                         "class scores; the margin head (models/face_heads.py) maps it to the identities")
    return embedding_dim


def face_mobilenetv2(num_classes=None, in_chans=3, *, width: float = 1.0, embedding_dim: int = EMBEDDING_DIM,
                     dropout: float = 0.0) -> MobileNetV2:
    """Face MobileNetV2: stride-1 stem, last 1×1 conv to 512 channels, embedding layer; every
    depthwise conv (the t = 1 block's too) is a slot."""
    emb = _embedding_dim(num_classes, embedding_dim)
    return MobileNetV2(embedding_head(512, emb, dropout), in_chans, width, SETTING, stem_stride=1,
                       last_channel=512, dw_slots=True)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2 unit (Ma et al. 2018, Fig. 3c/d): split (or two branches when strided), concat, shuffle."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride, mid = stride, out_ch // 2
        if stride > 1:
            self.branch1 = nn.Sequential(Slot(in_ch, in_ch, 3, stride, groups=in_ch), nn.BatchNorm2d(in_ch),
                                         nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.branch2 = nn.Sequential(
            nn.Conv2d(in_ch if stride > 1 else mid, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            Slot(mid, mid, 3, stride, groups=mid), nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        b, c, h, w = out.shape
        return out.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


SHUFFLE_CHANNELS = {0.5: (24, 48, 96, 192, 1024), 1.0: (24, 116, 232, 464, 1024), 1.5: (24, 176, 352, 704, 1024),
                    2.0: (24, 244, 488, 976, 2048)}


class ShuffleNetV2(nn.Module):
    """conv 3×3/1 → max-pool → stages of (4, 8, 4) units → conv 1×1 → embedding layer."""

    def __init__(self, channels, embedding_dim: int, in_chans: int = 3, dropout: float = 0.0, repeats=(4, 8, 4)):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, channels[0], 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = channels[0]
        for i, (n, out_ch) in enumerate(zip(repeats, channels[1:-1])):
            units = [ShuffleBlock(in_ch if j == 0 else out_ch, out_ch, 2 if j == 0 else 1) for j in range(n)]
            self.add_module(f"stage{i + 2}", nn.Sequential(*units))
            in_ch = out_ch
        self.conv5 = nn.Sequential(nn.Conv2d(in_ch, channels[-1], 1, bias=False), nn.BatchNorm2d(channels[-1]),
                                   nn.ReLU(inplace=True))
        self.num_features = channels[-1]
        self.head = embedding_head(channels[-1], embedding_dim, dropout)
        kaiming_conv_init(self, zero_bias=True, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.head(self.conv5(self.stage4(self.stage3(self.stage2(x)))))


def face_shufflenetv2(num_classes=None, in_chans=3, *, width: float = 1.0, embedding_dim: int = EMBEDDING_DIM,
                      dropout: float = 0.0) -> ShuffleNetV2:
    """Face ShuffleNetV2 ×`width` (0.5, 1.0, 1.5, 2.0); both depthwise convs of every unit are slots."""
    if width not in SHUFFLE_CHANNELS:
        raise ValueError(f"face_shufflenetv2 width must be one of {sorted(SHUFFLE_CHANNELS)}, got {width}")
    return ShuffleNetV2(SHUFFLE_CHANNELS[width], _embedding_dim(num_classes, embedding_dim), in_chans, dropout)


_FACE = dict(op="dwconv", policy="dw_only", input_size=(96, 96), init=mobilenet_init)
register("face_mobilenetv2", face_mobilenetv2, **_FACE)
for _w in (0.1, 0.2, 0.3, 0.5, 1.0):
    register(f"face_mobilenetv2_x{str(_w).replace('.', '_')}", face_mobilenetv2, fixed={"width": _w}, **_FACE)
register("face_shufflenetv2", face_shufflenetv2, **_FACE)
for _w in (0.5, 1.0, 1.5):
    register(f"face_shufflenetv2_x{str(_w).replace('.', '_')}", face_shufflenetv2, fixed={"width": _w}, **_FACE)
