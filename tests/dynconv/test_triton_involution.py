"""The Triton path of the fused involution op (`dynconv/functional/triton_involution.py`) against the
decomposition (1×1 span conv + reference `pixel_filter`), through `dynconv.functional.involution`.

As in test_triton_pixel_filter.py, the kernels run under Triton's interpreter in one child process
(this file run as a script), with small tiles (2 planes; the r tile shrunk to give several pixel
blocks per image) so that the channel-chunk and pixel-block loops are exercised on tiny shapes. Where
CUDA exists the same checks also run on the GPU, with the default tiles.
"""
import os

import pytest
import torch

from dynconv.functional import triton_involution, triton_pixel_filter
from dynconv.functional.geometry import conv_out_hw
from dynconv.functional.involution import involution
from tests.dynconv.op_checks import (OpRecord, interpreter_check_results, print_check_results,
                                     rounding_tolerance, run_check)

TRITON_NODE = "GeneratedBackwardFor_dynconv_involution_triton_defaultBackward"

# (B, C, H, W, M, G, K, stride, dilation): G > 1 with two channel chunks per group, stride 2 with
# dilation 2 and odd sizes (three chunks of a 6-channel group, M not a power of two), K = 5 over
# several pixel blocks
CASES = [(2, 8, 6, 5, 3, 2, 3, 1, 1), (1, 6, 7, 9, 5, 1, 3, 2, 2), (1, 4, 9, 8, 2, 2, 5, 1, 1)]


