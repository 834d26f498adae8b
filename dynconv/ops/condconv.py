"""CondConv (Yang et al., NeurIPS 2019) and `ExpertConv`, the mixture-of-kernels body it shares with
DY-Conv and ODConv.

CondConv eq. 1-2: `W(x) = Σ_e r_e(x)·W_e`, routing `r(x) = sigmoid(Linear(GAP(x)))` (one weight per
expert, not a softmax), then an ordinary conv with the per-sample kernel (`sample_conv`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from ..domain import Domain
from ..functional.geometry import check_groups, conv_geometry
from ..functional.library import param_view
from ..functional.sample_conv import sample_conv
from ..operator import Operator
from ..registry import register_op

__all__ = ["ExpertConv", "CondConv"]


class ExpertConv(Operator):
    """`num_experts` kernels of one Conv2d geometry; subclasses compute per-sample mixing coefficients.

    `weight`: (E, C_out, C_in // groups, kh, kw); `bias`: None or (E, C_out).
    """

    has_own_init = True  # the expert kernels' init, per expert
    expert_init_a = math.sqrt(5)  # kaiming_uniform slope: nn.Conv2d's default init, per expert
    conv_prefix = ""  # each expert is conv-shaped: dynconv.replace(warm_start=True) copies the replaced conv in

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                 num_experts):
        super().__init__()
        check_groups(self.op_name, in_channels, out_channels, groups)
        if num_experts < 1:
            raise ValueError(f"{self.op_name}: num_experts must be >= 1, got {num_experts}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.num_experts = num_experts
        self.kernel_size, self.stride, self.padding, self.dilation = conv_geometry(
            kernel_size, stride, padding, dilation)
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in self.weight:
            nn.init.kaiming_uniform_(w, a=self.expert_init_a)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0, 0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def _apply(self, fn, recurse=True):
        """`Module.to(memory_format=torch.channels_last)` converts 4-D and 5-D tensors and fails on the 5-D
        expert kernels (channels_last needs rank 4): apply each conversion to the (E·C_out, C_in/g, kh, kw)
        view instead, so every expert's kernel becomes channels_last like an `nn.Conv2d` weight."""
        def per_expert(t):
            return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2]) if t.dim() == 5 else fn(t)

        return super()._apply(per_expert, recurse)

    def mix(self, coeff: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-sample kernel and bias `Σ_e coeff[b, e]·(W_e, b_e)` for coeff (B, E)."""
        w = self.weight.permute(0, 1, 3, 4, 2)  # (E, C_out, kh, kw, C_in/g)
        if torch.compiler.is_compiling() and self.weight.shape[-2:] != (1, 1) and (w.is_contiguous() or (
                not torch.compiler.is_exporting() and coeff.shape[0] >= self.num_experts)):
            # inductor runs the per-sample conv on channels_last kernels, so it would transpose the mixed
            # (B·C_out, C_in/g, kh, kw) kernels each call: mix in that order instead, where reading the
            # experts in it costs no more (they are channels_last already, or B >= E; torch.export keeps
            # its batch symbolic, so there the batch is not compared)
            return (coeff @ w.flatten(1)).view(-1, *w.shape[1:]).permute(0, 1, 4, 2, 3), \
                None if self.bias is None else coeff @ self.bias
        weight = (coeff @ param_view(self.weight, self.num_experts, -1)).view(-1, *self.weight.shape[1:])
        return weight, None if self.bias is None else coeff @ self.bias

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return sample_conv(x, weight, bias, stride=self.stride, padding=self.padding, dilation=self.dilation,
                           groups=self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, num_experts={self.num_experts}")


@register_op("condconv")
class CondConv(ExpertConv):
    """CondConv: sigmoid-routed mixture of `num_experts` kernels.

    `num_experts=8`: the expert count of the paper's CondConv-EfficientNet-B0 (timm ships it as
    `efficientnet_cc_b0_8e`; timm's `CondConv2d` class default is 4). The routing here is per layer;
    timm's EfficientNet blocks share one routing across pw/dw/pwl.
    """

    domain = Domain(groups=(2,), options=dict(num_experts=3))

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, *, num_experts=8):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts)
        self.routing = nn.Linear(in_channels, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        r = torch.sigmoid(self.routing(x.mean((2, 3))))
        return self.conv(x, *self.mix(r))
