"""The Triton path of the fused local Deformable Kernels op (`dynconv/functional/triton_deform_kernel.py`)
against the reference (the whole resampled kernel + reference `pixel_filter`), through
`dynconv.functional.deform_kernel_local`.

As in test_triton_involution.py, the kernels run under Triton's interpreter in one child process (this
file run as a script), with small tiles (2 channels; 16-pixel blocks) so that the channel-chunk and
pixel-block loops are exercised on tiny shapes. Where CUDA exists the same checks also run on the GPU,
with the default tiles.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from dynconv.functional import triton_deform_kernel, triton_pixel_filter
from dynconv.functional.deform_kernel import deform_kernel_local
from dynconv.functional.geometry import conv_out_hw
from tests.dynconv.op_checks import (OpRecord, interpreter_check_results, print_check_results,
                                     rounding_tolerance, run_check)

TRITON_NODE = "GeneratedBackwardFor_dynconv_deform_kernel_local_triton_defaultBackward"

# (B, C, H, W, G, K, S_h, S_w, stride, dilation): two samples, two offset groups of 3 channels (a full and a
# partial 2-channel chunk), scope margins (S − K)/2 of 1 and 0.5; stride 2 with dilation 2 and odd sizes
# (three chunks of 6 channels, one group); K = 5 with one channel per group. Under the interpreter each spans
# several pixel blocks.
CASES = [(2, 6, 5, 4, 2, 3, 5, 4, 1, 1), (1, 6, 7, 9, 1, 3, 3, 3, 2, 2), (1, 2, 6, 5, 2, 5, 6, 7, 1, 1)]
SMALL = (1, 4, 5, 4, 2, 3, 4, 4, 2, 1)  # stride 2, two offset groups


def _inputs(case, device, dtype=torch.float64, channels_last=False, grid=True):
    """x, offset, weight; offsets spread so that some sample points leave the scope. With `grid` the
    offsets lie on a 2⁻¹² grid, so scope coordinates are exact in every dtype's arithmetic and the only
    differences from the reference are the products' and sums' roundings."""
    B, C, H, W, G, K, sh, sw, s, d = case
    ho, wo = conv_out_hw((H, W), K, s, d * (K - 1) // 2, d)
    kw = dict(dtype=dtype, device=device)
    x = torch.randn(B, C, H, W, **kw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    offset = 1.5 * torch.randn(B, G, K * K, 2, ho, wo, **kw)
    if grid:
        offset = (offset * 2**12).round() / 2**12
    return [x, offset, torch.randn(C, sh, sw, **kw)], dict(kernel_size=K, stride=s, dilation=d)


def _run(tensors, geometry, grad_out, backend=None):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = deform_kernel_local(*leaves, **geometry, backend=backend)
    return out, torch.autograd.grad(out, leaves, grad_out)


def _reduction_sizes(case) -> list[int]:
    """Terms summed per element of the output and of the gradients of x, offset and weight (4 corners)."""
    B, C, H, W, G, K, sh, sw, s, d = case
    ho, wo = conv_out_hw((H, W), K, s, d * (K - 1) // 2, d)
    return [4 * K * K, 4 * K * K, 4 * C // G, B * ho * wo * K * K]


def _magnitudes(tensors, geometry, grad_out):
    """Σ|terms| of the output and of every gradient, in float64. Output, grad x and grad weight: the
    reference on |x|, |W|, |grad_out| at the same offsets (bilinear weights are ≥ 0). Grad offset:
    Σ_corners |∂a/∂Δ| = 2, so Σ|terms| ≤ 2·max|W|·Σ_{c∈g} |grad_out · x_tap|."""
    x, offset, weight = (t.double() for t in tensors)
    go = grad_out.double().abs()
    out, (gx, _, gw) = _run([x.abs(), offset, weight.abs()], geometry, go, "reference")
    B, C = x.shape[:2]
    G, kk, _, ho, wo = offset.shape[1:]
    K, s, d = geometry["kernel_size"], geometry["stride"], geometry["dilation"]
    taps = F.unfold(x.abs(), K, dilation=d, padding=d * (K - 1) // 2, stride=s).view(B, C, kk, ho, wo)
    prod = (go.unsqueeze(2) * taps).view(B, C // G, G, kk, ho, wo).sum(1)
    goff = (2 * weight.abs().max() * prod).unsqueeze(3).expand(offset.shape)
    return out, gx, goff, gw


def check_float64_matches_reference(device):
    """Forward and all three gradients, within n·eps of the reference; channels_last x kept by the output
    and grad x; an expanded (stride-0) grad_out."""
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
        for name, got, want, mag, size in zip(("out", "x", "offset", "weight"), (out, *grads), (ref, *ref_grads),
                                              _magnitudes(tensors, geometry, go), _reduction_sizes(case)):
            assert ((got - want).abs() <= size * eps * mag).all(), f"{case} {name}: {(got - want).abs().max()}"


def check_low_precision(device):
    """float32 and bfloat16 inputs: loaded as such, summed in float32, one rounding to the dtype at the store
    (against the float64 reference on the same rounded inputs). The launchers (the ops' bodies, run directly
    since an op is one opaque call to a dispatch mode) make no float32 copy of a bfloat16 x, offset or
    grad_out and no tensor of the per-pixel kernel's size (B·C·K²·Ho·Wo), forward or backward."""
    torch.manual_seed(1)
    case = CASES[0]
    B, C, H, W, G, K, sh, sw, s, d = case
    tensors, geometry = _inputs(case, device, torch.float32)
    ho, wo = tensors[1].shape[-2:]
    go = torch.randn(B, C, ho, wo, device=device)
    kernel, p = B * C * K * K * ho * wo, d * (K - 1) // 2
    assert kernel not in {t.numel() for t in (*tensors, go)}
    for dtype in (torch.float32, torch.bfloat16):
        low, go_low = [t.to(dtype) for t in tensors], go.to(dtype)
        with OpRecord() as allocations:
            out = triton_deform_kernel.forward(*low, K, (s, s), (p, p), (d, d))
            grads = triton_deform_kernel.backward(go_low, *low, K, (s, s), (p, p), (d, d), [True] * 3)
        assert all(n != kernel for _, n in allocations.outputs()), f"{dtype}: a per-pixel-kernel-sized tensor was made"
        if dtype != torch.float32:
            # the weight's gradient is summed from a float32 buffer of splits × its (small) size
            activations = (low[0], low[1], go_low)
            assert not allocations.upcasts(*activations), f"{dtype}: upcasts {allocations.upcasts(*activations)}"
        ref, ref_grads = _run([t.double() for t in low], geometry, go_low.double(), "reference")
        for name, got, want, mag, size in zip(("out", "x", "offset", "weight"), (out, *grads), (ref, *ref_grads),
                                              _magnitudes(low, geometry, go_low), _reduction_sizes(case)):
            assert got.dtype == dtype
            # one rounding more than the store's: Triton's interpreter converts to bfloat16 by truncation
            bound = rounding_tolerance(dtype, mag, want, roundings=1, n=size)
            assert ((got.double() - want).abs() <= bound).all(), f"{dtype} {name}: {(got.double() - want).abs().max()}"


