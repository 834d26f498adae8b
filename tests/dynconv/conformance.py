"""The operator conformance harness: samples drawn from each operator's declared `Domain`, the execution
paths a user can take, and one comparison of a path against the reference backend.

A path runs a module on an input and an output gradient and returns a `Result`: the output, the input
gradient, every parameter gradient (values and strides) and every buffer after the step. `compare` holds
it to the reference backend's `Result` for the same module, input and output gradient.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import dynconv

from .op_checks import OpRecord

OPS = dynconv.list_ops()


@dataclass(frozen=True)
class Sample:
    batch: int
    size: tuple[int, int]
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    layout: str = "contiguous"  # "channels_last" (module too, as trainer.channels_last) or "strided" (a view)

    def __str__(self) -> str:
        extra = "".join(f"-{k}{v}" for k, v in (("d", self.dilation), ("g", self.groups)) if v != 1)
        return f"b{self.batch}-{self.size[0]}x{self.size[1]}-k{self.kernel_size}-s{self.stride}{extra}-{self.layout}"


def samples(domain: dynconv.Domain) -> list[Sample]:
    """The fixed sample set of an operator: batch 0, 1, 2 and odd; stride 1 and 2; odd, non-square sizes and a
    size smaller than the kernel; channels_last and non-contiguous inputs; dilation and groups where declared."""
    ks = domain.kernel_sizes
    k = 3 if 3 in ks else ks[-1]
    s2 = max(domain.strides)
    out = [Sample(2, (7, 9), k), Sample(3, (9, 6), max(ks), s2, layout="channels_last"),
           Sample(1, (5, 5), k, s2, layout="strided"), Sample(0, (6, 7), k, s2), Sample(3, (8, 8), k, s2),
           Sample(2, (2, 3), max(ks), layout="channels_last"), Sample(1, (4, 6), min(ks), 1, layout="strided")]
    out += [Sample(2, (8, 7), k, 1, dilation=d) for d in domain.dilations if d != 1]
    out += [Sample(3, (6, 6), k, s2, groups=g, layout="channels_last") for g in domain.groups]
    return out


def build(name: str, sample: Sample, dtype=torch.float64) -> torch.nn.Module:
    """The operator for `sample`, its parameters drawn from a fixed seed (so no zero-initialised offset or
    gate leaves a path unexercised), in `dtype` and the sample's memory format."""
    domain = dynconv.get_op(name).domain
    C = domain.channels
    torch.manual_seed(0)
    module = dynconv.create_op(name, C, C, sample.kernel_size, stride=sample.stride,
                               **domain.constructor_kwargs(sample.size, sample.dilation, sample.groups))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
        for m in module.modules():
            if isinstance(m, _BatchNorm) and m.running_var is not None:
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    module = module.to(dtype)
    return module.to(memory_format=torch.channels_last) if sample.layout == "channels_last" else module


def make_input(name: str, sample: Sample, dtype=torch.float64, batch: int | None = None,
               size: tuple[int, int] | None = None) -> torch.Tensor:
    C = dynconv.get_op(name).domain.channels
    B, (H, W) = sample.batch if batch is None else batch, size or sample.size
    g = torch.Generator().manual_seed(1)
    if sample.layout == "strided":  # every other column of a wider tensor: no memory format at all
        return torch.randn(B, C, H, 2 * W, generator=g, dtype=dtype)[..., ::2]
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if sample.layout == "channels_last" else x


def custom_ops(name: str) -> set[str]:
    """The `dynconv::` custom ops an operator's fast forward calls (those the compiled kernels or Triton serve):
    where there are none, the paths that switch kernels (`DYNCONV_NATIVE=0`, Triton) run the same code."""
    sample = Sample(2, (6, 6), dynconv.get_op(name).domain.kernel_sizes[-1])
    module = build(name, sample, torch.float32).eval()
    with OpRecord() as record, torch.no_grad():
        module(make_input(name, sample, torch.float32))
    return {func.name() for func, _, _ in record.calls if func.namespace == "dynconv"}


@dataclass
class Result:
    out: torch.Tensor
    grad_x: torch.Tensor
    grads: dict = field(default_factory=dict)  # parameter name → gradient (None where it got none)
    strides: dict = field(default_factory=dict)  # parameter name → (gradient strides, parameter strides)
    buffers: dict = field(default_factory=dict)


MODES = ("train", "eval", "frozen_bn")


def outside(name: str, sample: Sample, mode: str) -> bool:
    """True where the sample is outside the operator's domain in this mode: a batch too small to train on."""
    return mode == "train" and 0 < sample.batch < dynconv.get_op(name).domain.min_train_batch


