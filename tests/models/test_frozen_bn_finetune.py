"""Fine-tuning with frozen BatchNorm (`norm_eval=True`, mmdet's backbone option) through the fast kernels and the
involution recompute equals the reference backend (the unfused decomposition): the loss at every step and every
weight after the steps. Before the fix the recompute rebuilt the generator with batch statistics while the forward
used the running ones: input gradients 81 % off, parameter gradients 140 % off."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import dynconv
import models  # noqa: F401  (registers the paper models with timm)
from tests.dynconv.conformance import sgd_steps

STEPS = 2
# float64 sums of at most ~10⁵ terms (the weight gradients) between two orders: ≤ 1e5 · 1.1e-16 relative each,
# through the depth and the steps; frozen statistics used wrongly change the gradients by tens of percent
RTOL = 1e-9


def _finetune(model: torch.nn.Module, x: torch.Tensor, backend: str):
    with dynconv.use_backend(backend):
        return sgd_steps(model, model, x, STEPS)


@pytest.mark.parametrize("name", ["rednet26", "ddf_mul_resnet50"])
def test_frozen_bn_finetune_equals_reference(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, width=0.125, small_input=True, norm_eval=True).double()
    with torch.no_grad():  # pretrained-like statistics, so that frozen BatchNorm is not the identity
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, _BatchNorm))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = _finetune(copy.deepcopy(model), x, "reference")
    losses, state = _finetune(model, x, "fast")
    torch.testing.assert_close(losses, expected[0], rtol=RTOL, atol=0)
    for key, value in expected[1].items():
        scale = float(value.abs().max()) if value.is_floating_point() and value.numel() else 1.0
        torch.testing.assert_close(state[key], value, rtol=0, atol=RTOL * scale, msg=lambda m: f"{key}: {m}")
