"""ODConv: omni-dimensional dynamic convolution (Li et al., ICLR 2022; official OSVAI/ODConv).

`y = α_f ⊙ ((Σ_i α_k,i · α_s ⊙ W_i) * (α_c ⊙ x))`, four attentions from one squeezed context:
channel α_c (C_in, on the input), filter α_f (C_out, on the output; skipped for depthwise), spatial
α_s (kh·kw; skipped for 1×1) and kernel α_k (softmax over n; skipped for n = 1). All logits are
divided by the temperature T (annealed 30 → 1 over 10 epochs by `on_epoch_start`, see `dyconv.Tempered`).

α_c and α_f are folded into the per-sample kernel, so the whole operator is one `sample_conv`.
Submodule names follow the official code (`attention.fc`, `attention.bn`, `attention.*_fc`, `weight`).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch import Tensor

from ..domain import Domain
from ..registry import register_op
from .condconv import ExpertConv
from .dyconv import Tempered

__all__ = ["ODConv"]


class ODAttention(nn.Module):
    """GAP → 1×1 conv (C_in → max(int(C_in·reduction), min_hidden), no bias) → BN → ReLU → four heads."""

    def __init__(self, in_channels, out_channels, kernel_size, groups, reduction, num_experts, min_hidden):
        super().__init__()
        hidden = max(int(in_channels * reduction), min_hidden)
        self.fc = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(hidden, in_channels, 1)
        depthwise = in_channels == groups == out_channels
        self.filter_fc = None if depthwise else nn.Conv2d(hidden, out_channels, 1)
        taps = kernel_size[0] * kernel_size[1]
        self.spatial_fc = None if taps == 1 else nn.Conv2d(hidden, taps, 1)
        self.kernel_fc = None if num_experts == 1 else nn.Conv2d(hidden, num_experts, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, temperature: Tensor):
        """(α_c (B, C_in), α_f (B, C_out) or None, α_s (B, kh·kw) or None, α_k (B, n) or None)."""
        z = self.relu(self.bn(self.fc(x.mean((2, 3), keepdim=True))))

        def head(fc, act):
            return None if fc is None else act(fc(z).flatten(1) / temperature)

        return (head(self.channel_fc, torch.sigmoid), head(self.filter_fc, torch.sigmoid),
                head(self.spatial_fc, torch.sigmoid), head(self.kernel_fc, partial(torch.softmax, dim=1)))


@register_op("odconv")
class ODConv(Tempered, ExpertConv):
    """ODConv with the official defaults: `num_experts=1` (kernel_num), `reduction=1/16`, `min_hidden=16`.

    `temperature` starts at 30, the first value of the official 30 → 1 schedule; call
    `dynconv.on_epoch_start(model, epoch)` before each training epoch.
    """

    domain = Domain(groups=(2,), options=dict(num_experts=3), batchnorm=True, min_train_batch=2)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, *, num_experts=1, reduction=0.0625, min_hidden=16, temperature=30.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts)
        self.attention = ODAttention(in_channels, out_channels, self.kernel_size, groups, reduction, num_experts,
                                     min_hidden)
        self._init_temperature(temperature)

    def reset_parameters(self) -> None:
        """Official init: kaiming_normal (fan_out, ReLU) per kernel; a bias (not in the official op) starts at 0."""
        for w in self.weight:
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        a_c, a_f, a_s, a_k = self.attention(x, self.temperature)
        b, g = x.shape[0], self.groups
        weight, bias = self.mix(a_k if a_k is not None else x.new_ones(b, 1))
        o, i, kh, kw = weight.shape[1:]
        # kernel element [o, i, :, :] of group g(o) reads input channel g(o)·i_per_group + i
        weight = weight.view(b, g, o // g, i, kh, kw) * a_c.view(b, g, 1, i, 1, 1)
        if a_f is not None:
            weight = weight * a_f.view(b, g, o // g, 1, 1, 1)
        if a_s is not None:
            weight = weight * a_s.view(b, 1, 1, 1, kh, kw)
        return self.conv(x, weight.view(b, o, i, kh, kw), bias)
