"""Multiply-accumulates (MACs) of a model, one convention for the trainer and `scripts/complexity.py`.

MACs = the multiply-accumulates of convs, linear layers and matmuls as torch's `FlopCounterMode` sees
them (its FLOPs / 2), plus what each operator reports it cannot see (`Operator.aggregation_macs`: the
per-pixel aggregation of involution, DDF, TVConv, local DK and DK+DCN, C·K²·H_out·W_out each, and
DCN's deformable conv). BN, activations, pooling and the filter normalisations are not counted.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .operator import Operator


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor) -> dict:
    """{"macs": total, "agg_macs": the aggregation part, "act_bytes": float32 bytes of every leaf module's
    output} of one forward pass of `x` (batch 1) in eval mode; the model's mode is restored."""
    agg, act = [0], [0]

    def agg_hook(m, _inp, out):
        agg[0] += m.aggregation_macs(out)

    def leaf_hook(_m, _inp, out):
        if isinstance(out, torch.Tensor):
            act[0] += out[0].numel() * 4

    handles = [m.register_forward_hook(agg_hook) for m in model.modules() if isinstance(m, Operator)]
    handles += [m.register_forward_hook(leaf_hook) for m in model.modules() if not list(m.children())]
    modes = {m: m.training for m in model.modules()}
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return {"macs": counter.get_total_flops() // 2 + agg[0], "agg_macs": agg[0], "act_bytes": act[0]}
