"""`pixel_filter`: the fast backend against the unfold reference, gradients, dtypes, layouts."""
import itertools

import pytest
import torch

from dynconv.functional.geometry import conv_out_size
from dynconv.functional.pixel_filter import pixel_filter
from tests.dynconv.op_checks import rounding_tolerance

B, C = 2, 6


def _inputs(K, s, d, H, W, G, channel, shared, dtype=torch.float32, c=C):
    p = d * (K - 1) // 2
    ho, wo = conv_out_size(H, K, s, p, d), conv_out_size(W, K, s, p, d)
    x = torch.randn(B, c, H, W, dtype=dtype)
    spatial = torch.randn(1 if shared else B, G, K * K, ho, wo, dtype=dtype)
    ch = torch.randn(B, c, K * K, dtype=dtype) if channel else None
    return x, spatial, ch


def _run(backend, x, spatial, ch, K, s, d, combine, grad_out):
    leaves = [t.detach().requires_grad_() for t in (x, spatial, ch) if t is not None]
    out = pixel_filter(*leaves, kernel_size=K, stride=s, dilation=d, combine=combine, backend=backend)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("K", [3, 5, 7])
@pytest.mark.parametrize("s", [1, 2])
def test_fast_equals_reference(torch_fast, K, s):
    """Forward and all three gradients over d ∈ {1,2}, odd/even H and W, G, channel filter, combine, Bs."""
    torch.manual_seed(K * 10 + s)
    grid = itertools.product([1, 2], [(5, 6), (6, 5)], [1, 2, 6], [None, "mul", "add"], [False, True])
    for d, (H, W), G, combine, shared in grid:
        x, spatial, ch = _inputs(K, s, d, H, W, G, combine is not None, shared)
        go = torch.randn(B, C, *spatial.shape[-2:])
        ref, ref_grads = _run("reference", x, spatial, ch, K, s, d, combine or "mul", go)
        out, grads = _run("fast", x, spatial, ch, K, s, d, combine or "mul", go)
        case = dict(K=K, s=s, d=d, H=H, W=W, G=G, combine=combine, shared=shared)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{case}: {m}")
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-5, msg=lambda m: f"{case} grad: {m}")


def test_default_dispatch_equals_reference():
    """The default fast backend (the compiled kernel where it is built) agrees with the reference."""
    torch.manual_seed(0)
    for combine, shared, s in itertools.product([None, "mul", "add"], [False, True], [1, 2]):
        x, spatial, ch = _inputs(3, s, 1, 7, 6, 3, combine is not None, shared)
        go = torch.randn(B, C, *spatial.shape[-2:])
        ref, ref_grads = _run("reference", x, spatial, ch, 3, s, 1, combine or "mul", go)
        out, grads = _run(None, x, spatial, ch, 3, s, 1, combine or "mul", go)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-5)


def test_rectangular_geometry(torch_fast):
    """Pairs for stride, padding and dilation, and non-default padding."""
    torch.manual_seed(1)
    x = torch.randn(B, C, 7, 8)
    for s, p, d in [((1, 2), (1, 2), (1, 2)), ((2, 1), (0, 0), (1, 1)), (2, (2, 0), (2, 1))]:
        ho, wo = [conv_out_size(n, 3, si, pi, di) for n, si, pi, di in
                  zip((7, 8), *[(v, v) if isinstance(v, int) else v for v in (s, p, d)])]
        spatial = torch.randn(B, 2, 9, ho, wo)
        outs = [pixel_filter(x, spatial, kernel_size=3, stride=s, padding=p, dilation=d, backend=b)
                for b in ("fast", "reference")]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("combine", [None, "mul", "add"])
@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck(torch_fast, backend, combine, shared):
    torch.manual_seed(2)
    x, spatial, ch = _inputs(3, 2, 1, 4, 3, 2, combine is not None, shared, torch.float64, c=4)
    leaves = [t.requires_grad_() for t in (x, spatial, ch) if t is not None]

    def f(*t):
        return pixel_filter(*t, kernel_size=3, stride=2, combine=combine or "mul", backend=backend)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_half_precision_close_to_float32(dtype, backend):
    torch.manual_seed(3)
    x, spatial, ch = _inputs(3, 1, 1, 8, 8, 2, True, False, dtype)
    out = pixel_filter(x, spatial, ch, kernel_size=3, backend=backend)
    ref = pixel_filter(x.float(), spatial.float(), ch.float(), kernel_size=3, backend="reference")
    assert out.dtype == dtype
    magnitude = pixel_filter(x.float().abs(), spatial.float().abs(), ch.float().abs(), kernel_size=3)
    # the inputs are exact in `dtype`; A·S·x rounds two products; 3·3 taps per output
    tol = rounding_tolerance(dtype, magnitude, ref, roundings=2, n=9)
    assert ((out.float() - ref).abs() <= tol).all()


