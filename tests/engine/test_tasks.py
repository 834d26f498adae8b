"""The classification task's own loss options: DCD's mixup ramp, and bad options named when the task is built."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from data.config import ConfigError
from engine.tasks import ClassificationTask, build_task


class Recorder(nn.Module):
    """Returns fixed logits and keeps the batch the task fed it."""

    def forward(self, x):
        self.seen = x.clone()
        return torch.zeros(len(x), 10, requires_grad=True)


@pytest.mark.parametrize("epoch, alpha", [(0, 0.0), (25, 0.05), (50, 0.1), (100, 0.2), (130, 0.2)])
def test_mixup_alpha_ramps_linearly(epoch, alpha):
    """DCD's MobileNetV2 recipe: alpha = 0.2 · epoch / 100 for the first 100 epochs, then 0.2."""
    task = ClassificationTask(SimpleNamespace(num_classes=10), mixup=0.2, mixup_ramp_epochs=100)
    model, x, y = Recorder(), torch.randn(8, 3), torch.arange(8) % 10
    torch.manual_seed(0)
    np.random.seed(0)  # timm's Mixup draws lambda from numpy: Beta(0.05, 0.05) gives exactly 1 (no mixing) ~8% of draws
    loss, _ = task.train_step(model, x.clone(), y, epoch)  # timm's Mixup mixes in place
    assert task.mixup.mixup_alpha == pytest.approx(alpha) and torch.isfinite(loss)
    assert task.mixup.mixup_enabled == (alpha > 0)
    assert torch.equal(model.seen, x) == (alpha == 0)  # epoch 0: no mixing at all


def test_without_ramp_alpha_is_constant():
    task = ClassificationTask(SimpleNamespace(num_classes=10), mixup=0.2)
    task.train_step(Recorder(), torch.randn(8, 3), torch.arange(8) % 10, 0)
    assert task.mixup.mixup_alpha == 0.2 and task.mixup.mixup_enabled


@pytest.mark.parametrize("task_cfg, message", [
    ({"name": "classification", "smoothin": 0.1}, "unknown config key 'task.smoothin'; did you mean task.smoothing?"),
    ({"name": "classification", "mixup_prob": 1.5}, "task.mixup_prob=1.5: must be in [0, 1]"),
    ({"name": "classification", "smoothing": 1.0}, "task.smoothing=1.0: must be in [0, 1)"),
    ({"name": "face", "flip": True}, "unknown config key 'task.flip'; did you mean task.flip_test?"),
    ({"name": "face"}, "task=face needs a margin head: margin=cosface or margin=arcface"),
    ({"name": "segmentation"}, "unknown task 'segmentation'; known tasks: classification, face"),
])
def test_bad_task_options_are_named(task_cfg, message):
    import engine.face  # noqa: F401  (registers task=face)

    with pytest.raises(ConfigError) as err:
        build_task(task_cfg, SimpleNamespace(num_classes=10))
    assert message in str(err.value)
