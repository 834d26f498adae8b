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
import torch.nn.functional as F
from torch import Tensor

from ..domain import Domain
from ..functional.backend import resolve
from ..functional.geometry import centre_aligned, check_channelwise, conv_out_size, resolve_padding
from ..functional.involution import involution, involution_recomputed
from ..operator import Operator, pixel_macs
from ..registry import register_op


def ceil_avg_pool(x: Tensor, stride: int) -> Tensor:
    """`AvgPool2d(stride, stride, ceil_mode=True)`: windows of the last row and column that pass the input's
    edge average only the pixels inside. Zero-padded by stride − 1 (a constant, so dynamic shapes stay simple),
    pooled, and divided by the fraction of each window inside the input, so no ceil_mode reaches a compiler.
    Where the stride divides the size the padding is never read and the divisor is 1: AvgPool2d(s, s) exactly,
    which eager runs directly (compiled code keeps one formula for every size: no guard on the size's parity)."""
    if stride == 1:
        return x
    if x.shape[-2] % stride == 0 and x.shape[-1] % stride == 0 and not torch.compiler.is_compiling():
        return F.avg_pool2d(x, stride)  # eager, divisible: the same windows without the padded copies
    pad = [0, stride - 1, 0, stride - 1]
    inside = F.avg_pool2d(F.pad(x.new_ones(1, 1, *x.shape[-2:]), pad), stride)
    return F.avg_pool2d(F.pad(x, pad), stride) / inside


@register_op("involution")
class Involution(Operator):
    """Official defaults: 16 channels per group, reduction ratio 4; generator
    [AvgPool(s)] → 1×1 conv → BN → ReLU → 1×1 conv (bias) → G·K² maps ordered (g, kh, kw).

    Submodules `conv1.{conv,bn}` and `conv2.conv` mirror the official mmcv ConvModule keys.
    Unlike the official code, H or W not divisible by the stride work: the generator pools with
    `ceil_mode=True` (the last window averages only the pixels inside the input), which gives the
    conv-formula size ⌈H/s⌉ and equals the official AvgPool(s, s) whenever s divides H and W
    (`ceil_avg_pool`, written without ceil_mode: inductor's ceil_mode backward is wrong).
    `groups` is checked as in Conv2d; the operator is channel-wise whatever its value. Its G kernel
    groups (C / group_channels) are `kernel_groups`. `fused = False` (an attribute, not saved) runs
    `conv2` and the aggregation as two steps, as before the fused op, for comparisons.

    In training (eager, BatchNorm2d generator) autograd keeps only the input and the parameters: the
    backward recomputes the pooled input, `conv1` and its BatchNorm (with the statistics the forward used:
    the batch's, running ones untouched, or the running ones of a BatchNorm in eval mode, as when a
    backbone is fine-tuned with frozen BatchNorm) and ReLU, a 1×1 conv to C/r channels, instead of keeping
    the reduced features and the BatchNorm input. `recompute = False` (an attribute) keeps them, for
    comparisons.
    """

    domain = Domain(kernel_sizes=(1, 3, 7), channelwise=True, batchnorm=True,
                    options=dict(group_channels=4, reduction_ratio=2))

    fused = True
    recompute = True

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
        self.conv1 = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_channels, mid, 1, bias=False), bn=nn.BatchNorm2d(mid), act=nn.ReLU(inplace=True)))
        self.conv2 = nn.Sequential(OrderedDict(conv=nn.Conv2d(mid, self.kernel_size ** 2 * self.kernel_groups, 1)))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        span = self.conv2.conv
        geometry = dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                        dilation=self.dilation, groups=self.kernel_groups)
        if self._recomputable():
            conv, bn = self.conv1.conv, self.conv1.bn
            out = involution_recomputed(x, self._reduce, (conv.weight, bn.weight, bn.bias), span.weight, span.bias,
                                        **geometry)
        else:
            out = involution(x, self.conv1(self._pooled(x)), span.weight, span.bias, fused=self.fused, **geometry)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def _pooled(self, x: Tensor) -> Tensor:
        """The generator's input: x at each output's centre tap, average-pooled by the stride."""
        K = self.kernel_size
        out_size = [conv_out_size(n, K, self.stride, p, self.dilation) for n, p in zip(x.shape[-2:], self.padding)]
        return ceil_avg_pool(centre_aligned(x, K, self.padding, self.dilation), self.stride)[..., :out_size[0],
                                                                                             :out_size[1]]

    def _recomputable(self) -> bool:
        conv, bn, act = self.conv1.conv, self.conv1.bn, self.conv1.act
        return (self.fused and self.recompute and self.training and torch.is_grad_enabled()
                and resolve(None) == "fast" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and type(conv) is nn.Conv2d and conv.bias is None and type(bn) is nn.BatchNorm2d and bn.affine
                and type(act) is nn.ReLU)

    def _reduce(self, x: Tensor, conv_weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, *,
                update_stats: bool) -> Tensor:
        """The reduced features conv1(pooled x): through the modules (running statistics updated) or,
        for the backward's recomputation, functionally with the given parameters and batch statistics."""
        if update_stats:
            return self.conv1(self._pooled(x))
        bn = self.conv1.bn
        batch_stats = bn.training or bn.running_mean is None  # as BatchNorm2d.forward decides
        stats = (None, None) if batch_stats else (bn.running_mean, bn.running_var)
        y = F.conv2d(self._pooled(x), conv_weight)
        return F.relu(F.batch_norm(y, *stats, bn_weight, bn_bias, batch_stats, 0.0, bn.eps))

    def aggregation_macs(self, out: Tensor) -> int:
        return pixel_macs(out, self.kernel_size)
