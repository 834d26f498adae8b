"""TVConv: translation-variant convolution (Chen et al., CVPR 2022).

Learnable affinity maps A (initialised to ones) pass through a weight-generating block B to give a
depthwise k×k filter per output position, W = B(A) (Eq. 2), shared by every sample of the batch
and applied with `pixel_filter`. The filter does not depend on the input, so `freeze()` can
compute it once for inference.

`affinity_init` (an ablation of A's initialisation): "ones" (official), "normal" (i.i.d. N(1, 1)),
or "data", a data-dependent initialisation done once, on the first training-mode forward pass
(like ActNorm). The reference does not specify the paper's "data statistics" initialisation, so
this is our definition: from that first input x (B, C, H, W), four statistics per input position,
taken over the batch and channels: mean(x), std(x) (population), mean(|x|), max(x); each is
average-pooled to the output size (`adaptive_avg_pool2d`), standardised over the positions (zero
mean, unit population std floored at 1e-6) and shifted by +1, so the maps stay centred where
"ones" puts them. Affinity channel i takes statistic i mod 4. Under torch.distributed the maps
are averaged over ranks, so every replica starts from the same maps.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from ..domain import Domain
from ..functional.geometry import check_channelwise, conv_out_size, resolve_padding
from ..functional.pixel_filter import pixel_filter
from ..operator import Operator, pixel_macs
from ..registry import register_op


def _block(cin: int, cout: int, size: tuple[int, int]) -> nn.Sequential:
    """Conv3×3 (no bias) → LayerNorm over (C, h, w) → ReLU, the official `_ConvBlock`."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.LayerNorm([cout, *size]),
                         nn.ReLU(inplace=True))


def _generator(cin: int, hidden: int, layers: int, cout: int, size: tuple[int, int]) -> nn.Sequential:
    blocks = [_block(cin, hidden, size)] + [_block(hidden, hidden, size) for _ in range(layers)]
    return nn.Sequential(*blocks, nn.Conv2d(hidden, cout, 3, padding=1, bias=False))


AFFINITY_INITS = ("ones", "normal", "data")


def data_affinity(x: Tensor, channels: int, out_size: tuple[int, int]) -> Tensor:
    """The "data" affinity maps (1, channels, h, w) from a batch x (module docstring)."""
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))  # half inputs (AMP): statistics in float32
    stats = torch.stack([x.mean((0, 1)), x.std((0, 1), unbiased=False), x.abs().mean((0, 1)), x.amax((0, 1))])
    stats = F.adaptive_avg_pool2d(stats, out_size)
    flat = stats.flatten(1)
    # the floor keeps a (near-)constant statistic, or a 1×1 output, at ≈1 instead of 0/0 or rounding noise
    stats = (stats - flat.mean(1)[:, None, None]) / flat.std(1, unbiased=False).clamp_min(1e-6)[:, None, None]
    return (stats + 1)[torch.arange(channels, device=x.device) % 4].unsqueeze(0)


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


def image_grid(maps: Tensor, cols: int = 8, pad: int = 1) -> np.ndarray:
    """(N, h, w) maps, each min-max scaled, tiled into one gray HWC uint8 image."""
    maps = maps.detach().float().cpu()
    lo = maps.flatten(1).min(1).values[:, None, None]
    hi = maps.flatten(1).max(1).values[:, None, None]
    maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
    n, h, w = maps.shape
    rows = -(-n // cols)
    canvas = torch.ones(rows * (h + pad), min(n, cols) * (w + pad))
    for i, m in enumerate(maps):
        r, c = divmod(i, cols)
        canvas[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = m
    return (canvas[..., None].expand(-1, -1, 3) * 255).round().to(torch.uint8).numpy()


@register_op("tvconv")
class TVConv(Operator):
    """Depthwise translation-variant conv with the official training defaults (4 affinity maps,
    width 64, 3 inner layers; keys `posi_map`, `weight_layers.*`, optional `bias_layers.*`).
    `affinity_init="data"` adds the persistent bool buffer `affinity_initialised` (only then, so
    the official keys are unchanged): a loaded checkpoint that holds it is not initialised again.

    `input_size` is the input's (H, W); the maps live at the output size. Another input size
    raises an error unless `resize_affinity=True`: then the affinity maps and the LayerNorm affine
    maps are resized bilinearly to the new output size, and LayerNorm normalises over the actual
    (C, h, w). `bias=True` adds a per-channel bias; `bias_maps=True` a per-position one (official).
    """

    domain = Domain(channelwise=True, fixed_input_size=True,
                    options=dict(affinity_channels=2, hidden_channels=8, hidden_layers=2))

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=None,
                 dilation: int = 1, groups: int = 1, bias: bool = False, *, input_size=None,
                 affinity_channels: int = 4, hidden_channels: int = 64, hidden_layers: int = 3,
                 bias_maps: bool = False, resize_affinity: bool = False, affinity_init: str = "ones"):
        super().__init__()
        check_channelwise("tvconv", in_channels, out_channels, groups)
        if affinity_init not in AFFINITY_INITS:
            raise ValueError(f"tvconv: affinity_init must be one of {AFFINITY_INITS}, got {affinity_init!r}")
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
        if affinity_init == "normal":
            nn.init.normal_(self.posi_map, 1.0, 1.0)
        self.affinity_init = affinity_init
        # a Python flag, so that the buffer (a device tensor) is read once, not synchronised every step
        self._affinity_pending = affinity_init == "data"
        if self._affinity_pending:
            self.register_buffer("affinity_initialised", torch.tensor(False))
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
    def _init_affinity(self, x: Tensor) -> None:
        """The "data" initialisation from the first training batch `x` (module docstring), once."""
        if not bool(self.affinity_initialised):
            maps = data_affinity(x, self.posi_map.shape[1], self.output_size)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(maps)
                maps /= dist.get_world_size()
            self.posi_map.copy_(maps)
            self.affinity_initialised.fill_(True)
        self._affinity_pending = False

    @torch.no_grad()
    def freeze(self) -> "TVConv":
        """Precompute the filter (and bias maps) as buffers and drop the generator (inference)."""
        if self.affinity_init == "data" and not bool(self.affinity_initialised):
            raise ValueError("tvconv: affinity_init='data' has not initialised the affinity maps yet; run one "
                             "training-mode forward pass (or load a trained checkpoint) before freeze()")
        weight, bias_map = self.filters()
        del self.posi_map, self.weight_layers, self.bias_layers
        if self.affinity_init == "data":
            del self.affinity_initialised
        self.register_buffer("frozen_weight", weight.detach().clone())
        self.register_buffer("frozen_bias_map", None if bias_map is None else bias_map.detach().clone())
        self.frozen = True
        return self

    def aggregation_macs(self, out: Tensor) -> int:
        return pixel_macs(out, self.kernel_size)

    @torch.no_grad()
    def tensorboard_images(self) -> dict[str, np.ndarray]:
        """The affinity maps, and the generated per-pixel filters of the first 4 channels (one row each)."""
        if self.frozen:
            return {}
        w = self.filters()[0][0]  # (C, K*K, h, w)
        return {"affinity": image_grid(self.posi_map[0]), "filters": image_grid(w[:4].flatten(0, 1), cols=w.shape[1])}

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
            if self._affinity_pending and self.training:
                self._init_affinity(x)
            weight, bias_map = self.filters(self._out_size(size))
        out = pixel_filter(x, weight, kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                           dilation=self.dilation)
        if bias_map is not None:
            out = out + bias_map
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
