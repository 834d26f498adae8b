"""Every registered operator on every device this machine has, against the float64 reference on CPU.

The same module (same weights) runs its default fast path on the device (on CPU the C++ kernel, on
CUDA the Triton kernels, cuDNN and torchvision's CUDA deform_conv2d) and the "reference" backend in
float64 on CPU; the output and the gradients of the input and of every parameter must agree. Also
per device: a channels_last input gives what a contiguous one gives, and bfloat16 autocast stays
within bfloat16's precision of the reference. The "cuda" cases exist only where torch sees a GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch

import dynconv

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
B, C, H, W = 2, 16, 9, 8
KERNEL_SIZE = {"involution": 7}
OPS = dynconv.list_ops()


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact float32 on CUDA: cuDNN's convs default to TF32 (10-bit mantissa), which a user may choose
    but which would hide an operator's own error in the comparison."""
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


def _make(name: str, stride: int) -> torch.nn.Module:
    kwargs = {"input_size": (H, W)} if "input_size" in dynconv.op_options(name) else {}
    torch.manual_seed(0)
    op = dynconv.create_op(name, C, C, KERNEL_SIZE.get(name, 3), stride=stride, **kwargs)
    with torch.no_grad():  # away from the initial values some ops start at (ones, zeros)
        for p in op.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return op.train()


def _run(op, x, backend):
    """(output, input grad, param grads) of one training-mode pass under `backend`; the output gradient is
    drawn from a fixed seed, so every pass of one output shape gets the same one."""
    x = x.detach().requires_grad_()
    op.zero_grad(set_to_none=True)
    with dynconv.use_backend(backend):
        out = op(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out))
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in op.parameters()]
    return out, x.grad, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _reference(name, stride, x):
    return _run(_make(name, stride).double(), x.double(), "reference")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_on_device_matches_float64_reference(device, name, stride):
    torch.manual_seed(1)
    x = torch.randn(B, C, H, W)
    ref_out, ref_gx, ref_gp = _reference(name, stride, x)
    op = _make(name, stride).to(device)
    out, gx, gp = _run(op, x.to(device), "fast")
    assert out.device.type == device and out.dtype == torch.float32
    assert _rel(out, ref_out) < 1e-5, name
    assert _rel(gx, ref_gx) < 1e-4, name
    names = [n for n, _ in op.named_parameters()]
    for pname, g, rg in zip(names, gp, ref_gp):
        if rg.abs().max() > 0:  # a parameter this pass does not reach (e.g. unused bias) has no gradient
            assert _rel(g, rg) < 1e-4, f"{name}.{pname}"


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_and_bfloat16_autocast_on_device(device, name):
    torch.manual_seed(2)
    x = torch.randn(B, C, H, W, device=device)
    op = _make(name, 1).to(device)
    out, gx, _ = _run(op, x, "fast")
    op_last = copy.deepcopy(op).to(memory_format=torch.channels_last)
    out_last, gx_last, _ = _run(op_last, x.contiguous(memory_format=torch.channels_last), "fast")
    assert _rel(out_last, out) < 1e-5 and _rel(gx_last, gx) < 1e-5, name
    with torch.autocast(device, dtype=torch.bfloat16):
        out_bf = op(x)
    assert torch.isfinite(out_bf).all()
    # bfloat16 keeps 8 bits of mantissa: a few 1e-3 relative per rounding, a few roundings deep
    assert _rel(out_bf.float(), out) < 5e-2, name
