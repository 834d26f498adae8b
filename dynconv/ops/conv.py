"""Static baselines `conv` and `dwconv`."""
from __future__ import annotations

import torch.nn as nn

from ..domain import Domain
from ..functional.geometry import conv_geometry
from ..operator import Operator
from ..registry import register_op

__all__ = ["Conv", "DWConv", "conv_geometry"]


@register_op("conv")
class Conv(Operator, nn.Conv2d):
    """Plain `nn.Conv2d` with 'same' padding by default: the static baseline in every table."""

    domain = Domain(groups=(2,))

    conv_prefix = ""  # its weight is a conv's: dynconv.replace(warm_start=True) copies the replaced conv in

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=True):
        k, s, p, d = conv_geometry(kernel_size, stride, padding, dilation)
        super().__init__(in_channels, out_channels, k, s, p, d, groups, bias)


@register_op("dwconv")
class DWConv(Conv):
    """Depthwise conv (groups = in_channels); out_channels must be a multiple of in_channels."""

    domain = Domain()

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=None,
                 bias=True):
        if out_channels % in_channels:
            raise ValueError(f"dwconv: out_channels={out_channels} must be a multiple of in_channels={in_channels} "
                             "(a depthwise conv gives each input channel out/in filters); use 'conv' otherwise")
        if groups not in (None, in_channels):
            raise ValueError(f"dwconv: groups is always in_channels={in_channels}; got groups={groups}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, in_channels, bias)
