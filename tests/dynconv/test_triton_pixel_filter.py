"""The Triton path of `pixel_filter` (`dynconv/functional/triton_pixel_filter.py`) against the
reference backend, through the public dispatcher.

Without a GPU the kernels run under Triton's interpreter. `TRITON_INTERPRET` must be set before
triton is imported and this test session has imported it already, so the checks run in one child
process: this file run as a script, which runs every check and prints their outcomes. Where CUDA exists
the same checks also run on the GPU in this process (the "cuda" parameter exists only there).
"""
import itertools
import os

import pytest
import torch

from dynconv.functional import triton_pixel_filter
from dynconv.functional.geometry import conv_out_size
from dynconv.functional.pixel_filter import pixel_filter
from tests.dynconv.op_checks import (OpRecord, interpreter_check_results, print_check_results,
                                     rounding_tolerance, run_check)

DEVICES = ["interpreter"] + (["cuda"] if torch.cuda.is_available() else [])
B, C = 2, 4
TRITON_NODE = "GeneratedBackwardFor_dynconv_pixel_filter_triton_defaultBackward"  # the Triton custom op

# Every value of every axis, subsampled: the 8 (K, stride, dilation) combinations each meet two of
# the 12 (G, shared, combine) combinations, so all 12 occur; odd and unequal H, W alternate. The two
# K=7 cases have more pixels than one program's block (64 for K=7), so several blocks share an
# image and the channel gradient loops over blocks.
GEOMETRY = list(itertools.product([3, 5], [1, 2], [1, 2]))
FILTERS = list(itertools.product([1, 2], [False, True], [None, "mul", "add"]))
CASES = [(*GEOMETRY[n % 8], *FILTERS[n % 12], [(7, 6), (5, 7)][n % 2]) for n in range(16)]
CASES += [(7, 1, 1, 2, True, "mul", (9, 9)), (7, 1, 2, 1, False, "add", (9, 10))]
# More planes per filter than one program takes (16; 8 in the interpreter run, DYNCONV_TRITON_CPB):
# several channel chunks, the last one partial, and several partial sums of the filter gradient.
WIDE = [(3, 1, 1, 1, True, "add", (6, 5)), (3, 2, 1, 2, False, "mul", (5, 6)), (5, 1, 1, 1, False, None, (5, 5))]
WIDE_C = 36


def _inputs(device, K, s, d, H, W, G, combine, shared, dtype=torch.float32, batch=B, channels=C):
    p = d * (K - 1) // 2
    ho, wo = conv_out_size(H, K, s, p, d), conv_out_size(W, K, s, p, d)
    x = torch.randn(batch, channels, H, W, dtype=dtype, device=device)
    spatial = torch.randn(1 if shared else batch, G, K * K, ho, wo, dtype=dtype, device=device)
    ch = torch.randn(batch, channels, K * K, dtype=dtype, device=device) if combine else None
    return [t for t in (x, spatial, ch) if t is not None]


def _forward_backward(backend, leaves, grad_out, **kw):
    leaves = [t.detach().requires_grad_() for t in leaves]
    out = pixel_filter(*leaves, backend=backend, **kw)
    return out, torch.autograd.grad(out, leaves, grad_out)


def check_matches_reference(device):
    """Forward and the gradients of x, the spatial and the channel filter, float32, over CASES."""
    torch.manual_seed(0)
    for K, s, d, G, shared, combine, (H, W) in CASES:
        case = dict(K=K, s=s, d=d, G=G, shared=shared, combine=combine, H=H, W=W)
        kw = dict(kernel_size=K, stride=s, dilation=d, combine=combine or "mul")
        leaves = _inputs(device, K, s, d, H, W, G, combine, shared)
        go = torch.randn(B, C, *leaves[1].shape[-2:], device=device)
        _compare(case, leaves, go, kw)
    for K, s, d, G, shared, combine, (H, W) in WIDE:
        case = dict(K=K, s=s, d=d, G=G, shared=shared, combine=combine, H=H, W=W, C=WIDE_C)
        kw = dict(kernel_size=K, stride=s, dilation=d, combine=combine or "mul")
        leaves = _inputs(device, K, s, d, H, W, G, combine, shared, channels=WIDE_C)
        _compare(case, leaves, torch.randn(B, WIDE_C, *leaves[1].shape[-2:], device=device), kw)


