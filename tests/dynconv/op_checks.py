"""Checks shared by the operator tests: a float64 gradcheck over the input and every parameter, a
per-sample `F.conv2d` loop (the naive oracle for the kernel-mixing operators), and a record of the
ops a piece of code dispatches (the buffers a kernel launcher allocates, the kernels a module calls)."""
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode


def gradcheck_op(op: torch.nn.Module, x: torch.Tensor) -> bool:
    """`torch.autograd.gradcheck` of `op(x)` in float64 w.r.t. `x` and every parameter of `op`."""
    op = op.double()
    names, params = zip(*op.named_parameters())
    inputs = (x.double().requires_grad_(), *(p.detach().clone().requires_grad_() for p in params))

    def fn(x, *ps):
        return functional_call(op, dict(zip(names, ps)), (x,))

    return torch.autograd.gradcheck(fn, inputs)


def per_sample_conv(x, weights, biases=None, **conv_kw):
    """`cat_b F.conv2d(x[b], weights[b], biases[b])`: one ordinary convolution per sample."""
    biases = [None] * len(x) if biases is None else biases
    return torch.cat([F.conv2d(x[b:b + 1], weights[b], biases[b], **conv_kw) for b in range(len(x))])


def rounding_tolerance(dtype: torch.dtype, magnitude: torch.Tensor, ref: torch.Tensor, *, roundings: int,
                       n: int) -> torch.Tensor:
    """Per-element bound on |y_low − y| for y = Σ_{i<n} t_i computed in `dtype` (unit roundoff u = eps/2).

    Each term carries `roundings` relative roundings (inputs rounded to `dtype`, products formed in it),
    the n terms are accumulated in float32 (as the CPU and CUDA kernels do for half types), here and in
    the float32 reference `ref` (≤ 2n·u_fp32 together), and the sum is rounded once to `dtype` (≤ u·|y|).
    `magnitude` is Σ|t_i|: the same computation on the absolute values of the inputs, in float32.
    """
    u, u32 = torch.finfo(dtype).eps / 2, torch.finfo(torch.float32).eps / 2
    return ((1 + u) ** roundings - 1 + 2 * n * u32) * magnitude + u * ref.abs()


def assert_channels_last_matches(op: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`op` gives the same output and input gradient on a channels_last copy of `x` as on `x`; returns the
    contiguous-input output (its graph kept, so callers can check more gradients)."""
    x = x.detach().requires_grad_()
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out, outl = op(x), op(xl)
    torch.testing.assert_close(outl, out)
    g = torch.randn_like(out)
    (gx,), (gxl,) = (torch.autograd.grad(o, [i], g, retain_graph=True) for o, i in ((out, x), (outl, xl)))
    torch.testing.assert_close(gxl, gx)
    return out


class OpRecord(TorchDispatchMode):
    """Every op dispatched while active (aten ops, and `dynconv::` custom ops as one opaque call each), as
    `calls`: (op, its positional arguments' dtypes (None for a non-tensor), its tensor outputs' (dtype, numel)).
    Nothing is kept alive. Run a launcher's Python body inside it to see the buffers it makes, or a module's
    forward to see which kernels it calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [(t.dtype, t.numel()) for t in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(t, torch.Tensor)]
        self.calls.append((func, tuple(a.dtype if isinstance(a, torch.Tensor) else None for a in args), outs))
        return out

    def outputs(self, *names: str) -> list[tuple[torch.dtype, int]]:
        """(dtype, numel) of the tensors returned by ops whose overload packet is one of `names` (every op's when
        none)."""
        return [o for func, _, outs in self.calls if not names or func.__name__.split(".")[0] in names for o in outs]

    def upcasts(self, *inputs: torch.Tensor) -> list:
        """float32 tensors with as many elements as one of the (half-precision) `inputs`: upcast copies."""
        sizes = {t.numel() for t in inputs}
        return [n for dt, n in self.outputs() if dt == torch.float32 and n in sizes]


def interpreter_check_results(test_file: str, channels_per_block: int) -> dict:
    """{check: "" or its traceback}: `test_file` run as a child process under Triton's CPU interpreter (one
    torch/triton start-up for all its checks), with `channels_per_block` planes per program so that small tests
    span several blocks."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", DYNCONV_TRITON_INTERPRET="1", DYNCONV_NATIVE="0",
               DYNCONV_TRITON_CPB=str(channels_per_block),
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, test_file], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip(), f"the interpreter child process failed:\n{run.stderr[-6000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def run_check(namespace: dict, name: str, device: str, request) -> None:
    """One check of a Triton test file: on CUDA directly, under the interpreter from the child process's results."""
    if device == "cuda":
        namespace[name]("cuda")
    else:
        error = request.getfixturevalue("interpreter_results")[name]
        assert not error, f"{name} under the Triton interpreter failed:\n{error}"


def print_check_results(checks: list[str], namespace: dict) -> None:
    """The child process's side of `interpreter_check_results`: every check on CPU tensors, as JSON."""
    results = {}
    for check in checks:
        try:
            namespace[check]("cpu")
            results[check] = ""
        except Exception:
            results[check] = traceback.format_exc()
    print(json.dumps(results))
