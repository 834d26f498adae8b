"""DCNv2: modulated deformable convolution (Zhu et al., CVPR 2019) through `torchvision.ops.deform_conv2d`.

`y(p) = Σ_k w_k · m_k · x(p + p_k + Δp_k)`: a conv with the same geometry predicts, per offset group,
2·k² offsets and k² mask logits (mask = sigmoid). It starts at zero, i.e. Δp = 0 and m = 0.5.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.ops import deform_conv2d

from ..domain import Domain
from ..functional.geometry import check_groups, conv_geometry
from ..functional.library import param_view
from ..operator import Operator, pixel_macs
from ..registry import register_op

__all__ = ["DCN"]


@register_op("dcn")
class DCN(Operator):
    """Deformable conv v2 with its offset+mask branch `conv_offset` (3·k²·offset_groups channels)."""

    domain = Domain(groups=(2,), options=dict(offset_groups=2))

    has_own_init = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=True, *, offset_groups=1):
        super().__init__()
        check_groups("dcn", in_channels, out_channels, groups)
        if in_channels % offset_groups:
            raise ValueError(f"dcn: in_channels={in_channels} must be divisible by offset_groups={offset_groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.offset_groups = offset_groups
        self.kernel_size, self.stride, self.padding, self.dilation = conv_geometry(
            kernel_size, stride, padding, dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.num_offsets = 2 * taps * offset_groups
        self.conv_offset = nn.Conv2d(in_channels, 3 * taps * offset_groups, self.kernel_size, self.stride,
                                     self.padding, self.dilation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`nn.Conv2d`'s init for the main kernel; zeros for the offset branch (start as a plain conv)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        # fp16/bf16 run the sampling in fp32, as torchvision's own CUDA autocast rule does: its CPU
        # kernels have no bf16, and under CPU autocast conv_offset would return bf16 next to an fp32 x
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        om = self.conv_offset(x).to(dtype)
        offset, mask = om[:, :self.num_offsets], torch.sigmoid(om[:, self.num_offsets:])
        bias = None if self.bias is None else self.bias.to(dtype)
        weight = param_view(self.weight, *self.weight.shape).to(dtype)  # torchvision's grad: contiguous strides
        out = deform_conv2d(x.to(dtype), offset, weight, bias, self.stride, self.padding,
                            self.dilation, mask)
        return out.to(x.dtype)

    def aggregation_macs(self, out: Tensor) -> int:
        """The deformable conv itself (`deform_conv2d` is invisible to the FLOP counter): C_in/groups per tap."""
        return pixel_macs(out, self.kernel_size) * (self.in_channels // self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, offset_groups={self.offset_groups}")
