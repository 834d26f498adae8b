"""The paper models as deployed: which ones, at what input size, and how to build one for export.

`scripts/export.py` writes them (.pt2 / ONNX) and `scripts/bench_deploy.py` times them; the
mechanics of export live in `dynconv.export`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ._factory import create


@dataclass(frozen=True)
class PaperModel:
    label: str
    name: str  # registered model name
    img_size: int  # the paper's input resolution
    kwargs: dict = field(default_factory=dict)  # op / policy


PAPER_MODELS = [
    PaperModel("RedNet-26", "rednet26", 224),
    PaperModel("RedNet-50", "rednet50", 224),
    PaperModel("DDF-ResNet-50 (mul)", "ddf_mul_resnet50", 224),
    PaperModel("DDF-ResNet-50 (add)", "ddf_add_resnet50", 224),
    PaperModel("ResNet-18-DCD", "resnet18_dcd", 224),
    PaperModel("ResNet-50-DCD", "resnet50_dcd", 224),
    PaperModel("MobileNetV2-DCD", "mobilenetv2_dcd", 224),
    PaperModel("face MobileNetV2 + TVConv", "face_mobilenetv2_x1_0", 96, {"op": "tvconv"}),
    PaperModel("face ShuffleNetV2 + TVConv", "face_shufflenetv2_x1_0", 96, {"op": "tvconv"}),
    PaperModel("ResNet-50 + ODConv", "dynconv_resnet50", 224, {"op": "odconv", "policy": "all_3x3"}),
    PaperModel("ResNet-50 + CondConv", "dynconv_resnet50", 224, {"op": "condconv", "policy": "all_3x3"}),
    PaperModel("ResNet-50 + DY-Conv", "dynconv_resnet50", 224, {"op": "dyconv", "policy": "all_3x3"}),
]


def build(spec: PaperModel, img_size: int | None = None, **kwargs) -> nn.Module:
    """Paper model `spec` for inputs of `img_size` (default: the paper's), in eval mode."""
    size = img_size or spec.img_size
    return create(spec.name, input_size=(size, size), **{**spec.kwargs, **kwargs}).eval()


@torch.no_grad()
def batch_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of batch `x`, then eval mode.

    A freshly initialised model in eval mode normalises with mean 0 and variance 1, and some
    (ResNet-18-DCD's low-rank path) overflow to inf; with the statistics of one batch the
    activations have a trained model's scale, so numerical comparisons mean something.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly its statistics
    model.train()
    model(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()


__all__ = ["PaperModel", "PAPER_MODELS", "build", "batch_statistics"]
