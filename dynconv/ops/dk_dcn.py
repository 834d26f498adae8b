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

Ablation operator, not a hot path: the forward loops over the k² taps and never forms a
(B, C·k², Ho, Wo) tensor, but its backward is plain autograd. Through the bare loop autograd would
keep about eight (B, C, Ho, Wo) tensors per tap for the backward (the sampled input, the four gathered
scope corners, the kernel plane, products): 72 for k = 3. So each tap runs under activation
checkpointing: only the layer's inputs and offsets are kept (about 3·B·C·H·W at C = 32) and the
backward recomputes each tap (about 1.8× the time of the bare loop on CPU).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair
from torch.utils.checkpoint import checkpoint

from ..functional.pixel_filter import acc_dtype, common_dtype, resolve_padding
from ..registry import register_op
from .deformable_kernel import DeformKernelLocal, _tap_kernel

__all__ = ["DeformKernelDCN", "deform_kernel_dcn"]


def _tap_term(xg: Tensor, kernel_offset: Tensor, data_offset: Tensor, mask: Tensor, weight: Tensor,
              t: int, k: int, s, p, d) -> Tensor:
    """Tap t's term W̃_t · x(deformed) · m_t as (B, C/G, G, Ho, Wo); xg is x grouped as (B·G, C/G, H, W)."""
    B, G, _, ho, wo = mask.shape
    H, W = xg.shape[-2:]
    fh, fw = divmod(t, k)
    rows = torch.arange(ho, dtype=xg.dtype, device=xg.device) * s[0] + (fh * d[0] - p[0])
    cols = torch.arange(wo, dtype=xg.dtype, device=xg.device) * s[1] + (fw * d[1] - p[1])
    cy = data_offset[:, :, t, 0] + rows.view(-1, 1)
    cx = data_offset[:, :, t, 1] + cols
    # align_corners=False's normalisation is invertible for every size; with True a size-1 axis maps
    # every coordinate to pixel 0 and the offset is lost
    grid = torch.stack([(2 * cx + 1) / W - 1, (2 * cy + 1) / H - 1], -1).view(B * G, ho, wo, 2)
    sampled = F.grid_sample(xg, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.view(B, G, -1, ho, wo).transpose(1, 2)  # channel c = m·G + g
    kern = _tap_kernel(weight, kernel_offset, t, k).view(B, -1, G, ho, wo)
    return sampled * kern * mask[:, :, t].unsqueeze(1)


def deform_kernel_dcn(x: Tensor, kernel_offset: Tensor, data_offset: Tensor, mask: Tensor, weight: Tensor, *,
                      kernel_size: int, stride=1, padding=None, dilation=1) -> Tensor:
    """DK + DCN aggregation: x (B, C, H, W); kernel_offset and data_offset (B, G, k², 2, Ho, Wo) as
    (Δh, Δw); mask (B, G, k², Ho, Wo) (the modulation itself, not its logits); weight (C, S_h, S_w)."""
    k, s, d = int(kernel_size), _pair(stride), _pair(dilation)
    p = resolve_padding(k, padding, d)
    B, C, H, W = x.shape
    G = mask.shape[1]
    if C % G:
        raise ValueError(f"offset groups {G} must divide the {C} channels")
    x, kernel_offset, data_offset, mask, weight = common_dtype(x, kernel_offset, data_offset, mask, weight)
    dtype, acc = x.dtype, acc_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        x, kernel_offset, data_offset, mask, weight = (t.to(acc) for t in (x, kernel_offset, data_offset, mask, weight))
        xg = x.reshape(B, C // G, G, H, W).transpose(1, 2).reshape(B * G, C // G, H, W)
        out = sum(checkpoint(_tap_term, xg, kernel_offset, data_offset, mask, weight, t, k, s, p, d,
                             use_reentrant=False, preserve_rng_state=False) for t in range(k * k))
    return out.reshape(B, C, *mask.shape[-2:]).to(dtype)


@register_op("dk_dcn")
class DeformKernelDCN(DeformKernelLocal):
    """`dk_local` plus DCNv2's data offsets and modulation (`conv_offset`, zero-initialised), i.e. the
    DK paper's "DK + DCN"; at initialisation it is ½ · dk_local. Options as `dk_local`."""

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
        out = deform_kernel_dcn(x, self.kernel_offsets(x), data_offset, mask, self.weight.squeeze(1),
                                kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                dilation=self.dilation)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
