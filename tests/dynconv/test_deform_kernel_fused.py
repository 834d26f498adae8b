"""The fused local Deformable Kernel (the compiled CPU kernel behind `dynconv::deform_kernel_local`) against the
reference decomposition: forward and every gradient, gradcheck, opcheck, compile, what autograd keeps, bad input."""
import pytest
import torch

from dynconv import use_backend
from dynconv.functional import deform_kernel as dk
from dynconv.functional import native
from dynconv.functional.deform_kernel import deform_kernel_local, resampled_kernel, tap_kernel
from dynconv.functional.geometry import conv_out_hw
from dynconv.ops.deformable_kernel import DeformKernelLocal
from tests.dynconv.test_compile import assert_compiled_equals_eager


# (B, C, H, W, G, k, stride, dilation, scope): odd and non-square sizes, offset groups 1, > 1 and one per
# channel, k 3 and 5
CASES = [(2, 6, 7, 6, 3, 3, 1, 1, (4, 5)), (2, 4, 9, 8, 1, 3, 2, 2, (4, 4)), (1, 8, 5, 5, 2, 3, 1, 1, (3, 3)),
         (3, 6, 8, 7, 2, 5, 2, 1, (6, 5)), (2, 3, 6, 5, 1, 3, 1, 2, (5, 5)), (2, 4, 5, 6, 4, 3, 2, 1, (4, 4))]


