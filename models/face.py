"""Face-recognition backbones of the TVConv paper (Chen et al., CVPR 2022; official `mobilenetv2.py`,
`shufflenetv2.py`): 96×96 input, stride-1 stem, and a 512-d embedding layer.

Every depthwise 3×3 conv is an operator slot: `op=dwconv` (the default) is the baseline,
`op=tvconv` the paper's TVConv model (each TVConv gets its layer's input size from the dry pass).
The backbones return the embedding; the margin head (AM-Softmax) is separate (models/face_heads.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d

from dynconv.replace import Slot

from ._backbone import Backbone, HeadDelegate, level
from ._factory import register
from ._layers import kaiming_conv_init, mobilenet_init
from .mobilenetv2 import SETTING, MobileNetV2

EMBEDDING_DIM = 512


class EmbeddingHead(nn.Module):
    """Official `OutputLayer`: BN2d → dropout → average pool → Linear → BN1d.

    The embedding is the output (`forward_head(pre_logits=True)` too): a face net has no classifier
    (`num_classes` 0, timm's "features" model); `reset_classifier(0, "")` drops the whole layer but the dropout,
    leaving the feature map (a feature extractor keeps no unused BatchNorm).
    """

    num_classes = 0

    def __init__(self, in_channels: int, embedding_dim: int, dropout: float):
        super().__init__()
        self.head_hidden_size = embedding_dim
        self.norm, self.drop = nn.BatchNorm2d(in_channels), nn.Dropout(dropout)
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.fc, self.bn = nn.Linear(in_channels, embedding_dim), nn.BatchNorm1d(embedding_dim)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.bn(self.fc(self.global_pool(self.drop(self.norm(x)))))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        _embedding_dim(num_classes, self.head_hidden_size)
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
            if not global_pool:
                self.head_hidden_size = self.norm.num_features
                self.norm, self.fc, self.bn = nn.Identity(), nn.Identity(), nn.Identity()

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False):
        return "fc" if name_only else self.fc


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
    return MobileNetV2(EmbeddingHead(512, emb, dropout), in_chans, width, SETTING, stem_stride=1,
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


class ShuffleNetV2(HeadDelegate, Backbone):
    """conv 3×3/1 → max-pool → stages of (4, 8, 4) units → conv 1×1 → embedding layer; a feature level at the
    last layer of each resolution."""

    def __init__(self, channels, embedding_dim: int, in_chans: int = 3, dropout: float = 0.0, repeats=(4, 8, 4)):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, channels[0], 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = channels[0]
        self.trunk = ["conv1", "maxpool"]
        self.feature_info = [level(channels[0], 1, "conv1"), level(channels[0], 2, "maxpool")]
        for i, (n, out_ch) in enumerate(zip(repeats, channels[1:-1])):
            units = [ShuffleBlock(in_ch if j == 0 else out_ch, out_ch, 2 if j == 0 else 1) for j in range(n)]
            self.add_module(f"stage{i + 2}", nn.Sequential(*units))
            self.trunk.append(f"stage{i + 2}")
            self.feature_info.append(level(out_ch, 2 ** (i + 2), f"stage{i + 2}"))
            in_ch = out_ch
        self.conv5 = nn.Sequential(nn.Conv2d(in_ch, channels[-1], 1, bias=False), nn.BatchNorm2d(channels[-1]),
                                   nn.ReLU(inplace=True))
        self.trunk.append("conv5")
        self.feature_info[-1] = level(channels[-1], self.feature_info[-1]["reduction"], "conv5")  # same resolution
        self.num_features = channels[-1]
        self.head = EmbeddingHead(channels[-1], embedding_dim, dropout)
        self.num_classes, self.head_hidden_size = self.head.num_classes, self.head.head_hidden_size
        kaiming_conv_init(self, zero_bias=True, linear_std=0.01)


def face_shufflenetv2(num_classes=None, in_chans=3, *, width: float = 1.0, embedding_dim: int = EMBEDDING_DIM,
                      dropout: float = 0.0) -> ShuffleNetV2:
    """Face ShuffleNetV2 ×`width` (0.5, 1.0, 1.5, 2.0); both depthwise convs of every unit are slots."""
    if width not in SHUFFLE_CHANNELS:
        raise ValueError(f"face_shufflenetv2 width must be one of {sorted(SHUFFLE_CHANNELS)}, got {width}")
    return ShuffleNetV2(SHUFFLE_CHANNELS[width], _embedding_dim(num_classes, embedding_dim), in_chans, dropout)


# TVConv's face data: 96×96 aligned crops, Normalize(0.5, 0.5), no resize or crop; no classifier (an embedding)
_FACE = dict(op="dwconv", policy="dw_only", init=mobilenet_init)
_FACE_CFG = dict(input_size=(3, 96, 96), pool_size=(6, 6), crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 num_classes=0, classifier="head.fc", origin_url="https://github.com/JierunChen/TVConv",
                 paper_ids="arXiv:2203.10489",
                 paper_name="TVConv: Efficient Translation Variant Convolution for Layout-aware Visual Processing")
_MBV2 = dict(_FACE, cfg={**_FACE_CFG, "first_conv": "features.0.0"})
_SHUFFLE = dict(_FACE, cfg={**_FACE_CFG, "first_conv": "conv1.0"})
register("face_mobilenetv2", face_mobilenetv2, **_MBV2)
for _w in (0.1, 0.2, 0.3, 0.5, 1.0):
    register(f"face_mobilenetv2_x{str(_w).replace('.', '_')}", face_mobilenetv2, fixed={"width": _w}, **_MBV2)
register("face_shufflenetv2", face_shufflenetv2, **_SHUFFLE)
for _w in (0.5, 1.0, 1.5):
    register(f"face_shufflenetv2_x{str(_w).replace('.', '_')}", face_shufflenetv2, fixed={"width": _w}, **_SHUFFLE)
