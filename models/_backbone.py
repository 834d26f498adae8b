"""timm's model interface for our backbones, and the mmdet/mmseg backbone options.

timm's tools and feature wrappers ask every model for the same things (`forward_features`, `forward_head`,
`forward_intermediates`, `feature_info`, `reset_classifier`, `set_grad_checkpointing`, ...); detection and
segmentation recipes (the involution paper's Mask R-CNN, RetinaNet, Semantic FPN and UPerNet on RedNet) freeze
the stem and the first stages (`frozen_stages`) and keep every BatchNorm in eval mode (`norm_eval`). `Backbone`
gives all of it once, from a trunk of named steps and a list of feature levels that each network declares.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d, register_notrace_module
from timm.models._features import feature_take_indices

from dynconv import Operator
from dynconv.registry import OptionError

from ._layers import recomputed

# timm's FX feature extraction (FeatureGraphNet, `get_notrace_modules()`) keeps every operator one node
register_notrace_module(Operator)


def level(num_chs: int, reduction: int, module: str) -> dict:
    """One feature level of `feature_info`: the output of trunk step `module`."""
    return dict(num_chs=num_chs, reduction=reduction, module=module)


class Backbone(nn.Module):
    """A trunk of named steps run in turn (`trunk`: module names), the feature levels taken from it
    (`feature_info`, level 0 the stem) and a head (`forward_head`, `reset_classifier`, `get_classifier`).

    `frozen_stages=N` keeps the trunk up to level N (the stem and the first N stages) in eval mode without
    gradients, `norm_eval` every BatchNorm in eval mode (mmdet's options, re-applied by every `train()`).
    """

    trunk: list[str]
    feature_info: list[dict]
    grad_checkpointing = False
    frozen_stages = -1
    norm_eval = False

    def _steps(self, names) -> list[tuple[str, nn.Module]]:
        return [(n, self.get_submodule(n)) for n in names]

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # `recomputed` restores BatchNorm statistics after the recompute: training is identical with it on and off
        return recomputed([module], x) if self.grad_checkpointing else module(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for _, m in self._steps(self.trunk):
            x = self._run(m, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The feature maps of levels `indices` (None: all; an int n: the last n) and, unless
        `intermediates_only`, the final features; `norm` is accepted for timm's wrappers (no final norm here)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: our backbones give NCHW feature maps")
        take, last = feature_take_indices(len(self.feature_info), indices)
        wanted = {self.feature_info[i]["module"] for i in take}
        end = self.trunk.index(self.feature_info[last]["module"]) + 1 if stop_early or intermediates_only else None
        intermediates = []
        for name, m in self._steps(self.trunk[:end]):
            x = self._run(m, x)
            if name in wanted:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the trunk after the last level of `indices` (and the head): a feature extractor keeps no unused
        parameters (DDP would wait for their gradients)."""
        take, last = feature_take_indices(len(self.feature_info), indices)
        end = self.trunk.index(self.feature_info[last]["module"]) + 1
        for name in self.trunk[end:]:
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent), child, nn.Identity())
        pruned = end < len(self.trunk)
        self.trunk, self.feature_info = self.trunk[:end], self.feature_info[:last + 1]
        if pruned:
            self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
        if prune_head or pruned:
            self.reset_classifier(0, "")
        return take

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each trunk step's activations in backward instead of keeping them."""
        self.grad_checkpointing = enable

    def set_backbone_options(self, frozen_stages: int = -1, norm_eval: bool = False) -> None:
        if not -1 <= frozen_stages < len(self.feature_info):
            raise OptionError(f"frozen_stages={frozen_stages}: must be -1 (none) to {len(self.feature_info) - 1} "
                              f"(the stem and the first N of the {len(self.feature_info) - 1} stages)")
        self.frozen_stages, self.norm_eval = frozen_stages, bool(norm_eval)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_stages >= 0:
            end = self.trunk.index(self.feature_info[self.frozen_stages]["module"]) + 1
            for _, m in self._steps(self.trunk[:end]):
                m.eval()
                m.requires_grad_(False)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def classifier(make: Callable[[int, int], nn.Module], in_features: int, num_classes: int) -> nn.Module:
    return make(in_features, num_classes) if num_classes > 0 else nn.Identity()


class PooledClassifier:
    """Head of children `global_pool`, `drop`, `fc` (timm's ResNet head), for modules that set `num_features`,
    `num_classes` and `make_classifier` (nn.Linear, or DCD's DYCls)."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if not global_pool and num_classes:
                raise ValueError("global_pool='' (no pooling) needs num_classes=0: the classifier takes pooled "
                                 "features")
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.num_classes = num_classes
        self.fc = classifier(self.make_classifier, self.num_features, num_classes)

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False):
        return "fc" if name_only else self.fc


class ClassifierHead(PooledClassifier, nn.Module):
    """global pool → dropout → classifier, as one `head` module (MobileNetV2's `head.fc`)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float,
                 make_classifier: Callable[[int, int], nn.Module] = nn.Linear):
        super().__init__()
        self.num_features = self.head_hidden_size = in_features
        self.make_classifier = make_classifier
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.forward_head(x, pre_logits)


class HeadDelegate:
    """The head API of a network whose head is one `head` module with `forward(x, pre_logits)`,
    `reset_classifier` and `get_classifier`."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.head.reset_classifier(num_classes, global_pool)
        self.num_classes, self.head_hidden_size = self.head.num_classes, self.head.head_hidden_size

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False):
        return "head." + self.head.get_classifier(True) if name_only else self.head.get_classifier()


__all__ = ["Backbone", "level", "classifier", "PooledClassifier", "ClassifierHead", "HeadDelegate"]