def _inputs(B, C, H, W, G, k, s, d, scope, dtype=torch.float64, seed=0):
    """x, offsets (std 1.5: many taps leave the scope) and scope weights, all requiring grad."""
    torch.manual_seed(seed)
    ho, wo = conv_out_hw((H, W), k, s, (k - 1) // 2 * d, d)
    return (torch.randn(B, C, H, W, dtype=dtype).requires_grad_(),
            (1.5 * torch.randn(B, G, k * k, 2, ho, wo, dtype=dtype)).requires_grad_(),
            torch.randn(C, *scope, dtype=dtype).requires_grad_())


def _run(args, k, s, d, backend, memory_format=torch.contiguous_format):
    """Output and the gradients of x, offset and weight for a fixed random output gradient."""
    x, offset, weight = args
    xi = x.detach().contiguous(memory_format=memory_format).requires_grad_()
    out = deform_kernel_local(xi, offset, weight, kernel_size=k, stride=s, dilation=d, backend=backend)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    return (out, *torch.autograd.grad(out, [xi, offset, weight], grad))


def _assert_all_close(actual, expected, dtype, terms):
    """Each tensor within `terms` roundings of its largest magnitude (terms: the longest sum behind it)."""
    eps = torch.finfo(dtype).eps
    for name, a, e in zip(("out", "grad x", "grad offset", "grad weight"), actual, expected):
        torch.testing.assert_close(a, e, rtol=terms * eps, atol=terms * eps * e.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def _terms(B, C, H, W, G, k, s, d, scope):
    """The longest sum: the weight gradient's, over every pixel, tap, corner and channel of a group."""
    return B * H * W * k * k * 4 * C // G


def test_kernel_builds_and_serves_cpu_tensors(monkeypatch):
    info = native.DEFORM_KERNEL.build_info()
    assert info["built"], f"the compiled deform_kernel extension did not build: {info}"
    assert dk._native_ok(torch.empty(1), torch.empty(1, dtype=torch.bfloat16))
    assert not dk._native_ok(torch.empty(1), torch.empty(1, device="meta"))
    assert not dk._native_ok(torch.empty(0))  # an empty batch takes the tap loop
    monkeypatch.setenv("DYNCONV_NATIVE", "0")
    assert not dk._native_ok(torch.empty(1))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_fused_equals_reference(case, memory_format):
    B, C, H, W, G, k, s, d, scope = case
    args = _inputs(*case)
    fused = _run(args, k, s, d, "fast", memory_format)
    _assert_all_close(fused, _run(args, k, s, d, "reference"), torch.float64, _terms(*case))
    assert fused[1].is_contiguous(memory_format=memory_format)
    assert fused[0].is_contiguous(memory_format=memory_format)


def test_fused_equals_the_pytorch_tap_loop(monkeypatch):
    """The tap loop the other devices run, on the same inputs, float32."""
    case = CASES[3]
    B, C, H, W, G, k, s, d, scope = case
    args = _inputs(*case, dtype=torch.float32)
    fused = _run(args, k, s, d, "fast")
    monkeypatch.setattr(dk, "native", None)
    _assert_all_close(fused, _run(args, k, s, d, "fast"), torch.float32, _terms(*case))


@pytest.mark.parametrize("case", [(2, 4, 4, 3, 2, 3, 2, 1, (4, 4)), (1, 3, 5, 4, 1, 3, 1, 2, (4, 3))], ids=str)
def test_fused_gradcheck(case):
    B, C, H, W, G, k, s, d, scope = case
    x, offset, weight = _inputs(*case)

    def f(x, offset, weight):
        return deform_kernel_local(x, offset, weight, kernel_size=k, stride=s, dilation=d, backend="fast")

    assert torch.autograd.gradcheck(f, (x, offset, weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_computed_in_float32(dtype):
    """bf16/fp16 inputs give what the float32 kernel gives on the same (rounded) values, rounded once."""
    case = CASES[0]
    B, C, H, W, G, k, s, d, scope = case
    args = [t.detach().to(dtype).requires_grad_() for t in _inputs(*case, dtype=torch.float32)]
    half = _run(args, k, s, d, "fast")
    single = _run([t.detach().float().requires_grad_() for t in args], k, s, d, "fast")
    assert all(h.dtype == dtype for h in half)
    eps = torch.finfo(dtype).eps
    for h, f in zip(half, single):
        torch.testing.assert_close(h.float(), f, rtol=eps, atol=eps * f.abs().max().item())


def test_opcheck_channels_last_offset_groups():
    """The op's fake kernel, autograd registration and strides with a channels_last input and G > 1."""
    x, offset, weight = _inputs(2, 4, 5, 6, 2, 3, 2, 1, (4, 4))
    x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.dynconv.deform_kernel_local.default, (x, offset, weight, 3, [2, 2], [1, 1],
                                                                           [1, 1]))


def test_module_compiles_fullgraph():
    """A DK layer with offset groups, stride 2 and a channels_last input traces without a graph break."""
    torch.manual_seed(0)
    op = DeformKernelLocal(8, 8, 3, 2, scope_size=4, offset_groups=2)
    with torch.no_grad():
        op.rotation_conv.weight.normal_(0, 0.2)
    x = torch.randn(2, 8, 7, 9).contiguous(memory_format=torch.channels_last)
    assert_compiled_equals_eager(op, x, "aot_eager")


def _largest_saved(op, x) -> int:
    """The most elements of any tensor autograd keeps for backward during op(x)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(x).sum().backward()
    return max(sizes)


def test_layer_keeps_no_per_pixel_kernel():
    """The fused layer keeps its inputs (x, offsets, scope weights) only; the reference keeps the per-pixel
    kernel (B, C, k², Ho, Wo), which this check would catch."""
    torch.manual_seed(0)
    B, C, k, size = 2, 16, 3, (9, 8)
    op = DeformKernelLocal(C, C, k, scope_size=4)
    x = torch.randn(B, C, *size, requires_grad=True)
    kernel_numel = B * C * k * k * size[0] * size[1]
    assert _largest_saved(op, x) < kernel_numel
    with use_backend("reference"):
        assert _largest_saved(op, x) >= kernel_numel


def test_resampled_kernel_equals_taps():
    """The reference's one-gather-per-corner kernel is the per-tap kernel, exactly."""
    _, offset, weight = _inputs(*CASES[3])
    k = CASES[3][5]
    stacked = torch.stack([tap_kernel(weight, offset, t, k) for t in range(k * k)], 2)
    torch.testing.assert_close(resampled_kernel(weight, offset, k), stacked, rtol=0, atol=0)


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(2, 4, 6)), "x must be a 4-d floating-point tensor"),
    (dict(x=torch.ones(2, 4, 6, 6, dtype=torch.int64)), "x must be a 4-d floating-point tensor"),
    (dict(offset=torch.randn(2, 2, 9, 2, 5, 6)), r"offset must be \(B, G, k², 2, Ho, Wo\) = \(2, 2, 9, 2, 6, 6\)"),
    (dict(offset=torch.randn(2, 3, 9, 2, 6, 6)), "offset groups 3 must divide the 4 channels"),
    (dict(offset=torch.randn(2, 2, 9, 6, 6)), "offset must be a 6-d floating-point tensor"),
    (dict(weight=torch.randn(3, 4, 4)), r"weight must be the scope planes \(C=4, S_h, S_w\)"),
    (dict(weight=torch.randn(4, 4, 4, device="meta")), "must be on one device"),
])
def test_bad_input_names_the_argument(change, match):
    args = dict(x=torch.randn(2, 4, 6, 6), offset=torch.randn(2, 2, 9, 2, 6, 6), weight=torch.randn(4, 4, 4))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        deform_kernel_local(**args, kernel_size=3)
