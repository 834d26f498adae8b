"""`sample_conv`: an ordinary 2-D convolution whose kernel differs per sample.

The aggregation primitive of CondConv, DY-Conv, ODConv and global Deformable Kernels: each sample
`b` is convolved with its own kernel `weight[b]`.

- "fast" (default): the batch is folded into the channel groups, so one `F.conv2d` with
  `groups = B·groups` computes every sample at once (the CondConv trick); torch's conv autograd.
- "reference": `F.unfold` the patches and contract them with the per-sample kernels (einsum).
  Materialises `(B, C·kh·kw, L)`; it is the oracle the tests hold the fast backend to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from .backend import resolve
from .geometry import conv_out_hw

__all__ = ["sample_conv"]


def sample_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, stride=1, padding=0,
                dilation=1, groups: int = 1, backend: str | None = None) -> Tensor:
    """Per-sample convolution: `out[b] = conv2d(x[b], weight[b], bias[b])`.

    x: (B, C_in, H, W); weight: (B, C_out, C_in // groups, kh, kw); bias: None or (B, C_out).
    stride / padding / dilation: int or pair, as in `F.conv2d` (padding is explicit zero padding).
    Returns (B, C_out, H_out, W_out), channels_last when `x` is.
    """
    _check(x, weight, bias, groups)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    # an empty batch cannot be folded into the groups of one conv (groups=0); the unfold path takes it
    impl = _fast if resolve(backend) == "fast" and x.shape[0] > 0 else _reference
    out = impl(x, weight, bias, stride, padding, dilation, groups)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"sample_conv: x must be (B, C_in, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError("sample_conv: weight must be (B, C_out, C_in // groups, kh, kw) — one kernel per "
                         f"sample; got shape {tuple(weight.shape)}")
    b, c = x.shape[:2]
    if weight.shape[0] != b:
        raise ValueError(f"sample_conv: weight has {weight.shape[0]} kernels for a batch of {b}")
    if c % groups or weight.shape[1] % groups or weight.shape[2] * groups != c:
        raise ValueError(f"sample_conv: C_in={c}, C_out={weight.shape[1]} and weight's C_in // groups="
                         f"{weight.shape[2]} do not fit groups={groups}")
    if bias is not None and tuple(bias.shape) != (b, weight.shape[1]):
        raise ValueError(f"sample_conv: bias must be (B, C_out) = {(b, weight.shape[1])}, got {tuple(bias.shape)}")


def _fast(x, weight, bias, stride, padding, dilation, groups):
    b, c, h, w = x.shape
    out_ch = weight.shape[1]
    y = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(b * out_ch, *weight.shape[2:]),
                 None if bias is None else bias.reshape(b * out_ch),
                 stride, padding, dilation, b * groups)
    return y.view(b, out_ch, *y.shape[-2:])


def _reference(x, weight, bias, stride, padding, dilation, groups):
    b, c, h, w = x.shape
    out_ch, kh, kw = weight.shape[1], weight.shape[3], weight.shape[4]
    h_out, w_out = conv_out_hw((h, w), (kh, kw), stride, padding, dilation)
    # unfold's rows are ordered (channel, kh, kw), so a group's rows are one contiguous block
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    taps = weight.shape[2] * kh * kw  # a group's rows
    cols = cols.view(b, groups, taps, h_out * w_out)
    kernels = weight.reshape(b, groups, out_ch // groups, taps)
    y = torch.einsum("bgok,bgkl->bgol", kernels, cols).reshape(b, out_ch, h_out, w_out)
    return y if bias is None else y + bias[:, :, None, None]
