"""The primitives as `torch.library` custom ops: `torch.library.opcheck` (schema, fake kernel, registered
autograd, AOT dispatch with static and dynamic shapes) over the shape grid, on every CPU implementation,
and the "reference" backend staying plain PyTorch ops."""
import itertools

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import dynconv
from dynconv.functional import pixel_filter as pixel_filter_module
from dynconv.functional.geometry import conv_out_hw

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
B, C, H, W = 2, 4, 6, 5

# every (stride, dilation) pair meets three of the twelve (groups, shared, combine) filters, so each occurs;
# the last case has unequal strides, which the compiled kernel leaves to the tap loop
GEOMETRY = list(itertools.product([(1, 1), (2, 2)], [(1, 1), (2, 2)]))
FILTERS = list(itertools.product([1, 2], [False, True], [None, "mul", "add"]))
CASES = [(*GEOMETRY[n % 4], *FILTERS[n]) for n in range(12)] + [((1, 2), (1, 1), 2, False, "mul")]


def _leaves(*shapes, dtype, device="cpu"):
    return [torch.randn(*s, dtype=dtype, device=device).requires_grad_() for s in shapes]


@pytest.fixture(params=["native", "taps"] + (["triton_cuda"] if torch.cuda.is_available() else []))
def impl(request, monkeypatch):
    """Each implementation of the per-pixel filter op: on CPU, `dynconv::pixel_filter` with the compiled
    kernel and with the tap loop; on a GPU machine also `dynconv::pixel_filter_triton` on CUDA tensors."""
    if request.param == "triton_cuda":
        return request.param
    if request.param == "taps":
        monkeypatch.setattr(pixel_filter_module, "native", None)
    elif pixel_filter_module.native is None or pixel_filter_module.native.load() is None:
        pytest.fail("the compiled CPU kernel did not build; see dynconv.functional.native.build_info()")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_opcheck_pixel_filter(impl, case, dtype):
    (s, d, G, shared, combine), K = case, 3
    p = tuple(di * (K - 1) // 2 for di in d)
    ho, wo = conv_out_hw((H, W), K, s, p, d)
    shapes = [(B, C, H, W), (1 if shared else B, G, K * K, ho, wo)] + ([(B, C, K * K)] if combine else [])
    device = "cuda" if impl == "triton_cuda" else "cpu"
    x, spatial, *channel = _leaves(*shapes, dtype=dtype, device=device)
    args = (x, spatial, channel[0] if channel else None, K, list(s), list(p), list(d), combine or "mul")
    op = torch.ops.dynconv.pixel_filter_triton if impl == "triton_cuda" else torch.ops.dynconv.pixel_filter
    torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s, d, G", [(1, 1, 1), (2, 1, 2), (1, 2, 4), (2, 2, 1)])
def test_opcheck_deform_kernel_local(s, d, G, dtype):
    K, scope = 3, (4, 4)
    ho, wo = conv_out_hw((H, W), K, s, d, d)
    x, offset, weight = _leaves((B, C, H, W), (B, G, K * K, 2, ho, wo), (C, *scope), dtype=dtype)
    args = (x, offset, weight, K, [s, s], [d, d], [d, d])
    torch.library.opcheck(torch.ops.dynconv.deform_kernel_local.default, args)


def _dynconv_ops(fn, *args) -> set[str]:
    """The dynconv custom ops in the graph `make_fx` traces from fn(*args), forward and backward."""
    def fwd_bwd(*a):
        out = fn(*a)
        return torch.autograd.grad(out.sum(), [t for t in a if t.requires_grad])

    graph = make_fx(fwd_bwd)(*args).graph
    return {str(n.target) for n in graph.nodes if str(n.target).startswith("dynconv.")}


@pytest.mark.parametrize("name", dynconv.list_ops())
def test_reference_backend_is_plain_pytorch(name):
    """Under use_backend("reference") no operator reaches a custom op (what export relies on); the fast
    backend of the per-pixel operators does."""
    size = {"input_size": (5, 5)} if "input_size" in dynconv.op_options(name) else {}
    op = dynconv.create_op(name, 16, 16, 3, **size)
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    with dynconv.use_backend("reference"):
        assert _dynconv_ops(op, x) == set()
    fast = _dynconv_ops(op, x)
    if name in ("ddf", "tvconv"):
        assert {"dynconv.pixel_filter.default", "dynconv.pixel_filter_backward.default"} <= fast
    if name == "involution":
        assert {"dynconv.involution.default", "dynconv.involution_backward.default"} <= fast
    if name == "dk_local":
        assert "dynconv.deform_kernel_local_backward.default" in fast
