"""What the primitives' `torch.library` custom ops share: their autograd, registered once for every
op of the form `op(a, b, c, *geometry) -> out` whose gradients come from a second custom op
`backward_op(grad_out, a, b, c, *geometry, need) -> (grad_a, grad_b, grad_c)` (or another number of
leading tensor inputs).

Custom ops return tensors only, so a gradient that `need` leaves out is an empty tensor (`absent`).
"""
from __future__ import annotations

import torch
from torch import Tensor


def absent(grads, like: Tensor) -> tuple[Tensor, ...]:
    """`grads` with each None replaced by an empty tensor (a custom op cannot return None)."""
    return tuple(like.new_empty(0) if g is None else g for g in grads)


def register_autograd(op, backward_op, tensors: int = 3) -> None:
    """Give `op` the backward `backward_op(grad_out, *its `tensors` tensor inputs, *its other args, need)`,
    `need` saying which of those gradients autograd wants."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensors])
        ctx.args = inputs[tensors:]

    def backward(ctx, grad_out):
        need = list(ctx.needs_input_grad[:tensors])
        grads = backward_op(grad_out, *ctx.saved_tensors, *ctx.args, need)
        return (*(g if n else None for g, n in zip(grads, need)), *(None,) * len(ctx.args))

    op.register_autograd(backward, setup_context=setup_context)


def laid_out(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    """`t` with the strides `torch.empty(t.shape, memory_format=memory_format)` has, which is what the fake
    kernels promise; copied only where they differ. (`.contiguous(memory_format=...)` is not enough: it keeps a
    tensor whose strides differ only at size-1 dimensions, e.g. a batch-1 channels_last result, and compiled
    code asserts the exact strides.)"""
    if memory_format == torch.contiguous_format:  # the common case without building a meta tensor
        target, n = [], 1
        for size in reversed(t.shape):
            target.append(n)
            n *= max(size, 1)  # as torch: a size-0 dimension does not zero the strides outside it
        target = tuple(reversed(target))
    else:
        target = torch.empty(t.shape, device="meta", memory_format=memory_format).stride()
    if t.stride() == target:
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format).copy_(t)


def as_input(grad: Tensor, like: Tensor) -> Tensor:
    """`grad` in `like`'s dtype and with `torch.empty_like(like)`'s strides (a dense input's own): what the fake
    backward kernels promise, and what autograd's layout contract and DDP's gradient buckets expect of a
    parameter's gradient. Copied only where they differ."""
    if grad.dtype == like.dtype and grad.stride() == torch.empty_like(like, device="meta").stride():
        return grad
    return torch.empty_like(like).copy_(grad)


class _ParamView(torch.autograd.Function):
    @staticmethod
    def forward(ctx, param: Tensor, shape: tuple[int, ...]) -> Tensor:
        ctx.like = torch.empty_like(param, device="meta")
        return param.reshape(shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        like = ctx.like
        out = torch.empty_strided(like.shape, like.stride(), dtype=grad.dtype, device=grad.device)
        return out.copy_(grad.reshape(like.shape)), None


def param_view(param: Tensor, *shape: int) -> Tensor:
    """`param.reshape(shape)` whose gradient comes back in the parameter's own strides. A plain squeeze or view
    gives it other strides at the size-1 dimensions of a channels_last parameter, which autograd accepts but
    DDP's gradient buckets copy and warn about ("Grad strides do not match bucket view strides")."""
    return _ParamView.apply(param, shape)
