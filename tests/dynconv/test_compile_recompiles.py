"""How often `torch.compile` traces the operators of the paper models: once per batch-size class and per
train/eval mode, never again across steps (a recompilation on every step would make a compiled model slower
than eager).

Counted with dynamo's `CompileCounter` backend (one count per traced graph, no inductor build) on one layer
of DDF-ResNet-50 (add) and of ResNet-18-DCD, each after a stem conv.
"""
import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounter

import dynconv

LAYERS = {"ddf add": ("ddf", dict(kernel_combine="add")), "dcd pool2": ("dcd", dict(context="pool2"))}


def _net(key: str) -> nn.Module:
    name, kwargs = LAYERS[key]
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         dynconv.create_op(name, 16, 16, 3, **kwargs))


@pytest.mark.parametrize("key", list(LAYERS))
def test_symbolic_batch_traces_once_per_batch_class(key):
    """As scripts/bench_deploy.py compiles (dynamic=True, first call at batch 2): batch 1 is specialised (0/1
    specialisation) and batch >= 16 gets its own graph (oneDNN's conv selection tests `batch >= 16`, which
    guards the first graph to 2 <= batch <= 15); every other batch reuses one of those three."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(_net(key).eval(), backend=counter, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        for batch in (2, 3, 15, 1, 1, 16, 17, 40, 2, 1):
            compiled(torch.randn(batch, 3, 8, 8))
    assert counter.frame_count == 3


@pytest.mark.parametrize("key", list(LAYERS))
def test_training_steps_trace_once_per_mode(key):
    """As trainer.compile compiles (default dynamic): one graph for train mode and one for eval mode, however
    the steps alternate."""
    torch._dynamo.reset()
    model = _net(key)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(4, 3, 8, 8)
    for training in (True, True, True, False, False, True, True, False):
        model.train(training)
        with torch.set_grad_enabled(training):
            out = compiled(x)
        if training:
            out.square().mean().backward()
    assert counter.frame_count == 2