def test_half_precision_backward(torch_fast):
    torch.manual_seed(4)
    x, spatial, ch = _inputs(3, 2, 1, 7, 6, 3, True, False, torch.bfloat16)
    go = torch.randn(B, C, *spatial.shape[-2:], dtype=torch.bfloat16)
    _, grads = _run("fast", x, spatial, ch, 3, 2, 1, "mul", go)
    _, ref = _run("reference", x.float(), spatial.float(), ch.float(), 3, 2, 1, "mul", go.float())
    # Σ|terms| of every gradient: the same multilinear sums over absolute values
    _, mag = _run("reference", x.float().abs(), spatial.float().abs(), ch.float().abs(), 3, 2, 1, "mul",
                  go.float().abs())
    for g, r, m in zip(grads, ref, mag):
        assert g.dtype == torch.bfloat16
        # exact bfloat16 inputs, two rounded products per term; the longest sum: the channel filter's gradient
        # over the output pixels
        tol = rounding_tolerance(torch.bfloat16, m, r, roundings=2, n=go.shape[-2] * go.shape[-1])
        assert ((g.float() - r).abs() <= tol).all()


def test_channels_last(torch_fast):
    torch.manual_seed(5)
    x, spatial, ch = _inputs(3, 2, 1, 7, 8, 2, True, False)
    go = torch.randn(B, C, *spatial.shape[-2:])
    xl = x.contiguous(memory_format=torch.channels_last)
    out, grads = _run("fast", xl, spatial, ch, 3, 2, 1, "mul", go)
    ref, ref_grads = _run("reference", x, spatial, ch, 3, 2, 1, "mul", go)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_autocast(torch_fast, backend):
    """Under autocast the float32 inputs run in the autocast dtype, like a convolution."""
    torch.manual_seed(6)
    x, spatial, ch = _inputs(3, 1, 1, 6, 6, 2, True, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pixel_filter(x, spatial, ch, kernel_size=3, backend=backend)
    ref = pixel_filter(x, spatial, ch, kernel_size=3, backend="reference")
    assert out.dtype == torch.bfloat16
    magnitude = pixel_filter(x.abs(), spatial.abs(), ch.abs(), kernel_size=3)
    # three inputs rounded to bfloat16 and two rounded products per tap; 3·3 taps per output
    tol = rounding_tolerance(torch.bfloat16, magnitude, ref, roundings=5, n=9)
    assert ((out.float() - ref).abs() <= tol).all()


def test_wrong_filter_size_names_expected_size():
    x = torch.randn(1, 4, 7, 9)
    with pytest.raises(ValueError, match="output of 4x5"):
        pixel_filter(x, torch.randn(1, 1, 9, 3, 4), kernel_size=3, stride=2)
    with pytest.raises(ValueError, match="must divide"):
        pixel_filter(x, torch.randn(1, 3, 9, 7, 9), kernel_size=3)
    with pytest.raises(ValueError, match="combine"):
        pixel_filter(x, torch.randn(1, 1, 9, 7, 9), torch.randn(1, 4, 9), kernel_size=3, combine="max")


@pytest.mark.parametrize("channel", [False, True])
def test_fast_never_materialises_unfolded_input(torch_fast, largest_tensor, channel):
    """No (B, C·K², Ho, Wo) tensor in the fast forward or backward; the reference does build one."""
    torch.manual_seed(7)
    K, H = 5, 8
    x, spatial, ch = _inputs(K, 1, 1, H, H, 2, channel, False, c=16)
    leaves = [t.requires_grad_() for t in (x, spatial, ch) if t is not None]
    unfolded = B * 16 * K * K * H * H

    def step(backend):
        return lambda: pixel_filter(*leaves, kernel_size=K, combine="mul", backend=backend).sum().backward()

    assert largest_tensor(step("fast")) < unfolded // 4
    assert largest_tensor(step("reference")) >= unfolded
