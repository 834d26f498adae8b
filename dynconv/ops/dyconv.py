"""DY-Conv (Chen et al., CVPR 2020): `W(x) = Σ_k π_k(x)·W_k`, π = softmax(FC2(ReLU(FC1(GAP x))) / T).

Also the temperature mechanism shared with ODConv: `Tempered` modules hold T as a buffer (so a
trained model reloads with its final T) and anneal it from their starting T to 1 over the first 10
epochs in `on_epoch_start` (both papers' schedule), which `dynconv.on_epoch_start(model, epoch)` calls.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..domain import Domain
from ..registry import register_op
from .condconv import ExpertConv

__all__ = ["DYConv", "Tempered", "temperature_at"]


class Tempered:
    """Mixin for operators whose attention logits are divided by a temperature buffer `self.temperature`."""

    def _init_temperature(self, t: float) -> None:
        if t <= 0:
            raise ValueError(f"temperature must be > 0, got {t}")
        self.temperature_start = float(t)
        self.register_buffer("temperature", torch.tensor(float(t)))

    def set_temperature(self, t: float) -> None:
        self.temperature.fill_(float(t))

    def on_epoch_start(self, epoch: int) -> None:
        self.set_temperature(temperature_at(epoch, start=self.temperature_start))


def temperature_at(epoch: float, start: float = 30.0, end: float = 1.0, epochs: float = 10) -> float:
    """Linear schedule `start → end` over the first `epochs` epochs, then `end` (DY-Conv / ODConv: 30 → 1 in 10).

    `epoch` may be fractional (e.g. `epoch + step / steps_per_epoch`) for a per-iteration schedule.
    """
    return end + (start - end) * max(0.0, 1.0 - epoch / epochs)


@register_op("dyconv")
class DYConv(Tempered, ExpertConv):
    """Dynamic convolution over `num_experts` kernels (paper: K=4).

    `temperature=30`: the paper's starting T, annealed 30 → 1 by `on_epoch_start`; the
    unofficial kaijieshi7 code starts at 34 and subtracts 3 per call. Attention hidden width
    int(0.25·C_in)+1, FC1 without bias and FC2 with bias, as that code; bias=True by default.
    """

    domain = Domain(groups=(2,), options=dict(num_experts=3))

    expert_init_a = 0.0  # kaiming_uniform with the ReLU gain, as the unofficial code initialises each kernel

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=True, *, num_experts=4, temperature=30.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts)
        hidden = int(0.25 * in_channels) + 1
        self.attention = nn.Sequential(nn.Linear(in_channels, hidden, bias=False), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, num_experts))
        self._init_temperature(temperature)

    def forward(self, x: Tensor) -> Tensor:
        pi = torch.softmax(self.attention(x.mean((2, 3))) / self.temperature, dim=1)
        return self.conv(x, *self.mix(pi))
