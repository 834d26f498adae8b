"""Deformable Kernels together with deformable convolution (DK + DCN; Gao et al., ICLR 2020, who report the
two as complementary: DK resamples the KERNEL, DCNv2 (Zhu et al., CVPR 2019) resamples the INPUT).

    out[b,c,p] = Σ_k W̃_k(b,c,p) · x_b,c(p·s − pad + p_k·d + Δp_k(b,g,p)) · m_k(b,g,p),    g = c mod G

- W̃_k(b,c,p) is the local DK kernel exactly as `dk_local` builds it: channel c's S×S scope sampled
  bilinearly at p_k + Δk_k(b,g,p) + (S−k)/2, Δk from the zero-initialised dense `rotation_conv`;
- Δp_k (data offsets) and m_k = sigmoid(logit) (modulation) come from `conv_offset`, a dense conv with
  the layer's geometry to G·k²·3 channels, ordered like `dcn`'s: offsets (g, tap, {h, w}), then
  mask logits (g, tap); it starts at zero, so Δp = 0 and m = ½ (DCNv2's convention, as our `dcn`);
- the input is sampled with the DCN rule (0 unless −1 < y < H and −1 < x < W, corners outside count
  as 0), which is `grid_sample`'s bilinear zero padding.
Hence at initialisation dk_dcn = ½ · dk_local with the same scope weight and kernel offsets.

Channel-wise like `dk_local` (in = out, one scope plane per channel); one offset-group count G serves
the kernel offsets, the data offsets and the masks, with channel c in group c mod G (the DK rule; the
official `DeformKernelConv2d` has G = 1 and, unlike the paper, never learns kernel offsets).

Ablation operator, not a hot path: the aggregation (`functional.deform_kernel_dcn`) runs tap by tap under
activation checkpointing to bound its memory.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..domain import Domain
from ..functional.deform_kernel_dcn import deform_kernel_dcn
from ..registry import register_op
from .deformable_kernel import DeformKernelLocal

__all__ = ["DeformKernelDCN", "deform_kernel_dcn"]


@register_op("dk_dcn")
class DeformKernelDCN(DeformKernelLocal):
    """`dk_local` plus DCNv2's data offsets and modulation (`conv_offset`, zero-initialised), i.e. the
    DK paper's "DK + DCN"; at initialisation it is ½ · dk_local. Options as `dk_local`."""

    domain = Domain(kernel_sizes=(1, 3), channelwise=True, options=dict(offset_groups=2),
                    slow_compile=True)  # a grid_sample per tap: inductor takes minutes

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=None,
                 dilation: int = 1, groups: int = 1, bias: bool = False, *, scope_size=4, offset_groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         scope_size=scope_size, offset_groups=offset_groups)
        k = self.kernel_size
        self.conv_offset = nn.Conv2d(in_channels, offset_groups * k * k * 3, k, self.stride, self.padding,
                                     self.dilation)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        G, kk = self.offset_groups, self.kernel_size ** 2
        om = self.conv_offset(x)
        B, size = om.shape[0], om.shape[-2:]
        data_offset = om[:, :2 * G * kk].view(B, G, kk, 2, *size)
        mask = torch.sigmoid(om[:, 2 * G * kk:]).view(B, G, kk, *size)
        out = deform_kernel_dcn(x, self.kernel_offsets(x), data_offset, mask, self.scope_planes(),
                                kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                dilation=self.dilation)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
