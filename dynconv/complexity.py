"""Multiply-accumulates (MACs) of a model, one convention for the trainer and `scripts/complexity.py`.

MACs = the multiply-accumulates of convs, linear layers and matmuls as torch's `FlopCounterMode` sees
them (its FLOPs / 2), plus the per-pixel aggregation of the dynamic operators that it cannot see
(involution, DDF, TVConv, local DK, DK+DCN: C·K²·H_out·W_out each; DDF's channel-only form is a
conv the counter already sees). BN, activations, pooling and the filter normalisations are not counted.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

PIXEL_OPS = ("involution", "ddf", "tvconv", "dk_local", "dk_dcn")


def _aggregates(m: nn.Module) -> bool:
    return getattr(type(m), "op_name", None) in PIXEL_OPS and getattr(m, "branches", "both") != "channel"


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor) -> dict:
    """{"macs": total, "agg_macs": the aggregation part, "act_bytes": float32 bytes of every leaf module's
    output} of one forward pass of `x` (batch 1) in eval mode; the model's mode is restored."""
    agg, act = [0], [0]

    def pixel_hook(m, _inp, out):
        k = m.kernel_size
        agg[0] += out[0].numel() * (k * k if isinstance(k, int) else math.prod(k))

    def leaf_hook(_m, _inp, out):
        if isinstance(out, torch.Tensor):
            act[0] += out[0].numel() * 4

    handles = [m.register_forward_hook(pixel_hook) for m in model.modules() if _aggregates(m)]
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