def _inputs(case, device, dtype=torch.float64, channels_last=False):
    B, C, H, W, M, G, K, s, d = case
    ho, wo = conv_out_hw((H, W), K, s, d * (K - 1) // 2, d)
    x = torch.randn(B, C, H, W, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kw = dict(dtype=dtype, device=device)
    tensors = [x, torch.randn(B, M, ho, wo, **kw), torch.randn(G * K * K, M, **kw), torch.randn(G * K * K, **kw)]
    return tensors, dict(kernel_size=K, stride=s, dilation=d, groups=G)


def _run(tensors, geometry, grad_out, backend=None):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = involution(*leaves, **geometry, backend=backend)
    return out, torch.autograd.grad(out, leaves, grad_out)


def _reduction_sizes(case) -> list[int]:
    """Terms summed per element of the output and of the gradients of x, r, W2 and b2."""
    B, C, H, W, M, G, K, s, d = case
    ho, wo = conv_out_hw((H, W), K, s, d * (K - 1) // 2, d)
    taps, pixels = K * K * (M + 1), B * ho * wo * C // G
    return [taps, taps, K * K * C, pixels, pixels]


def _magnitudes(tensors, geometry, grad_out):
    """Σ|terms| of the output and of every gradient: the float64 decomposition on absolute values."""
    out, grads = _run([t.double().abs() for t in tensors], geometry, grad_out.double().abs(), "reference")
    return out, *grads


def check_float64_matches_decomposition(device):
    """Forward and all four gradients, within n·eps of the decomposition; channels_last x kept by the
    output and grad x; an expanded (stride-0) grad_out."""
    torch.manual_seed(0)
    for n, case in enumerate(CASES):
        tensors, geometry = _inputs(case, device, channels_last=n == 1)
        ho, wo = tensors[1].shape[-2:]
        shape = (case[0], case[1], ho, wo)
        go = torch.randn((), dtype=torch.float64, device=device).expand(shape) if n == 2 else \
            torch.randn(shape, dtype=torch.float64, device=device)
        out, grads = _run(tensors, geometry, go)
        ref, ref_grads = _run(tensors, geometry, go, "reference")
        assert type(out.grad_fn).__name__ == TRITON_NODE, f"{case}: dispatched to {out.grad_fn}"
        if n == 1:
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert grads[0].is_contiguous(memory_format=torch.channels_last)
        eps = torch.finfo(torch.float64).eps
        for name, got, want, mag, size in zip(("out", "x", "r", "W2", "b2"), (out, *grads), (ref, *ref_grads),
                                              _magnitudes(tensors, geometry, go), _reduction_sizes(case)):
            assert ((got - want).abs() <= size * eps * mag).all(), f"{case} {name}: {(got - want).abs().max()}"


def check_low_precision(device):
    """float32 and bfloat16 inputs: loaded as such, summed in float32, one rounding to the dtype at the
    store (against the float64 decomposition of the same rounded inputs). The launchers (the ops'
    bodies, run directly since an op is one opaque call to a dispatch mode) make no float32 copy of
    a bfloat16 x, r or grad_out and no tensor of the span weights' size (B·G·K²·Ho·Wo), forward or backward."""
    torch.manual_seed(1)
    case = CASES[0]
    B, C, H, W, M, G, K, s, d = case
    tensors, geometry = _inputs(case, device, torch.float32)
    ho, wo = tensors[1].shape[-2:]
    go = torch.randn(B, C, ho, wo, device=device)
    spans, p = B * G * K * K * ho * wo, d * (K - 1) // 2
    assert spans not in {t.numel() for t in (*tensors, go)}
    for dtype in (torch.float32, torch.bfloat16):
        low, go_low = [t.to(dtype) for t in tensors], go.to(dtype)
        with OpRecord() as allocations:
            triton_involution.forward(*low, K, (s, s), (p, p), (d, d), G)
            triton_involution.backward(go_low, *low, K, (s, s), (p, p), (d, d), G, [True] * 4)
        assert all(n != spans for _, n in allocations.outputs()), f"{dtype}: a span-weight-sized tensor was made"
        if dtype != torch.float32:
            # W2's and b2's gradients are summed from float32 buffers of splits × their (small) size
            activations = (low[0], low[1], go_low)
            assert not allocations.upcasts(*activations), f"{dtype}: upcasts {allocations.upcasts(*activations)}"
        out, grads = _run(low, geometry, go_low)
        assert type(out.grad_fn).__name__ == TRITON_NODE
        ref, ref_grads = _run([t.double() for t in low], geometry, go_low.double(), "reference")
        for name, got, want, mag, size in zip(("out", "x", "r", "W2", "b2"), (out, *grads), (ref, *ref_grads),
                                              _magnitudes(low, geometry, go_low), _reduction_sizes(case)):
            assert got.dtype == dtype
            # one rounding more than the store's: Triton's interpreter converts to bfloat16 by truncation
            bound = rounding_tolerance(dtype, mag, want, roundings=1, n=size)
            assert ((got.double() - want).abs() <= bound).all(), f"{dtype} {name}: {(got.double() - want).abs().max()}"


def check_gradcheck(device):
    """float64 gradcheck (fast mode) of all four inputs, stride 2."""
    torch.manual_seed(2)
    tensors, geometry = _inputs((1, 4, 5, 4, 3, 2, 3, 2, 1), device)
    leaves = [t.requires_grad_() for t in tensors]

    def f(*t):
        return involution(*t, **geometry)

    assert type(f(*leaves).grad_fn).__name__ == TRITON_NODE
    # no atomics: gradcheck's reentrancy check (two backwards, bitwise equal) holds on a GPU too
    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


def check_available(device):
    """On for matching float tensors; off for mixed dtypes, integer tensors, `fused=False` and
    `DYNCONV_TRITON=0`."""
    tensors, geometry = _inputs(CASES[0], device, torch.float32)
    assert triton_involution.available(*tensors)
    assert not triton_involution.available(tensors[0], tensors[1].double(), *tensors[2:])
    assert not triton_involution.available(*(t.long() for t in tensors))
    assert type(involution(*(t.requires_grad_() for t in tensors), **geometry, fused=False).grad_fn).__name__ \
        != TRITON_NODE
    os.environ["DYNCONV_TRITON"] = "0"
    try:
        assert not triton_involution.available(*tensors)
    finally:
        del os.environ["DYNCONV_TRITON"]


def check_opcheck(device):
    """`torch.library.opcheck` of the Triton op, float64 and bfloat16: schema and autograd registration everywhere;
    on CUDA also the fake kernel and AOT dispatch (under the interpreter a fake tensor cannot take the kernels'
    CPU storage)."""
    torch.manual_seed(3)
    utils = None if device == "cuda" else ("test_schema", "test_autograd_registration")
    for dtype in (torch.float64, torch.bfloat16):
        tensors, _ = _inputs((1, 4, 5, 4, 3, 2, 3, 2, 1), device, dtype)
        args = (*(t.requires_grad_() for t in tensors), 3, [2, 2], [1, 1], [1, 1], 2)
        kw = {} if utils is None else dict(test_utils=utils)
        torch.library.opcheck(torch.ops.dynconv.involution_triton.default, args, **kw)


CHECKS = ["check_float64_matches_decomposition", "check_low_precision", "check_gradcheck", "check_opcheck",
          "check_available"]
DEVICES = ["interpreter"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def interpreter_results():
    return interpreter_check_results(__file__, channels_per_block=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CHECKS)
def test_triton_involution(name, device, request):
    run_check(globals(), name, device, request)


def test_cpu_without_opt_in_stays_off_triton(monkeypatch):
    """Without the interpreter opt-in, CPU tensors take the compiled CPU op, never the Triton one."""
    monkeypatch.delenv("DYNCONV_TRITON_INTERPRET", raising=False)
    tensors, geometry = _inputs(CASES[0], "cpu", torch.float32)
    assert not triton_involution.available(*tensors)
    out = involution(*(t.requires_grad_() for t in tensors), **geometry)
    assert type(out.grad_fn).__name__ != TRITON_NODE


if __name__ == "__main__":  # the child process of `interpreter_results`: every check on CPU tensors
    triton_involution._R_TILE = 32  # 16-pixel blocks for M ≤ 2, so the K = 5 case spans several blocks
    triton_pixel_filter._REDUCTION_PROGRAMS = 4  # grad W2/b2: several splits of several units each
    print_check_results(CHECKS, globals())