def check_gradcheck(device):
    """float64 gradcheck (fast mode) of all three inputs, offsets off any grid."""
    torch.manual_seed(2)
    tensors, geometry = _inputs(SMALL, device, grid=False)
    leaves = [t.requires_grad_() for t in tensors]

    def f(*t):
        return deform_kernel_local(*t, **geometry)

    assert type(f(*leaves).grad_fn).__name__ == TRITON_NODE
    # no atomics: gradcheck's reentrancy check (two backwards, bitwise equal) holds on a GPU too
    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


def check_partial_gradients(device):
    """Only the gradients autograd asks for are computed, each equal to the one from the full backward."""
    torch.manual_seed(4)
    tensors, geometry = _inputs(SMALL, device)
    go = torch.randn_like(deform_kernel_local(*tensors, **geometry))
    _, full = _run(tensors, geometry, go)
    for i in range(3):
        leaves = [t.detach().requires_grad_(n == i) for n, t in enumerate(tensors)]
        (got,) = torch.autograd.grad(deform_kernel_local(*leaves, **geometry), [leaves[i]], go)
        assert torch.equal(got, full[i]), f"gradient {i}"


def check_available(device):
    """On for matching float tensors; off for mixed dtypes, integer tensors and `DYNCONV_TRITON=0`."""
    tensors, geometry = _inputs(CASES[0], device, torch.float32)
    assert triton_deform_kernel.available(*tensors)
    assert not triton_deform_kernel.available(tensors[0], tensors[1].double(), tensors[2])
    assert not triton_deform_kernel.available(*(t.long() for t in tensors))
    os.environ["DYNCONV_TRITON"] = "0"
    try:
        assert not triton_deform_kernel.available(*tensors)
        assert type(deform_kernel_local(*(t.requires_grad_() for t in tensors), **geometry).grad_fn).__name__ \
            != TRITON_NODE
    finally:
        del os.environ["DYNCONV_TRITON"]


def check_opcheck(device):
    """`torch.library.opcheck` of the Triton op, float64 and bfloat16: schema and autograd registration
    everywhere; on CUDA also the fake kernel and AOT dispatch (under the interpreter a fake tensor cannot
    take the kernels' CPU storage)."""
    torch.manual_seed(3)
    utils = None if device == "cuda" else ("test_schema", "test_autograd_registration")
    for dtype in (torch.float64, torch.bfloat16):
        tensors, _ = _inputs(SMALL, device, dtype)
        args = (*(t.requires_grad_() for t in tensors), 3, [2, 2], [1, 1], [1, 1])
        kw = {} if utils is None else dict(test_utils=utils)
        torch.library.opcheck(torch.ops.dynconv.deform_kernel_local_triton.default, args, **kw)


CHECKS = ["check_float64_matches_reference", "check_low_precision", "check_gradcheck", "check_partial_gradients",
          "check_opcheck", "check_available"]
DEVICES = ["interpreter"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def interpreter_results():
    return interpreter_check_results(__file__, channels_per_block=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CHECKS)
def test_triton_deform_kernel(name, device, request):
    run_check(globals(), name, device, request)


def test_cpu_without_opt_in_stays_off_triton(monkeypatch):
    """Without the interpreter opt-in, CPU tensors take the compiled CPU op, never the Triton one."""
    monkeypatch.delenv("DYNCONV_TRITON_INTERPRET", raising=False)
    tensors, geometry = _inputs(CASES[0], "cpu", torch.float32)
    assert not triton_deform_kernel.available(*tensors)
    out = deform_kernel_local(*(t.requires_grad_() for t in tensors), **geometry)
    assert type(out.grad_fn).__name__ != TRITON_NODE


if __name__ == "__main__":  # the child process of `interpreter_results`: every check on CPU tensors
    triton_deform_kernel._PLANE_TILE = 32  # 16-pixel blocks, so every case spans several blocks
    triton_pixel_filter._REDUCTION_PROGRAMS = 4  # grad weight: several splits of several units each
    print_check_results(CHECKS, globals())
