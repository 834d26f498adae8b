"""DDF: Decoupled Dynamic Filter (Zhou et al., CVPR 2021).

The filter at pixel (i, j) of channel c is a spatial filter S (one per pixel and head, from a
strided 1×1 conv) combined with a channel filter A (one per channel, from an SE-like branch on the
global average), Eq. 5: F = A ⊙ S (or A + S); both are filter-normalised (Eq. 6).

Ablation options (the paper's branch and normalisation ablations): `branches` keeps only S (a
per-pixel filter shared by each head's channels) or only A (a dynamic depthwise conv, the same
filter at every pixel); `filter_norm` replaces FilterNorm by an elementwise sigmoid or nothing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..domain import Domain
from ..functional.geometry import centre_aligned, check_channelwise, conv_out_size, resolve_padding
from ..functional.pixel_filter import COMBINES, pixel_filter
from ..functional.sample_conv import sample_conv
from ..operator import Operator, pixel_macs
from ..registry import register_op

BRANCHES = ("both", "spatial", "channel")
FILTER_NORMS = ("fn", "sigmoid", "none")


class FilterNorm(nn.Module):
    """Standardise each k²-tap filter over its taps, then rescale (Eq. 6).

    Official details: the unbiased std plus 1e-10; 'spatial' scales by the constant gain/k, 'channel'
    by a learnable per-(channel, tap) `std` initialised randn·gain/k (key `channel_branch.4.std`).
    """

    eps = 1e-10

    def __init__(self, channels: int, kernel_size: int, filter_type: str, nonlinearity: str = "relu"):
        super().__init__()
        if filter_type not in ("spatial", "channel"):
            raise ValueError(f"FilterNorm: filter_type must be 'spatial' or 'channel', got {filter_type!r}")
        self.channels, self.taps, self.filter_type = channels, kernel_size ** 2, filter_type
        self.gain = nn.init.calculate_gain(nonlinearity) / kernel_size
        self.std = (nn.Parameter(torch.randn(channels * self.taps) * self.gain)
                    if filter_type == "channel" else None)

    def forward(self, f: Tensor) -> Tensor:
        """f: (B, channels·k², H, W) → (B, channels, k², H, W), normalised over the k² axis."""
        f = f.view(f.shape[0], self.channels, self.taps, *f.shape[2:])
        f = (f - f.mean(2, keepdim=True)) / (f.std(2, keepdim=True) + self.eps)
        if self.std is None:
            return f * self.gain
        return f * self.std.view(1, self.channels, self.taps, *[1] * (f.dim() - 3))


def _filter_norm(kind: str, channels: int, kernel_size: int, filter_type: str, nonlinearity: str) -> nn.Module:
    """The last layer of a branch; the ablations' sigmoid and identity have no parameters, so a
    branch's other keys stay the official ones."""
    if kind == "fn":
        return FilterNorm(channels, kernel_size, filter_type, nonlinearity)
    return nn.Sigmoid() if kind == "sigmoid" else nn.Identity()


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"ddf: {name} must be one of {allowed}, got {value!r}")
    return value


@register_op("ddf")
class DDF(Operator):
    """DDFPack with the official defaults (head 1, se_ratio 0.2, ReLU gain, 'mul', both branches, FilterNorm).

    Keys mirror the official `spatial_branch.0.*`, `channel_branch.{1,3}.*`, `channel_branch.4.std`;
    a branch left out by `branches` has no modules, and `channel_branch.4.std` exists only with
    `filter_norm="fn"`. The output size follows the conv formula (⌈H/s⌉ with the default padding),
    which equals the official H//s whenever s divides H; odd sizes with stride 2 work here (they
    fail officially). `head` channel blocks are contiguous; `groups` is checked as in Conv2d (the op
    is channel-wise). `kernel_combine` only matters with both branches.
    """

    domain = Domain(kernel_sizes=(3, 5), channelwise=True)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=None,
                 dilation: int = 1, groups: int = 1, bias: bool = False, *, kernel_combine: str = "mul",
                 head: int = 1, se_ratio: float = 0.2, nonlinearity: str = "relu", branches: str = "both",
                 filter_norm: str = "fn"):
        super().__init__()
        check_channelwise("ddf", in_channels, out_channels, groups)
        self.kernel_combine = _choice("kernel_combine", kernel_combine, COMBINES)
        self.branches = _choice("branches", branches, BRANCHES)
        self.filter_norm = _choice("filter_norm", filter_norm, FILTER_NORMS)
        if head < 1 or in_channels % head:
            raise ValueError(f"ddf: head={head} must divide in_channels={in_channels}")
        mid = int(in_channels * se_ratio)
        if mid < 1 and branches != "spatial":
            raise ValueError(f"ddf: se_ratio={se_ratio} leaves no hidden channels for in_channels={in_channels}")
        k = self.kernel_size = int(kernel_size)
        if k < 2 and self.filter_norm == "fn":
            raise ValueError(f"ddf: kernel_size={k} gives one tap, and the filter normalisation standardises each "
                             "filter over its taps; use kernel_size >= 2 (officially 3) or filter_norm='none'")
        self.stride, self.dilation, self.head = int(stride), int(dilation), head
        self.padding = resolve_padding(k, padding, self.dilation)
        self.spatial_branch = self.channel_branch = None
        if branches != "channel":
            self.spatial_branch = nn.Sequential(
                nn.Conv2d(in_channels, head * k * k, 1, stride=self.stride),
                _filter_norm(filter_norm, head, k, "spatial", nonlinearity))
        if branches != "spatial":
            self.channel_branch = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(in_channels, mid, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid, in_channels * k * k, 1),
                _filter_norm(filter_norm, in_channels, k, "channel", nonlinearity))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        k = self.kernel_size
        geometry = dict(stride=self.stride, padding=self.padding, dilation=self.dilation)
        channel = None if self.channel_branch is None else self.channel_branch(x).view(B, C, k * k)
        if self.spatial_branch is None:  # channel filter only: a dynamic depthwise conv, no per-pixel filter
            out = sample_conv(x, channel.view(B, C, 1, k, k), groups=C, **geometry)
        else:
            ho, wo = [conv_out_size(n, k, self.stride, p, self.dilation) for n, p in zip((H, W), self.padding)]
            spatial = self.spatial_branch(centre_aligned(x, k, self.padding, self.dilation))[..., :ho, :wo]
            out = pixel_filter(x, spatial.reshape(B, self.head, k * k, ho, wo), channel, kernel_size=k,
                               combine=self.kernel_combine, **geometry)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def aggregation_macs(self, out: Tensor) -> int:
        """The per-pixel aggregation; the channel-only form is a conv the FLOP counter sees."""
        return 0 if self.spatial_branch is None else pixel_macs(out, self.kernel_size)