@contextlib.contextmanager
def domain_error(compiled: bool = False):
    """The one-line error of a sample outside the domain (BatchNorm's, for a batch too small to train on); a
    fullgraph compile raises it wrapped in one of dynamo's exceptions."""
    if compiled:
        with pytest.raises((ValueError, torch._dynamo.exc.TorchDynamoException)):
            yield
        return
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        yield


def set_mode(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """train, eval, or frozen BatchNorm: training with every BatchNorm in eval mode (mmdet's `norm_eval`)."""
    module.train(mode != "eval")
    if mode == "frozen_bn":
        for m in module.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
    return module


def step(module: torch.nn.Module, x: torch.Tensor, grad_out_seed: int = 2, fn=None) -> Result:
    """One forward and backward of `fn` (default `module`) on a copy of `x`, with an output gradient drawn
    from a fixed seed (a random one, so that no normalisation cancels it)."""
    fn = module if fn is None else fn
    module.zero_grad(set_to_none=True)
    xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    out = fn(xi)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=torch.float64)
    out.backward(g.to(out.dtype))
    params = dict(module.named_parameters())
    return Result(out.detach(), xi.grad, {n: p.grad for n, p in params.items()},
                  {n: (None if p.grad is None else p.grad.stride(), p.stride()) for n, p in params.items()},
                  {n: b.detach().clone() for n, b in module.named_buffers()})


def reference(module: torch.nn.Module, x: torch.Tensor, **kw) -> Result:
    """The oracle: the same step on a copy of the module under the reference backend."""
    with dynconv.use_backend("reference"):
        return step(copy.deepcopy(module), x, **kw)


@contextlib.contextmanager
def environment(**env):
    """Environment variables set inside the block (the kernels read theirs at every call)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tolerance(dtype: torch.dtype, sample: Sample, channels: int) -> float:
    """Relative bound (to the reference tensor's largest magnitude) on the difference of two evaluations in
    `dtype` that sum in different orders or round at different points.

    A sum of n terms in precision u differs by at most n·u·Σ|t_i| between two orders; n here is the longest
    reduction any output or gradient of a sample takes (a weight gradient: every sample, output pixel, input
    channel and tap), and Σ|t_i| is taken as 8× the largest result (the generators' normalisations keep the
    terms of order one). Half types compute in float32 and round once more at each of the 4 points where an
    operator stores them (its input, generated filter, output and input gradient). A dropped tap or bias
    changes a result by a fraction of its size, far above this bound.
    """
    n = max(sample.batch, 1) * sample.size[0] * sample.size[1] * channels * sample.kernel_size ** 2
    u32 = torch.finfo(torch.float32).eps / 2
    if dtype in (torch.float16, torch.bfloat16):
        return 8 * (4 * torch.finfo(dtype).eps / 2 + n * u32)
    return 8 * n * torch.finfo(dtype).eps / 2


def compare(actual: Result, expected: Result, rtol: float, *, grads: bool = True, exact_strides: bool = True,
            what: str = "") -> None:
    """Output, input gradient, every parameter gradient (and its strides: equal to the parameter's, as DDP's buckets
    expect, or with `exact_strides=False` at every dimension of size > 1, autograd's layout contract) and every
    buffer, within `rtol` of each reference tensor's scale."""

    def close(a, e, name):
        assert a is not None and e is not None, f"{what}{name}: one side has no value ({a is None}, {e is None})"
        assert a.shape == e.shape, f"{what}{name}: shape {tuple(a.shape)} != reference {tuple(e.shape)}"
        if e.is_floating_point():
            atol = rtol * float(e.abs().max()) if e.numel() else 0.0
            torch.testing.assert_close(a.to(e.dtype), e, rtol=0, atol=max(atol, 1e-300),
                                       msg=lambda m: f"{what}{name}: {m}")
        else:
            assert torch.equal(a, e), f"{what}{name}: {a} != reference {e}"

    close(actual.out, expected.out, "output")
    for name, e in expected.buffers.items():
        close(actual.buffers[name], e, f"buffer {name}")
    if not grads:
        return
    close(actual.grad_x, expected.grad_x, "input gradient")
    for name, e in expected.grads.items():
        a = actual.grads[name]
        if e is None:
            assert a is None or not a.any(), f"{what}grad {name}: the reference gives none, this path a nonzero one"
            continue
        close(a, e, f"grad {name}")
        got, param = actual.strides[name]
        if not exact_strides:  # only where the size is > 1
            got, param = ([st for st, n in zip(t, e.shape) if n > 1] for t in (got, param))
        assert got == param, f"{what}grad {name}: strides {got} differ from the parameter's {param}"


def sgd_steps(model: torch.nn.Module, fn, x: torch.Tensor, steps: int):
    """`steps` SGD steps (lr 0.05, momentum 0.9) of `fn` (the model or a compiled or backend-wrapped call of it) on
    the loss mean(fn(x)²): the losses and the final state_dict."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = fn(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), model.state_dict()
