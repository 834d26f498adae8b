"""Small shared pieces of the backbones: channel rounding, conv-norm-act, weight init."""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
import torch.fx
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round `v` to a multiple of `divisor`, never below 90% of `v` (MobileNetV2's rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvNormAct(nn.Sequential):
    """conv → BN → act, children named `conv`, `bn`, `act` (mmcv's ConvModule layout)."""

    def __init__(self, in_ch: int, out_ch: int, k: int, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU):
        layers = OrderedDict(conv=nn.Conv2d(in_ch, out_ch, k, stride, (k - 1) // 2, groups=groups, bias=False),
                             bn=nn.BatchNorm2d(out_ch))
        if act is not None:
            layers["act"] = act(inplace=True)
        super().__init__(layers)


@contextlib.contextmanager
def _stats_kept(modules):
    """Restore the BatchNorm running statistics (and batch counts) of `modules` on exit."""
    buffers = [b for m in modules for sub in m.modules() if isinstance(sub, nn.modules.batchnorm._NormBase)
               for b in sub.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)


def recomputed(modules, x: torch.Tensor) -> torch.Tensor:
    """`modules` applied in turn to x; in training, their activations are not kept but recomputed in
    backward (`torch.utils.checkpoint`, non-reentrant), the recomputation leaving BatchNorm running
    statistics as the forward set them, so each step updates them once. Eager training only: under
    torch.compile the compiler plans recomputation itself, and a `torch.fx` graph records the plain calls."""

    def run(t):
        for m in modules:
            t = m(t)
        return t

    if not (torch.is_grad_enabled() and any(m.training for m in modules)) or torch.compiler.is_compiling() \
            or torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy):
        return run(x)
    return checkpoint(run, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _stats_kept(modules)))


def kaiming_conv_init(module: nn.Module, zero_bias: bool = False, linear_std: float | None = None) -> None:
    """kaiming_normal(fan_out, relu) on every Conv2d (torchvision, timm, mmcv and DCD's N(0, √(2/(k²·C_out))));
    norm layers to 1/0; conv biases to 0 when `zero_bias` (mmcv's kaiming_init); Linear layers to
    N(0, linear_std) with zero bias when given (MobileNetV2, the face nets)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if zero_bias and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def op_init(zero_bias: bool = False, linear_std: float | None = None):
    """The `init(op, module)` hook for `dynconv.replace`: the backbone's init on new operators,
    except those with an init of their own."""

    def init(op: str, module: nn.Module) -> None:
        if not any(getattr(m, "has_own_init", False) for m in module.modules()):  # zero offsets, expert init
            kaiming_conv_init(module, zero_bias, linear_std)

    return init


timm_init = op_init()
mmcv_init = op_init(zero_bias=True)
mobilenet_init = op_init(zero_bias=True, linear_std=0.01)
__all__ = ["make_divisible", "ConvNormAct", "recomputed", "kaiming_conv_init", "op_init", "timm_init", "mmcv_init", "mobilenet_init"]
