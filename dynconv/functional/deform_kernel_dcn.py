"""The DK + DCN aggregation (Gao et al., ICLR 2020, with DCNv2's data offsets and modulation, Zhu et
al., CVPR 2019): the local Deformable Kernel applied to a deformably sampled input,

    out[b,c,p] = Σ_k W̃_k(b,c,p) · x_b,c(p·s − pad + p_k·d + Δp_k(b,g,p)) · m_k(b,g,p),    g = c mod G

with W̃ resampled from the scope as in `deform_kernel.tap_kernel` and the input sampled with the DCN
rule (0 unless −1 < y < H and −1 < x < W; `grid_sample`'s bilinear zero padding).

The forward loops over the k² taps and never forms a (B, C·k², Ho, Wo) tensor; its backward is plain
autograd. Through the bare loop autograd would keep about eight (B, C, Ho, Wo) tensors per tap (the
sampled input, the four gathered scope corners, the kernel plane, products): 72 for k = 3. So each
tap runs under activation checkpointing: only the inputs and offsets are kept and the backward
recomputes each tap (about 1.8× the time of the bare loop on CPU). Under `torch.compile` and `torch.export` the
taps are traced bare: the compiler's partitioner decides what to keep, and nine checkpointed regions cost inductor
minutes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair
from torch.utils.checkpoint import checkpoint

from .deform_kernel import tap_kernel
from .geometry import resolve_padding
from .pixel_filter import acc_dtype, autocast_off, common_dtype

__all__ = ["deform_kernel_dcn"]


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
    M = xg.shape[1]
    sampled = sampled.view(B, G, M, ho, wo).transpose(1, 2)  # channel c = m·G + g
    kern = tap_kernel(weight, kernel_offset, t, k).view(B, M, G, ho, wo)
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
    with autocast_off(x.device.type):
        x, kernel_offset, data_offset, mask, weight = (t.to(acc) for t in (x, kernel_offset, data_offset, mask, weight))
        xg = x.reshape(B, C // G, G, H, W).transpose(1, 2).reshape(B * G, C // G, H, W)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # module docstring
            out = sum(_tap_term(xg, kernel_offset, data_offset, mask, weight, t, k, s, p, d) for t in range(k * k))
        else:
            out = sum(checkpoint(_tap_term, xg, kernel_offset, data_offset, mask, weight, t, k, s, p, d,
                                 use_reentrant=False, preserve_rng_state=False) for t in range(k * k))
    return out.reshape(B, C, *mask.shape[-2:]).to(dtype)
