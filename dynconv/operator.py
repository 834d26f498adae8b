"""`Operator`: the base class of every registered operator, and the model-wide helpers that ask it.

An operator owns what the rest of the code needs to know about it, so that a new operator is never
added to a list elsewhere: whether it brings its own init, the aggregation MACs a FLOP counter cannot
see, the images worth logging and any per-epoch schedule.
"""
from __future__ import annotations

import functools

import numpy as np
import torch.fx
import torch.nn as nn
from torch import Tensor

from .domain import Domain

__all__ = ["Operator", "on_epoch_start", "tensorboard_images"]


class Operator(nn.Module):
    """Defaults for the operator hooks; an operator overrides the ones that apply to it."""

    has_own_init: bool = False  # True: its paper defines its init; a backbone's conv init must not overwrite it
    domain: Domain = Domain()  # what it accepts: the conformance suite's samples come from it

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not getattr(cls.forward, "fx_leaf", False):  # its own forward, or one inherited from outside (Conv2d)
            cls.forward = _fx_leaf(cls.forward)

    def aggregation_macs(self, out: Tensor) -> int:
        """MACs of producing `out` that torch's `FlopCounterMode` does not see (per-pixel aggregation)."""
        return 0

    def tensorboard_images(self) -> dict[str, np.ndarray]:
        """Images worth logging (name → HWC uint8)."""
        return {}

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (e.g. a softmax temperature schedule)."""


def _fx_leaf(forward):
    """Make the operator one `call_module` node under any `torch.fx` tracer (`symbolic_trace`, torchvision's
    `create_feature_extractor`): its forward checks shapes and calls custom ops, which symbolic tracing cannot
    follow. Tensors pass straight through."""

    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)
        if proxy is None:
            return forward(self, *args, **kwargs)
        return proxy.tracer.create_proxy("call_module", proxy.tracer.path_of_module(self), args, kwargs)

    wrapped.fx_leaf = True
    return wrapped


def on_epoch_start(model: nn.Module, epoch: int) -> None:
    """Call `on_epoch_start(epoch)` on every operator of `model`."""
    for m in model.modules():
        if isinstance(m, Operator):
            m.on_epoch_start(epoch)


def tensorboard_images(model: nn.Module, max_modules: int | None = 2) -> dict[str, np.ndarray]:
    """The images of `model`'s operators, keys prefixed by the module name; only the first `max_modules`
    operators that have images (None: all), as TensorBoard shows every image of every step."""
    out, taken = {}, 0
    for name, m in model.named_modules():
        if max_modules is not None and taken >= max_modules:
            break
        images = m.tensorboard_images() if isinstance(m, Operator) else {}
        out.update({f"{name}/{key}": img for key, img in images.items()})
        taken += bool(images)
    return out


def pixel_macs(out: Tensor, kernel_size) -> int:
    """B·C·K²·H_out·W_out for `out` (B, C, H_out, W_out): one multiply-add per tap and output element."""
    taps = kernel_size * kernel_size if isinstance(kernel_size, int) else kernel_size[0] * kernel_size[1]
    return out.numel() * taps
