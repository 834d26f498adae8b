"""Classification task options that act inside a training step (DCD's mixup ramp)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from engine.config import TrainerConfig
from engine.tasks import ClassificationTask


class Recorder(nn.Module):
    """Returns fixed logits and keeps the batch the task fed it."""

    def forward(self, x):
        self.seen = x.clone()
        return torch.zeros(len(x), 10, requires_grad=True)


@pytest.mark.parametrize("epoch, alpha", [(0, 0.0), (25, 0.05), (50, 0.1), (100, 0.2), (130, 0.2)])
def test_mixup_alpha_ramps_linearly(epoch, alpha):
    """DCD's MobileNetV2 recipe: alpha = 0.2 · epoch / 100 for the first 100 epochs, then 0.2."""
    task = ClassificationTask(TrainerConfig(mixup=0.2, mixup_ramp_epochs=100), SimpleNamespace(num_classes=10))
    model, x, y = Recorder(), torch.randn(8, 3), torch.arange(8) % 10
    torch.manual_seed(0)
    loss, _ = task.train_step(model, x.clone(), y, epoch)  # timm's Mixup mixes in place
    assert task.mixup.mixup_alpha == pytest.approx(alpha) and torch.isfinite(loss)
    assert task.mixup.mixup_enabled == (alpha > 0)
    assert torch.equal(model.seen, x) == (alpha == 0)  # epoch 0: no mixing at all


def test_without_ramp_alpha_is_constant():
    task = ClassificationTask(TrainerConfig(mixup=0.2), SimpleNamespace(num_classes=10))
    task.train_step(Recorder(), torch.randn(8, 3), torch.arange(8) % 10, 0)
    assert task.mixup.mixup_alpha == 0.2 and task.mixup.mixup_enabled
