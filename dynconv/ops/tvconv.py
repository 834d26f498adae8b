"""TVConv: translation-variant convolution (Chen et al., CVPR 2022).

Learnable affinity maps A (initialised to ones) pass through a weight-generating block B to give a
depthwise k×k filter per output position, W = B(A) (Eq. 2), shared by every sample of the batch
and applied with `pixel_filter`. The filter does not depend on the input, so `freeze()` can
compute it once for inference.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from ..functional.pixel_filter import check_channelwise, conv_out_size, pixel_filter, resolve_padding
from ..registry import register_op


def _block(cin: int, cout: int, size: tuple[int, int]) -> nn.Sequential:
    """Conv3×3 (no bias) → LayerNorm over (C, h, w) → ReLU, the official `_ConvBlock`."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.LayerNorm([cout, *size]),
                         nn.ReLU(inplace=True))


def _generator(cin: int, hidden: int, layers: int, cout: int, size: tuple[int, int]) -> nn.Sequential:
    blocks = [_block(cin, hidden, size)] + [_block(hidden, hidden, size) for _ in range(layers)]
    return nn.Sequential(*blocks, nn.Conv2d(hidden, cout, 3, padding=1, bias=False))


def _resized(t: Tensor, size: tuple[int, int]) -> Tensor:
    """`t` (..., h, w) resized bilinearly to `size`; `t` itself when the size already matches."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    lead = t.shape[:-2]
    out = F.interpolate(t.reshape(1, -1, *t.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return out.view(*lead, *size)


def _run_generator(gen: nn.Sequential, a: Tensor) -> Tensor:
    """Run `gen` on affinity maps `a` of any size; LayerNorm's (C, h, w) affine maps follow `a`'s size."""
    for layer in gen:
        if isinstance(layer, nn.Sequential):
            conv, ln, act = layer
            h = conv(a)
            a = act(F.layer_norm(h, h.shape[1:], _resized(ln.weight, h.shape[-2:]),
                                 _resized(ln.bias, h.shape[-2:]), ln.eps))
        else:
            a = layer(a)
    return a


@register_op("tvconv")
class TVConv(nn.Module):
    """Depthwise translation-variant conv with the official training defaults (4 affinity maps,
    width 64, 3 inner layers; keys `posi_map`, `weight_layers.*`, optional `bias_layers.*`).

    `input_size` is the input's (H, W); the maps live at the output size. Another input size
    raises an error unless `resize_affinity=True`: then the affinity maps and the LayerNorm affine
    maps are resized bilinearly to the new output size, and LayerNorm normalises over the actual
    (C, h, w). `bias=True` adds a per-channel bias; `bias_maps=True` a per-position one (official).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=None,
                 dilation: int = 1, groups: int = 1, bias: bool = False, *, input_size=None,
                 affinity_channels: int = 4, hidden_channels: int = 64, hidden_layers: int = 3,
                 bias_maps: bool = False, resize_affinity: bool = False):
        super().__init__()
        check_channelwise("tvconv", in_channels, out_channels, groups)
        if input_size is None:
            raise ValueError("tvconv needs input_size=(H, W), the size of its input feature map: "
                             "its filters are learnt per output position")
        k = self.kernel_size = int(kernel_size)
        self.stride, self.dilation = int(stride), int(dilation)
        self.padding = resolve_padding(k, padding, self.dilation)
        self.channels, self.resize_affinity = in_channels, resize_affinity
        self.input_size = tuple(_pair(input_size))
        self.output_size = self._out_size(self.input_size)
        self.posi_map = nn.Parameter(torch.ones(1, affinity_channels, *self.output_size))
        self.weight_layers = _generator(affinity_channels, hidden_channels, hidden_layers, k * k * in_channels,
                                        self.output_size)
        self.bias_layers = (_generator(affinity_channels, hidden_channels, hidden_layers, in_channels,
                                       self.output_size) if bias_maps else None)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.frozen = False

    def _out_size(self, size) -> tuple[int, int]:
        return tuple(conv_out_size(n, self.kernel_size, self.stride, p, self.dilation)
                     for n, p in zip(size, self.padding))

    def filters(self, out_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor | None]:
        """W (1, C, k², h, w) and the bias maps (1, C, h, w) or None, at `out_size` (default: native)."""
        a = _resized(self.posi_map, out_size or self.output_size)
        weight = _run_generator(self.weight_layers, a).view(1, self.channels, self.kernel_size ** 2, *a.shape[-2:])
        bias_map = None if self.bias_layers is None else _run_generator(self.bias_layers, a)
        return weight, bias_map

    @torch.no_grad()
    def freeze(self) -> "TVConv":
        """Precompute the filter (and bias maps) as buffers and drop the generator (inference)."""
        weight, bias_map = self.filters()
        del self.posi_map, self.weight_layers, self.bias_layers
        self.register_buffer("frozen_weight", weight.detach().clone())
        self.register_buffer("frozen_bias_map", None if bias_map is None else bias_map.detach().clone())
        self.frozen = True
        return self

    def forward(self, x: Tensor) -> Tensor:
        size = tuple(x.shape[-2:])
        if size != self.input_size and (self.frozen or not self.resize_affinity):
            fix = ("rebuild it for the new size (a frozen TVConv cannot resize)" if self.frozen else
                   "pass input_size for this resolution, or resize_affinity=True to resize the affinity maps")
            raise ValueError(f"tvconv was built for {self.input_size[0]}x{self.input_size[1]} inputs "
                             f"(input_size) but got {size[0]}x{size[1]}; {fix}")
        if self.frozen:
            weight, bias_map = self.frozen_weight, self.frozen_bias_map
        else:
            weight, bias_map = self.filters(self._out_size(size))
        out = pixel_filter(x, weight, kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                           dilation=self.dilation)
        if bias_map is not None:
            out = out + bias_map
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
