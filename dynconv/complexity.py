"""Multiply-accumulates (MACs) of a model, one convention for the trainer and `scripts/complexity.py`.

MACs = the multiply-accumulates of convs, linear layers and matmuls as torch's `FlopCounterMode` sees
them (its FLOPs / 2), plus what each operator reports it cannot see (`Operator.aggregation_macs`: the
per-pixel aggregation of involution, DDF, TVConv, local DK and DK+DCN, C·K²·H_out·W_out each, and
DCN's deformable conv). BN, activations, pooling and the filter normalisations are not counted.

Two forms where they differ: the training form runs every generator per pass; the inference form counts the
generators that do not depend on the input (TVConv's weight maps, which `freeze()` precomputes) once, apart from
the per-image MACs. TVConv's paper states its efficiency for the inference form; every other operator has one form.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .operator import Operator


def _forward_macs(model: nn.Module, x: torch.Tensor, agg: list[int]) -> int:
    agg[0] = 0
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    return counter.get_total_flops() // 2 + agg[0]


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor) -> dict:
    """MACs of `model` on `x` (batch 1) in eval mode, in both forms; the model's mode is restored.

    - "macs": the training form, one forward pass of `x` (`agg_macs`: its aggregation part);
    - "inference_macs": the inference form per image, without the work that does not depend on the batch (TVConv's
      weight generator, which `freeze()` precomputes): what a second image adds to a pass;
    - "precomputed_macs": that batch-independent work, counted once ("macs" = "inference_macs" + it);
    - "act_bytes": float32 bytes of every leaf module's output for one image.
    """
    agg, act = [0], [0]

    def agg_hook(m, _inp, out):
        agg[0] += m.aggregation_macs(out)

    def leaf_hook(_m, _inp, out):
        if isinstance(out, torch.Tensor):
            act[0] += out[0].numel() * 4

    handles = [m.register_forward_hook(agg_hook) for m in model.modules() if isinstance(m, Operator)]
    leaves = [m.register_forward_hook(leaf_hook) for m in model.modules() if not list(m.children())]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        one = _forward_macs(model, x, agg)
        agg_one = agg[0]
        for h in leaves:
            h.remove()
        per_image = _forward_macs(model, torch.cat([x, x]), agg) - one
    finally:
        for h in handles + leaves:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return {"macs": one, "agg_macs": agg_one, "inference_macs": per_image, "precomputed_macs": one - per_image,
            "act_bytes": act[0]}


def format_macs(r: dict) -> str:
    """The training form's MACs per image, and the inference form's where it differs (the run log)."""
    text = f"{r['macs']:,} MACs/image"
    if r["precomputed_macs"]:
        text += (f" in the training form; inference form (freeze()): {r['inference_macs']:,} MACs/image + "
                 f"{r['precomputed_macs']:,} once")
    return text
