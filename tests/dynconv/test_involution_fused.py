"""The fused involution op (`dynconv.functional.involution`, `dynconv::involution`) against its
decomposition (1×1 span conv + `pixel_filter` reference): forward and every gradient, gradcheck,
opcheck, compile, what autograd saves, and its input errors."""
import pytest
import torch
from torch._dynamo.utils import counters

from dynconv import use_backend
from dynconv.complexity import count_macs
from dynconv.functional import involution as involution_module
from dynconv.functional.geometry import conv_out_hw
from dynconv.functional.involution import involution
from dynconv.ops.involution import Involution
from tests.dynconv.op_checks import rounding_tolerance

# (B, C, H, W, M, G, K, stride, dilation): stride 1 and 2, odd sizes, dilation 2, G = 1 and G > 1, a single
# sample with several groups (the backward splits the groups over the threads), the RedNet K = 7
CASES = [
    (2, 8, 6, 5, 4, 2, 3, 1, 1),
    (2, 8, 7, 9, 3, 2, 3, 2, 1),
    (1, 16, 9, 8, 5, 1, 5, 1, 2),
    (3, 12, 11, 13, 6, 3, 3, 2, 2),
    (1, 32, 10, 9, 8, 4, 7, 1, 1),
]


def _inputs(case, dtype=torch.float64, channels_last=False):
    B, C, H, W, M, G, K, s, d = case
    torch.manual_seed(0)
    ho, wo = conv_out_hw((H, W), K, s, d * (K - 1) // 2, d)
    x = torch.randn(B, C, H, W, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tensors = [x, torch.randn(B, M, ho, wo, dtype=dtype), torch.randn(G * K * K, M, dtype=dtype),
               torch.randn(G * K * K, dtype=dtype)]
    return [t.requires_grad_() for t in tensors], dict(kernel_size=K, stride=s, dilation=d, groups=G)


def _out_and_grads(inputs, geometry, backend, grad_out=None):
    out = involution(*inputs, **geometry, backend=backend)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    return out, grad_out, torch.autograd.grad(out, inputs, grad_out)


def _reduction_sizes(case) -> list[int]:
    """Terms summed per element of the output and of the gradients of x, r, W2 and b2."""
    B, C, H, W, M, G, K, s, d = case
    ho, wo = conv_out_hw((H, W), K, s, d * (K - 1) // 2, d)
    taps, pixels = K * K * (M + 1), B * ho * wo * C // G
    return [taps, taps, G * K * K * C // G, pixels, pixels]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_decomposition_float64(case):
    inputs, geometry = _inputs(case, channels_last=case[0] == 3)
    out, go, grads = _out_and_grads(inputs, geometry, "fast")
    ref, _, ref_grads = _out_and_grads(inputs, geometry, "reference", go)
    assert out.is_contiguous(memory_format=torch.channels_last) == (case[0] == 3)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("blas", [True, False], ids=["blas", "no-blas"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_span_weights_by_blas_and_by_the_kernel(case, blas):
    """The compiled kernel takes the span weights, grad r and grad W2 from torch's BLAS (GEMMs per block of rows)
    where the process has one, else from its own loops: both equal the decomposition to float64 rounding, forward
    and every gradient."""
    from dynconv.functional import native

    kernel = native.INVOLUTION.load()
    if kernel is None:
        pytest.skip("the compiled involution kernel is not built here")
    assert kernel.has_blas()  # torch's wheels link a BLAS; the no-BLAS path is forced below
    inputs, geometry = _inputs(case, channels_last=case[0] == 3)
    kernel.set_blas(blas)
    try:
        out, go, grads = _out_and_grads(inputs, geometry, "fast")
    finally:
        kernel.set_blas(True)
    ref, _, ref_grads = _out_and_grads(inputs, geometry, "reference", go)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES[:2] + CASES[-1:], ids=str)
def test_float32_within_rounding_of_float64(case):
    """float32 forward and gradients within n·eps of the float64 decomposition (n terms summed)."""
    inputs, geometry = _inputs(case, torch.float32, channels_last=True)
    out, go, grads = _out_and_grads(inputs, geometry, "fast")
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref, _, ref_grads = _out_and_grads(ref_inputs, geometry, "reference", go.double())
    for got, want, n in zip((out, *grads), (ref, *ref_grads), _reduction_sizes(case)):
        assert got.dtype == torch.float32
        bound = n * torch.finfo(torch.float32).eps * want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_types_computed_in_float32(dtype):
    """Half inputs: the span weights and sums in float32, one rounding of the output to `dtype`."""
    case = CASES[1]
    inputs, geometry = _inputs(case, dtype)
    out = involution(*inputs, **geometry)
    wide = [t.detach().float() for t in inputs]
    ref = involution(*wide, **geometry, backend="reference")
    magnitude = involution(*(t.abs() for t in wide), **geometry, backend="reference")
    assert out.dtype == dtype
    tol = rounding_tolerance(dtype, magnitude, ref, roundings=0, n=_reduction_sizes(case)[0])
    assert ((out.float() - ref).abs() <= tol).all()
    grads = torch.autograd.grad(out.float().sum(), inputs)
    assert [g.dtype for g in grads] == [dtype] * 4


def test_gradcheck_float64():
    inputs, geometry = _inputs((1, 4, 5, 4, 3, 2, 3, 2, 2))
    assert torch.autograd.gradcheck(lambda *t: involution(*t, **geometry), inputs)
    inputs, geometry = _inputs((2, 2, 4, 3, 2, 1, 3, 1, 1))
    assert torch.autograd.gradcheck(lambda *t: involution(*t, **geometry), inputs)


def _module(stride=1, dilation=1, K=3, C=16):
    torch.manual_seed(0)
    op = Involution(C, C, K, stride, dilation=dilation, group_channels=4, reduction_ratio=4).double()
    for p in op.parameters():
        p.data.normal_()
    return op


@pytest.mark.parametrize("stride,dilation,size", [(1, 1, (7, 6)), (2, 1, (9, 8)), (1, 2, (8, 9))])
def test_module_fused_equals_reference(stride, dilation, size):
    """Training mode (batch statistics): the output and the gradients of the input and every parameter."""
    op = _module(stride, dilation)
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    results = []
    for backend in ("fast", "reference"):
        xi = x.clone().requires_grad_()
        with use_backend(backend):
            out = op(xi)
        torch.manual_seed(1)
        grads = torch.autograd.grad(out, [xi, *op.parameters()], torch.randn_like(out))
        results.append((out, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_macs_count_the_span_projection():
    """The fused op reports the span conv's FLOPs to FlopCounterMode, so MACs equal the decomposition's."""
    op, x = _module(stride=2), torch.randn(1, 16, 9, 8, dtype=torch.float64)
    with use_backend("reference"):
        ref = count_macs(op, x)
    assert count_macs(op, x) == ref


def _largest_saved(fn) -> int:
    """The most elements of any tensor autograd saves for backward while fn() runs its forward."""
    largest = [0]

    def pack(t):
        largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return largest[0]


@pytest.mark.parametrize("stride", [1, 2])
def test_saves_no_weight_sized_tensor(largest_tensor, stride):
    """An involution layer (generator included) keeps nothing of the size of its (B, G·K², Ho, Wo) kernel
    tensor for backward, and on CPU no such tensor exists in forward or backward; the unfused layer
    (`fused = False`, and the reference backend) keeps it."""
    K, B = 5, 2
    op = Involution(8, 8, K, stride, group_channels=4, reduction_ratio=2)
    x = torch.randn(B, 8, 9, 10, requires_grad=True)
    ho, wo = conv_out_hw((9, 10), K, stride, K // 2)
    weight_size = B * op.kernel_groups * K * K * ho * wo
    assert _largest_saved(lambda: op(x)) < weight_size
    assert largest_tensor(lambda: op(x).sum().backward()) < weight_size
    with use_backend("reference"):
        assert _largest_saved(lambda: op(x)) >= weight_size
    op.fused = False
    assert _largest_saved(lambda: op(x)) >= weight_size


def test_compile_fullgraph_no_graph_break():
    op, x = _module(stride=2), torch.randn(2, 16, 9, 8, dtype=torch.float64)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (op, compiled):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        results.append((out, *torch.autograd.grad(out.square().sum(), [xi, *op.parameters()])))
    assert not counters["graph_break"]
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.fixture(params=["native", "decomposition"])
def impl(request, monkeypatch):
    """The op with the compiled kernel, and the decomposition it falls back to where none is built."""
    if request.param == "decomposition":
        monkeypatch.setattr(involution_module, "native", None)
    elif not involution_module._native_ok(torch.empty(1)):
        pytest.fail("the compiled involution kernel did not build; see native.INVOLUTION.build_info()")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=str)
def test_opcheck(impl, case, dtype):
    inputs, g = _inputs(case, dtype)
    p = g["dilation"] * (g["kernel_size"] - 1) // 2
    args = (*inputs, g["kernel_size"], [g["stride"]] * 2, [p, p], [g["dilation"]] * 2, g["groups"])
    torch.library.opcheck(torch.ops.dynconv.involution.default, args)


def test_decomposition_fallback_matches(impl):
    """Without the compiled kernel the op still computes the same values and gradients."""
    inputs, geometry = _inputs(CASES[1])
    out, go, grads = _out_and_grads(inputs, geometry, "fast")
    ref, _, ref_grads = _out_and_grads(inputs, geometry, "reference", go)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_strided_inputs_are_taken():
    """Non-contiguous x, r and W2 (and the 1×1 conv form of W2) give the contiguous result."""
    (x, r, w, b), geometry = _inputs(CASES[0])
    ref = involution(x, r, w, b, **geometry)
    xs = x.detach().transpose(2, 3).contiguous().transpose(2, 3)
    rs = torch.cat([r.detach(), r.detach()], -1)[..., :r.shape[-1]]
    ws = w.detach().t().contiguous().t()
    assert not (xs.is_contiguous() or rs.is_contiguous() or ws.is_contiguous())
    torch.testing.assert_close(involution(xs, rs, ws, b, **geometry), ref)
    torch.testing.assert_close(involution(x, r, w[:, :, None, None], b, **geometry), ref)


@pytest.mark.parametrize("change,match", [
    (lambda t: t.__setitem__(0, t[0][0]), "x must be"),
    (lambda t: t.__setitem__(1, t[1][:, :, :-1]), "reduced must be"),
    (lambda t: t.__setitem__(2, t[2][:-1]), "weight must be"),
    (lambda t: t.__setitem__(3, t[3][:-1]), "bias must be"),
    (lambda t: t.__setitem__(0, t[0].long()), "x must be a floating-point"),
    (lambda t: t.__setitem__(2, t[2].to("meta")), "weight is on meta"),
])
def test_bad_inputs_name_the_argument(change, match):
    tensors, geometry = _inputs(CASES[0])
    tensors = [t.detach() for t in tensors]
    change(tensors)
    with pytest.raises(ValueError, match=match):
        involution(*tensors, **geometry)


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match="groups=3 must divide"):
        involution(*_inputs(CASES[0])[0], kernel_size=3, groups=3)


def _train_step(op, x, grad_out=None):
    """Output, the gradients of x and of every parameter, and the buffers after one training step."""
    xi = x.detach().clone().requires_grad_(x.requires_grad)
    out = op(xi)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    wanted = [t for t in (xi, *op.parameters()) if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, grad_out)
    return out, grad_out, [*grads, *(b.clone() for b in op.buffers())]


@pytest.mark.parametrize("stride,dtype,channels_last,frozen", [
    (1, torch.float64, False, False), (2, torch.float64, False, False), (1, torch.float32, True, False),
    (2, torch.float32, False, True)], ids=str)
def test_recomputed_reduction_equals_kept(stride, dtype, channels_last, frozen):
    """In training the module keeps only its input and recomputes the generator in backward: the output,
    the gradients of x and of every parameter, and BatchNorm's running statistics and batch count (one
    update per step) are bit-identical to keeping the reduced features (`recompute = False`); also with
    the generator frozen and x not requiring grad."""
    op = _module(stride).to(dtype)
    if frozen:
        op.conv1.requires_grad_(False)
    x = torch.randn(2, 16, 9, 8, dtype=dtype).requires_grad_(not frozen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    state = {k: v.clone() for k, v in op.state_dict().items()}
    results = []
    for recompute in (True, False):
        op.load_state_dict(state)
        op.recompute = recompute
        results.append(_train_step(op, x, results[0][1] if results else None))
    (out, _, got), (ref, _, want) = results
    assert op.conv1.bn.num_batches_tracked.item() == 1
    assert torch.equal(out, ref)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("stride", [1, 2])
def test_recomputed_reduction_is_not_kept(stride):
    """What autograd saves: with the recomputation, no tensor the size of the reduced features (B, M, Ho, Wo)
    nor of the pooled input; without it, the reduced features and the BatchNorm input."""
    op, x = _module(stride).float(), torch.randn(2, 16, 12, 10, requires_grad=True)
    reduced = op.conv1(op._pooled(x)).shape

    def saved_shapes():
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            op(x)
        return shapes

    assert tuple(reduced) not in saved_shapes()
    assert set(saved_shapes()) == {tuple(x.shape), *(tuple(p.shape) for p in op.parameters())}
    op.recompute = False
    assert saved_shapes().count(tuple(reduced)) >= 2


def test_recomputed_reduction_under_autocast():
    """bfloat16 autocast: the backward recomputes the generator under the forward's autocast state, so the
    gradients equal the kept path's."""
    op, x = _module(2).float(), torch.randn(2, 16, 9, 8)
    state = {k: v.clone() for k, v in op.state_dict().items()}
    results = []
    for recompute in (True, False):
        op.load_state_dict(state)
        op.recompute = recompute
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_train_step(op, x.requires_grad_(), results[0][1] if results else None))
    (out, _, got), (ref, _, want) = results
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_recomputed_reduction_has_no_double_backward():
    op, x = _module(1), torch.randn(1, 16, 6, 6, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(op(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gx.sum().backward()
