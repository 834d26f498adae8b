"""Deformable Kernels (Gao et al., "Deformable Kernels: Adapting Effective Receptive Fields for Object
Deformation", ICLR 2020), depthwise as in the paper.

Each layer holds a scope kernel W_c of S×S taps per channel and resamples it bilinearly at
learnt positions (Eq. 6): the k×k kernel actually applied has taps
W_c(fh + Δh + (S−k)/2, fw + Δw + (S−k)/2).
- local (`dk_local`): Δ differs per output pixel (a dense k×k conv predicts it) and per offset
  group (channel c uses group c mod G), so the result is a per-pixel per-channel filter; on CPU
  the sampling runs inside the aggregation (`functional.deform_kernel`), so that filter is never stored;
- global (`dk_global`): Δ differs per sample only (GAP → Linear), giving per-sample kernels that
  `sample_conv` applies. The sampled kernel is one conv weight per sample, what `sample_conv`
  takes anyway, so there is no larger tensor to fuse away.
Sampling follows the official `planar_bilinear`: 0 unless −1 < h < S_h and −1 < w < S_w, and
corners outside the scope count as 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.utils import _pair

from ..domain import Domain
from ..functional.deform_kernel import deform_kernel_local, scope_corners
from ..functional.geometry import check_channelwise, check_groups, resolve_padding
from ..functional.library import param_view
from ..functional.sample_conv import sample_conv
from ..operator import Operator, pixel_macs
from ..registry import register_op


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

    domain = Domain(kernel_sizes=(1, 3), channelwise=True, options=dict(offset_groups=2))

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

    def scope_planes(self) -> Tensor:
        """The scope kernels (C, S_h, S_w), their gradient in the parameter's own strides."""
        return param_view(self.weight, self.weight.shape[0], *self.weight.shape[2:])

    def kernel_offsets(self, x: Tensor) -> Tensor:
        """Scope offsets (B, G, k², 2, Ho, Wo) as (Δh, Δw), from `rotation_conv`."""
        offset = self.rotation_conv(x)
        return offset.view(offset.shape[0], self.offset_groups, self.kernel_size ** 2, 2, *offset.shape[-2:])

    def aggregation_macs(self, out: Tensor) -> int:
        return pixel_macs(out, self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        out = deform_kernel_local(x, self.kernel_offsets(x), self.scope_planes(), kernel_size=self.kernel_size,
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

    domain = Domain(kernel_sizes=(1, 3))

    has_own_init = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=None,
                 dilation: int = 1, groups: int = 1, bias: bool = False, *, scope_size=4, offset_groups: int = 1):
        super().__init__()
        check_groups("dk_global", in_channels, out_channels, groups)
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
        planes = param_view(self.weight, -1, sh * sw)
        kern = sum(coef * planes[:, index] for index, coef, _, _ in scope_corners(h, w, (sh, sw)))
        return kern.view(*self.weight.shape[:2], B, k, k).permute(2, 0, 1, 3, 4)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.expand(x.shape[0], -1)
        return sample_conv(x, self.kernels(x), bias, stride=self.stride, padding=self.padding,
                           dilation=self.dilation, groups=self.groups)
