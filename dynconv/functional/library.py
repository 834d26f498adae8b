"""What the primitives' `torch.library` custom ops share: their autograd, registered once for every
op of the form `op(a, b, c, *geometry) -> out` whose gradients come from a second custom op
`backward_op(grad_out, a, b, c, *geometry, need) -> (grad_a, grad_b, grad_c)` (or another number of
leading tensor inputs).

Custom ops return tensors only, so a gradient that `need` leaves out is an empty tensor (`absent`).
"""
from __future__ import annotations

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