def _compare(case, leaves, go, kw):
    """Triton forward and gradients against the reference backend's, float32."""
    out, grads = _forward_backward(None, leaves, go, **kw)
    ref, ref_grads = _forward_backward("reference", leaves, go, **kw)
    assert type(out.grad_fn).__name__ == TRITON_NODE, f"{case}: dispatched to {out.grad_fn}"
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{case}: {m}")
    for name, g, r in zip(("x", "spatial", "channel"), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=lambda m: f"{case} grad {name}: {m}")


def check_gradcheck(device):
    """float64 gradcheck (fast mode: the interpreter is slow) of all three inputs, stride 2."""
    torch.manual_seed(1)
    for combine, shared in [(None, True), ("mul", False), ("add", True)]:
        leaves = [t.requires_grad_() for t in _inputs(device, 3, 2, 1, 5, 4, 2, combine, shared,
                                                      torch.float64, batch=1)]

        def f(*t):
            return pixel_filter(*t, kernel_size=3, stride=2, combine=combine or "mul")

        assert type(f(*leaves).grad_fn).__name__ == TRITON_NODE
        assert torch.autograd.gradcheck(f, leaves, fast_mode=True), (combine, shared)


def check_half_precision(device):
    """bfloat16/float16 forward and gradients against float32, within each dtype's rounding bound."""
    torch.manual_seed(2)
    leaves = _inputs(device, 3, 1, 1, 7, 7, 2, "mul", False)
    go = torch.randn(B, C, 7, 7, device=device)
    ref, ref_grads = _forward_backward("reference", leaves, go, kernel_size=3)
    # Σ|terms| of the output and of every gradient: the same multilinear sums over absolute values
    mag, mag_grads = _forward_backward("reference", [t.abs() for t in leaves], go.abs(), kernel_size=3)
    for dtype in (torch.bfloat16, torch.float16):
        out, grads = _forward_backward(None, [t.to(dtype) for t in leaves], go.to(dtype), kernel_size=3)
        assert out.dtype == dtype and type(out.grad_fn).__name__ == TRITON_NODE
        # each term: three inputs rounded to dtype and two rounded products; the longest sum is the channel
        # filter's gradient over the 7·7 output pixels
        for o, r, m in zip((out, *grads), (ref, *ref_grads), (mag, *mag_grads)):
            assert o.dtype == dtype
            assert ((o.float() - r).abs() <= rounding_tolerance(dtype, m, r, roundings=5, n=49)).all()


def check_half_precision_makes_no_upcast_copy(device):
    """bfloat16 forward and the three gradient kernels, run by their launchers (the ops' bodies: a custom
    op is one opaque call to a dispatch mode), with a channel filter and with a filter shared by the
    batch (several partial sums of its gradient, kept in float32 by design): no float32 tensor of
    an input's size is made."""
    torch.manual_seed(4)
    for combine, shared in [("mul", False), (None, True)]:
        leaves = [t.bfloat16() for t in _inputs(device, 3, 1, 1, 7, 6, 1, combine, shared, channels=WIDE_C)]
        x, spatial, channel = (*leaves, None)[:3]
        go = torch.randn(B, WIDE_C, 7, 6, dtype=torch.bfloat16, device=device)
        geometry = (3, (1, 1), (1, 1), (1, 1), combine or "mul")
        with OpRecord() as allocations:
            triton_pixel_filter.forward(x, spatial, channel, *geometry)
            triton_pixel_filter.backward(go, x, spatial, channel, *geometry, (True, True, channel is not None))
        assert not allocations.upcasts(*leaves, go), (combine, shared, allocations.upcasts(*leaves, go))


