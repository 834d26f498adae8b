"""Involution (Li et al., "Involution: Inverting the Inherence of Convolution", CVPR 2021).

A kernel generator φ maps the feature at each output position to G spatial kernels (Eq. 6,
φ = W1 σ(W0 x)), shared by the C/G channels of each contiguous group; the kernels are then
applied per pixel (Eq. 4). The last 1×1 conv W1 (`conv2`) and the aggregation run as one op,
`functional.involution`, which on CPU never holds the (B, G·K², Ho, Wo) kernel tensor.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torch import Tensor

from ..functional.geometry import centre_aligned, check_channelwise, conv_out_size, resolve_padding
from ..functional.involution import involution
from ..operator import Operator, pixel_macs
from ..registry import register_op


@register_op("involution")
class Involution(Operator):
    """Official defaults: 16 channels per group, reduction ratio 4; generator
    [AvgPool(s)] → 1×1 conv → BN → ReLU → 1×1 conv (bias) → G·K² maps ordered (g, kh, kw).

    Submodules `conv1.{conv,bn}` and `conv2.conv` mirror the official mmcv ConvModule keys.
    Unlike the official code, H or W not divisible by the stride work: the generator pools with
    `ceil_mode=True` (the last window averages only the pixels inside the input), which gives the
    conv-formula size ⌈H/s⌉ and equals the official AvgPool(s, s) whenever s divides H and W.
    `groups` is checked as in Conv2d; the operator is channel-wise whatever its value. Its G kernel
    groups (C / group_channels) are `kernel_groups`. `fused = False` (an attribute, not saved) runs
    `conv2` and the aggregation as two steps, as before the fused op, for comparisons.
    """

    fused = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=None,
                 dilation: int = 1, groups: int = 1, bias: bool = False, *, group_channels: int = 16,
                 reduction_ratio: int = 4):
        super().__init__()
        check_channelwise("involution", in_channels, out_channels, groups)
        if in_channels % group_channels:
            raise ValueError(f"involution: in_channels={in_channels} must be a multiple of "
                             f"group_channels={group_channels}")
        if in_channels < reduction_ratio:
            raise ValueError(f"involution: in_channels={in_channels} is smaller than reduction_ratio={reduction_ratio}")
        self.kernel_size, self.stride, self.dilation = int(kernel_size), int(stride), int(dilation)
        self.padding = resolve_padding(self.kernel_size, padding, self.dilation)
        self.kernel_groups = in_channels // group_channels  # G of Eq. 6, not Conv2d's `groups`
        mid = in_channels // reduction_ratio
        self.avgpool = nn.AvgPool2d(self.stride, self.stride, ceil_mode=True) if self.stride > 1 else nn.Identity()
        self.conv1 = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_channels, mid, 1, bias=False), bn=nn.BatchNorm2d(mid), act=nn.ReLU(inplace=True)))
        self.conv2 = nn.Sequential(OrderedDict(conv=nn.Conv2d(mid, self.kernel_size ** 2 * self.kernel_groups, 1)))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        K = self.kernel_size
        out_size = [conv_out_size(n, K, self.stride, p, self.dilation) for n, p in zip((H, W), self.padding)]
        ctx = self.avgpool(centre_aligned(x, K, self.padding, self.dilation))[..., :out_size[0], :out_size[1]]
        span = self.conv2.conv
        out = involution(x, self.conv1(ctx), span.weight, span.bias, kernel_size=K, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.kernel_groups, fused=self.fused)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def aggregation_macs(self, out: Tensor) -> int:
        return pixel_macs(out, self.kernel_size)
