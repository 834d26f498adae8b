"""Precise BN: recompute batch-norm running statistics with the current weights before evaluating.

BN's running statistics are an exponential average (momentum 0.1) of batch statistics taken while
the weights were changing; early in training, or on budgets of a few dozen steps, they lag the
weights, and evaluation with them can sit near chance while the same weights with batch statistics
classify well (measured on the grid suite: ODConv in MobileNetV2 after 62 steps, 14 % eval top-1
with the running averages, 71 % once they were recomputed). Precise BN (Wu & Johnson, "Rethinking
'Batch' in BatchNorm", 2021; pycls, mmpretrain's `PreciseBNHook`) fixes them: reset every BN
layer's statistics and average the batch statistics of N training batches under the frozen
current weights (BN's cumulative mode, `momentum=None`), then put the layers back as they were.

`trainer.precise_bn_batches=N` turns it on (0: off); each process averages its own batches, and
`trainer.dist_bn=reduce` then averages the processes. The EMA model is left as it is (its
statistics follow its own averaged weights).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["bn_layers", "recompute_bn_stats"]


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BN layers of `model` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable, num_batches: int,
                       prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                       autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> int:
    """Replace the running statistics of `model`'s BN layers by the average of the batch statistics of
    up to `num_batches` batches of `batches` ((input, target) pairs; `prepare` moves an input to the
    model's device and layout). Returns how many batches were used (0: nothing changed).

    Only the BN statistics change: the model goes back to its train/eval mode, every layer to its
    momentum and `num_batches_tracked`; no gradient is taken, no parameter moves.
    """
    layers = bn_layers(model)
    if not layers or num_batches <= 0:
        return 0
    saved = [(bn.momentum, bn.num_batches_tracked.clone(), bn.running_mean.clone(), bn.running_var.clone())
             for bn in layers]
    was_training = model.training
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.train()
    used = 0
    try:
        for x, _ in batches:
            if used == num_batches:
                break
            with autocast():
                model(prepare(x))
            used += 1
    finally:
        model.train(was_training)
        for bn, (momentum, tracked, mean, var) in zip(layers, saved):
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)
            if used == 0:  # no batch came: keep the old statistics rather than the reset ones
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
    return used