def check_layouts_and_pairs(device):
    """channels_last input (kept by the output and grad_x), an expanded grad_out (from .sum()),
    stride/padding/dilation pairs and non-default padding."""
    torch.manual_seed(3)
    x = torch.randn(B, C, 7, 8, device=device).contiguous(memory_format=torch.channels_last)
    for s, p, d in [((1, 2), (1, 2), (1, 2)), ((2, 1), (0, 0), (1, 1)), (2, (2, 0), (2, 1))]:
        sp, pp, dp = [(v, v) if isinstance(v, int) else v for v in (s, p, d)]
        ho, wo = [conv_out_size(n, 3, *g) for n, g in zip((7, 8), zip(sp, pp, dp))]
        leaves = [x, torch.randn(B, 2, 9, ho, wo, device=device), torch.randn(B, C, 9, device=device)]
        kw = dict(kernel_size=3, stride=s, padding=p, dilation=d, combine="add")
        out, grads = _forward_backward(None, leaves, torch.ones((), device=device).expand(B, C, ho, wo), **kw)
        ref, ref_grads = _forward_backward("reference", leaves, torch.ones(B, C, ho, wo, device=device), **kw)
        assert type(out.grad_fn).__name__ == TRITON_NODE
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{(s, p, d)}: {m}")
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=lambda m: f"{(s, p, d)} grad: {m}")


if triton_pixel_filter.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _chunk_offset_probe(o_ptr, G, NCB, srb, srg, srn):
        """What grad_spatial's program adds to its buffer's base for (b', g, chunk), stored per program."""
        bs, g, cb, _ = triton_pixel_filter._program(1, G, NCB, 16)
        tl.store(o_ptr + tl.program_id(0), triton_pixel_filter._chunk_offset(bs, g, cb, srb, srg, srn))


def check_partial_offsets_are_64_bit(device):
    """grad_spatial's buffer of chunk partials for a filter shared by the batch, (1, G, NCB, K², Ho, Wo), passes
    2³¹ elements at large B·C·Ho·Wo while each stride stays below it (so a launch passes the strides as int32):
    the offsets its programs compute, probed with such strides (2²⁸ elements per chunk, 2³⁰ per group, up to
    3.75·2³⁰), are exact, where 32-bit products of g or the chunk with a stride wrap around."""
    G, ncb, srn = 4, 4, 2**28
    got = torch.zeros(G * ncb, dtype=torch.int64, device=device)
    _chunk_offset_probe[(G * ncb,)](got, G, ncb, 0, ncb * srn, srn)
    pid = torch.arange(G * ncb, device=device)
    assert torch.equal(got, (pid // ncb) * (ncb * srn) + (pid % ncb) * srn), got


def check_available(device):
    """The predicate: on for matching float tensors, off for mixed or integer dtypes, mixed devices
    and under `DYNCONV_TRITON=0`."""
    x, spatial, ch = _inputs(device, 3, 1, 1, 5, 5, 1, "mul", False)
    assert triton_pixel_filter.available(x, spatial, ch)
    assert not triton_pixel_filter.available(x, spatial.double(), ch)
    assert not triton_pixel_filter.available(x.long(), spatial.long())
    if device != "cpu":
        assert not triton_pixel_filter.available(x, spatial.cpu())
    os.environ["DYNCONV_TRITON"] = "0"
    try:
        assert not triton_pixel_filter.available(x, spatial, ch)
    finally:
        del os.environ["DYNCONV_TRITON"]


CHECKS = ["check_matches_reference", "check_gradcheck", "check_half_precision",
          "check_half_precision_makes_no_upcast_copy", "check_layouts_and_pairs", "check_partial_offsets_are_64_bit",
          "check_available"]


@pytest.fixture(scope="module")
def interpreter_results():
    return interpreter_check_results(__file__, channels_per_block=8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CHECKS)
def test_triton_path(name, device, request):
    run_check(globals(), name, device, request)


def test_cpu_without_opt_in_stays_off_triton(monkeypatch):
    """Without the interpreter opt-in, CPU tensors never take the Triton path (native or PyTorch)."""
    monkeypatch.delenv("DYNCONV_TRITON_INTERPRET", raising=False)
    x, spatial = _inputs("cpu", 3, 1, 1, 5, 5, 1, None, False)
    assert not triton_pixel_filter.available(x, spatial)
    out = pixel_filter(x.requires_grad_(), spatial, kernel_size=3)
    assert type(out.grad_fn).__name__ != TRITON_NODE


if __name__ == "__main__":  # the child process of `interpreter_results`: every check on CPU tensors
    print_check_results(CHECKS, globals())
