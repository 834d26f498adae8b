"""Deformable Kernels (Gao et al., "Deformable Kernels: Adapting Effective Receptive Fields for Object
Deformation", ICLR 2020), depthwise as in the paper.

Each layer holds a scope kernel W_c of S×S taps per channel and resamples it bilinearly at
learnt positions (Eq. 6): the k×k kernel actually applied has taps
W_c(fh + Δh + (S−k)/2, fw + Δw + (S−k)/2).
- local (`dk_local`): Δ differs per output pixel (a dense k×k conv predicts it) and per offset
  group (channel c uses group c mod G), so the result is a per-pixel per-channel filter;
- global (`dk_global`): Δ differs per sample only (GAP → Linear), giving per-sample kernels that
  `sample_conv` applies.
Sampling follows the official `planar_bilinear`: 0 unless −1 < h < S_h and −1 < w < S_w, and
corners outside the scope count as 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.utils import _pair

from ..functional.backend import resolve
from ..functional.pixel_filter import (acc_dtype, check_channelwise, common_dtype, padded_input, pixel_filter,
                                       resolve_padding, tap, zeros_in_format)
from ..functional.sample_conv import sample_conv
from ..operator import Operator, pixel_macs
from ..registry import register_op


def _scope_corners(h: Tensor, w: Tensor, scope: tuple[int, int]):
    """The four bilinear corners of scope coordinates (h, w) in an S_h×S_w plane.

    Yields (index hi·S_w + wi, coefficient, ∂coefficient/∂h, ∂coefficient/∂w); corners outside the
    scope, and every corner of a point outside (−1, S), get coefficient 0 (index clamped, unused).
    """
    sh, sw = scope
    inside = ((h > -1) & (h < sh) & (w > -1) & (w < sw)).to(h.dtype)
    h0, w0 = h.floor(), w.floor()
    lh, lw = h - h0, w - w0
    for dh in (0, 1):
        ah, sign_h, hi = (lh, 1.0, h0 + 1) if dh else (1 - lh, -1.0, h0)
        for dw in (0, 1):
            aw, sign_w, wi = (lw, 1.0, w0 + 1) if dw else (1 - lw, -1.0, w0)
            valid = inside * ((hi >= 0) & (hi < sh) & (wi >= 0) & (wi < sw)).to(h.dtype)
            index = (hi.clamp(0, sh - 1) * sw + wi.clamp(0, sw - 1)).long()
            yield index, ah * aw * valid, sign_h * aw * valid, ah * sign_w * valid


def _tap_coords(offset: Tensor, k: int, kernel_size: int, scope: tuple[int, int]):
    """Scope coordinates (h, w), each (B, G, Ho, Wo), of tap k for each offset group."""
    fh, fw = divmod(k, kernel_size)
    return (offset[:, :, k, 0] + (fh + (scope[0] - kernel_size) / 2),
            offset[:, :, k, 1] + (fw + (scope[1] - kernel_size) / 2))


def _gather(planes: Tensor, index: Tensor) -> Tensor:
    """planes (C, S·S), index (B, G, Ho, Wo) → (B, C/G, G, Ho, Wo): channel c = m·G + g reads
    planes[c, index[b, g]], i.e. channel c uses offset group c mod G."""
    B, G = index.shape[:2]
    M = planes.shape[0] // G
    src = planes.view(1, M, G, -1).expand(B, -1, -1, -1)
    return src.gather(3, index.reshape(B, 1, G, -1).expand(-1, M, -1, -1)).view(B, M, G, *index.shape[2:])


def _tap_kernel(weight: Tensor, offset: Tensor, k: int, kernel_size: int) -> Tensor:
    """The resampled kernel of tap k at every pixel, (B, C, Ho, Wo); weight (C, S_h, S_w)."""
    C, sh, sw = weight.shape
    h, w = _tap_coords(offset, k, kernel_size, (sh, sw))
    planes = weight.reshape(C, sh * sw)
    kern = sum(coef.unsqueeze(1) * _gather(planes, index) for index, coef, _, _ in _scope_corners(h, w, (sh, sw)))
    # reshape: offsets sliced from a channels_last offset conv give a kernel that cannot be viewed as (B, C, ...)
    return kern.reshape(h.shape[0], C, *h.shape[2:])


class _LocalDeformKernel(torch.autograd.Function):
    """Tap by tap: build the tap's (B, C, Ho, Wo) kernel slice, multiply, accumulate; the backward
    rebuilds it and never holds the whole (B, C·k², Ho, Wo) kernel. Coordinates and bilinear
    coefficients live at the offset groups' size (B, G, Ho, Wo) and broadcast over channels.

    With P = grad_out · x_tap: grad_x_tap += grad_out · kernel; grad_W_c[corner] += Σ P · coefficient;
    grad_Δ = Σ_corner ∂coefficient/∂Δ · Σ_{c: c mod G = g} P · W_c[corner].
    """

    @staticmethod
    def forward(ctx, x, offset, weight, k, s, p, d):
        ctx.save_for_backward(x, offset, weight)
        ctx.geometry = (k, s, p, d)
        acc = acc_dtype(x.dtype)
        B, C = x.shape[:2]
        size = offset.shape[-2:]
        xp = padded_input(x, p, acc)
        offset, weight = offset.to(acc), weight.to(acc)
        out = zeros_in_format((B, C, *size), x, acc)
        for t in range(k * k):
            out.addcmul_(tap(xp, t, k, s, d, size), _tap_kernel(weight, offset, t, k))
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, offset, weight = ctx.saved_tensors
        k, s, p, d = ctx.geometry
        need_x, need_off, need_w = ctx.needs_input_grad[:3]
        with torch.autocast(x.device.type, enabled=False):
            acc = acc_dtype(x.dtype)
            B, C, H, W = x.shape
            G, size = offset.shape[1], offset.shape[-2:]
            M, scope = C // G, tuple(weight.shape[-2:])
            go, off, wt = grad_out.to(acc).view(B, M, G, *size), offset.to(acc), weight.to(acc)
            planes = wt.reshape(C, -1)
            xp = padded_input(x, p, acc)
            gxp = torch.zeros_like(xp) if need_x else None
            goff = torch.zeros_like(off) if need_off else None
            gw = torch.zeros(B, M, G, planes.shape[1], dtype=acc, device=x.device) if need_w else None
            for t in range(k * k):
                h, w = _tap_coords(off, t, k, scope)
                kern = torch.zeros_like(go) if need_x else None
                prod = go * tap(xp, t, k, s, d, size).view(B, M, G, *size) if need_off or need_w else None
                for index, coef, dch, dcw in _scope_corners(h, w, scope):
                    val = _gather(planes, index)
                    if need_x:
                        kern.addcmul_(coef.unsqueeze(1), val)
                    if need_off:
                        pv = (prod * val).sum(1)
                        goff[:, :, t, 0].addcmul_(dch, pv)
                        goff[:, :, t, 1].addcmul_(dcw, pv)
                    if need_w:
                        gw.scatter_add_(3, index.reshape(B, 1, G, -1).expand(-1, M, -1, -1),
                                        (prod * coef.unsqueeze(1)).reshape(B, M, G, -1))
                if need_x:
                    tap(gxp, t, k, s, d, size).view(B, M, G, *size).addcmul_(go, kern)
            gx = None
            if need_x:
                ph, pw = p
                gx = torch.empty_like(x).copy_(gxp[:, :, ph:ph + H, pw:pw + W])
            return (gx, None if goff is None else goff.to(offset.dtype),
                    None if gw is None else gw.sum(0).view_as(weight).to(weight.dtype), None, None, None, None)


def deform_kernel_local(x: Tensor, offset: Tensor, weight: Tensor, *, kernel_size: int, stride=1, padding=None,
                        dilation=1, backend: str | None = None) -> Tensor:
    """Local DK aggregation: x (B, C, H, W), offset (B, G, k², 2, Ho, Wo) as (Δh, Δw), weight (C, S_h, S_w).

    "reference" materialises the resampled (B, C, k², Ho, Wo) kernel and calls `pixel_filter`'s
    reference; "fast" is the tap-by-tap autograd.Function above.
    """
    k, s, d = int(kernel_size), _pair(stride), _pair(dilation)
    p = resolve_padding(k, padding, d)
    if x.shape[1] % offset.shape[1]:
        raise ValueError(f"offset groups {offset.shape[1]} must divide the {x.shape[1]} channels")
    x, offset, weight = common_dtype(x, offset, weight)
    if resolve(backend) == "reference":
        kernel = torch.stack([_tap_kernel(weight, offset, t, k) for t in range(k * k)], 2)
        return pixel_filter(x, kernel, kernel_size=k, stride=s, padding=p, dilation=d, backend="reference")
    with torch.autocast(x.device.type, enabled=False):
        return _LocalDeformKernel.apply(x, offset, weight, k, s, p, d)


def _scope_pair(name: str, scope_size, kernel_size: int) -> tuple[int, int]:
    scope = tuple(_pair(scope_size))
    if min(scope) < kernel_size:
        raise ValueError(f"{name}: scope_size={scope} must be at least kernel_size={kernel_size}")
    return scope


@register_op("dk_local")
class DeformKernelLocal(Operator):
    """Local Deformable Kernel (official `DeformKernel2d`): README setting scope 4, k = 3.

    `rotation_conv` (dense k×k conv to G·k²·2 offsets, ordered (g, tap, {h, w})) starts at zero, so
    training starts from the rigid kernel (the bilinear centre of the scope); the scope `weight`
    (C, 1, S, S) is initialised U(±1/k) as officially. `groups` is checked as in Conv2d; the op is
    depthwise whatever its value.
    """

    has_own_init = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=None,
                 dilation: int = 1, groups: int = 1, bias: bool = False, *, scope_size=4, offset_groups: int = 1):
        super().__init__()
        check_channelwise(self.op_name, in_channels, out_channels, groups)
        if offset_groups < 1 or in_channels % offset_groups:
            raise ValueError(f"{self.op_name}: offset_groups={offset_groups} must divide in_channels={in_channels}")
        k = self.kernel_size = int(kernel_size)
        self.stride, self.dilation, self.offset_groups = int(stride), int(dilation), offset_groups
        self.padding = resolve_padding(k, padding, self.dilation)
        self.scope_size = _scope_pair(self.op_name, scope_size, k)
        self.weight = nn.Parameter(torch.empty(in_channels, 1, *self.scope_size).uniform_(-1 / k, 1 / k))
        self.rotation_conv = nn.Conv2d(in_channels, offset_groups * k * k * 2, k, self.stride, self.padding,
                                       self.dilation)
        nn.init.zeros_(self.rotation_conv.weight)
        nn.init.zeros_(self.rotation_conv.bias)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def kernel_offsets(self, x: Tensor) -> Tensor:
        """Scope offsets (B, G, k², 2, Ho, Wo) as (Δh, Δw), from `rotation_conv`."""
        offset = self.rotation_conv(x)
        return offset.view(offset.shape[0], self.offset_groups, self.kernel_size ** 2, 2, *offset.shape[-2:])

    def aggregation_macs(self, out: Tensor) -> int:
        return pixel_macs(out, self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        out = deform_kernel_local(x, self.kernel_offsets(x), self.weight.squeeze(1), kernel_size=self.kernel_size,
                                  stride=self.stride, padding=self.padding, dilation=self.dilation)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


@register_op("dk_global")
class DeformKernelGlobal(Operator):
    """Global Deformable Kernel (official `GlobalDeformKernel2d`; README setting scope 2, k = 1).

    coordinates = fc(GAP(x)) + rigid-grid centres (starting at (S−k)/2), clamped into [0, S−1]
    (per dimension; the official code clamps both with S_0, the same for square scopes). Every
    (out, in/groups) scope plane is sampled there, per sample, and applied with `sample_conv`.
    The official code never initialises the scope weight; we use U(±1/√fan_in), fan_in = in/groups·k²
    (the local op's rule), and a zero `fc` so training starts from the rigid kernel.
    """

    has_own_init = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=None,
                 dilation: int = 1, groups: int = 1, bias: bool = False, *, scope_size=4, offset_groups: int = 1):
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"dk_global: groups={groups} must divide in_channels={in_channels} "
                             f"and out_channels={out_channels}")
        if offset_groups != 1:
            raise ValueError("dk_global: offset_groups must be 1 (one set of coordinates per sample, as officially)")
        k = self.kernel_size = int(kernel_size)
        self.stride, self.dilation, self.groups = int(stride), int(dilation), groups
        self.padding = resolve_padding(k, padding, self.dilation)
        self.scope_size = _scope_pair("dk_global", scope_size, k)
        bound = 1 / math.sqrt(in_channels // groups * k * k)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.scope_size)
                                   .uniform_(-bound, bound))
        self.fc = nn.Linear(in_channels, k * k * 2)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        fh, fw = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
        centre = torch.stack([fh + (self.scope_size[0] - k) / 2, fw + (self.scope_size[1] - k) / 2], -1)
        self.register_buffer("fc_bias", centre.reshape(-1).float())
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def kernels(self, x: Tensor) -> Tensor:
        """Per-sample kernels (B, C_out, C_in/groups, k, k) sampled from the scope planes."""
        B, k = x.shape[0], self.kernel_size
        coord = (self.fc(x.mean((2, 3))) + self.fc_bias).view(B, k * k, 2)
        sh, sw = self.scope_size
        h, w = coord[..., 0].clamp(0, sh - 1), coord[..., 1].clamp(0, sw - 1)
        planes = self.weight.reshape(-1, sh * sw)
        kern = sum(coef * planes[:, index] for index, coef, _, _ in _scope_corners(h, w, (sh, sw)))
        return kern.view(*self.weight.shape[:2], B, k, k).permute(2, 0, 1, 3, 4)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.expand(x.shape[0], -1)
        return sample_conv(x, self.kernels(x), bias, stride=self.stride, padding=self.padding,
                           dilation=self.dilation, groups=self.groups)
