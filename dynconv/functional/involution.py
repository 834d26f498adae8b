"""`involution`: involution's span projection and aggregation as one op (Li et al., "Involution:
Inverting the Inherence of Convolution", CVPR 2021, Eqs. 4 and 6).

    w[b, g·K²+k, p] = Σ_m W2[g·K²+k, m] · r[b, m, p] + b2[g·K²+k]
    out[b, c, p]    = Σ_k w[b, g(c)·K²+k, p] · x[b, c, p·s − pad + k·d]

`r` (B, M, Ho, Wo) is the reduced feature map (the generator's `conv1`: [avgpool(s)] → 1×1 conv → BN
→ ReLU), `W2`, `b2` the span conv `conv2` (M → G·K², taps ordered (g, kh, kw) as the official
`involution_naive.py`), channels in contiguous groups g(c) = c // (C // G).

Backends: "reference" is the decomposition, `conv2` as a 1×1 conv and then `pixel_filter` (the tests'
oracle); "export" the same with `pixel_filter`'s export form (what `dynconv.export` traces for ONNX).
"fast" is the custom op `torch.ops.dynconv.involution`
(backward `dynconv::involution_backward`, fake kernels and registered autograd) on CPU tensors: the
compiled kernel (`dynconv/csrc/involution_cpu.cpp`) computes the G·K² span weights one output row
at a time and never holds the (B, G·K², Ho, Wo) tensor, in forward or backward; autograd saves only
the op's inputs. Where the kernel is not built (or `DYNCONV_NATIVE=0`) the op runs the decomposition
inside (its backward recomputes it), so it still saves only its inputs. CUDA tensors take the Triton
kernels (`triton_involution`, op `dynconv::involution_triton`, equally unmaterialised) where triton is
installed; other devices take the decomposition with `pixel_filter`'s fast path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair
from torch.utils.flop_counter import register_flop_formula

from . import triton_involution
from .backend import resolve
from .geometry import conv_out_hw, resolve_padding
from .library import absent, as_input, laid_out, register_autograd
from .pixel_filter import _memory_format, autocast_off, common_dtype, empty_out, pixel_filter

try:
    from . import native
except ImportError:
    native = None

__all__ = ["involution", "involution_recomputed"]


def _check(x, reduced, weight, bias, K, s, p, d, groups) -> None:
    """Shape, dtype and device checks."""
    names = ("x", "reduced", "weight", "bias")
    tensors = (x, reduced, weight, bias)
    for name, t in zip(names, tensors):
        if not t.is_floating_point():
            raise ValueError(f"involution: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"involution: {name} is on {t.device} but x is on {x.device}; move them to one device")
    if x.dim() != 4:
        raise ValueError(f"involution: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    if groups < 1 or C % groups:
        raise ValueError(f"involution: groups={groups} must divide the {C} input channels")
    Ho, Wo = conv_out_hw((H, W), K, s, p, d)
    if min(Ho, Wo) < 1:
        raise ValueError(f"involution: input {H}x{W} is too small for kernel_size={K}, dilation={d}, padding={p}")
    if reduced.dim() != 4 or reduced.shape[0] != B or tuple(reduced.shape[2:]) != (Ho, Wo):
        raise ValueError(f"involution: reduced must be (B, M, Ho, Wo) = ({B}, M, {Ho}, {Wo}) for this input and "
                         f"geometry, got shape {tuple(reduced.shape)}")
    span = (groups * K * K, reduced.shape[1])
    if tuple(weight.shape) not in (span, (*span, 1, 1)):
        raise ValueError(f"involution: weight must be (G*K*K, M) = {span} (or its 1x1 conv form), "
                         f"got shape {tuple(weight.shape)}")
    if tuple(bias.shape) != span[:1]:
        raise ValueError(f"involution: bias must be (G*K*K,) = {span[:1]}, got shape {tuple(bias.shape)}")


def _decomposed(x, reduced, weight, bias, K, s, p, d, groups, backend) -> Tensor:
    """The span projection as a 1×1 conv, then `pixel_filter` on `backend`."""
    B, _, Ho, Wo = reduced.shape
    spans = F.conv2d(reduced, _span(weight)[:, :, None, None], bias).view(B, groups, K * K, Ho, Wo)
    return pixel_filter(x, spans, kernel_size=K, stride=s, padding=p, dilation=d, backend=backend)


def _native_ok(x: Tensor) -> bool:
    """The compiled kernel serves x: CPU, built, not switched off, and a batch to split (an empty one takes the
    decomposition)."""
    return (native is not None and x.device.type == "cpu" and x.numel() > 0 and native.enabled()
            and native.INVOLUTION.load() is not None)


def _compute(tensors):
    """The inputs in the kernel's dtype (float64 stays, the rest float32), contiguous, the span weight as (G·K², M)."""
    cdt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return [t.to(cdt).contiguous() for t in tensors]


def _span(weight: Tensor) -> Tensor:
    """The span weight as (G·K², M), from itself or the 1×1 conv's (G·K², M, 1, 1)."""
    return weight.reshape(weight.shape[0], -1)


def _geometry(kernel_size, stride, padding, dilation, groups) -> list[int]:
    """The kernel's integer arguments: G, K, sh, sw, ph, pw, dh, dw."""
    return [groups, kernel_size, *stride, *padding, *dilation]


@torch.library.custom_op("dynconv::involution", mutates_args=())
def _involution_op(x: Tensor, reduced: Tensor, weight: Tensor, bias: Tensor, kernel_size: int, stride: list[int],
                   padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """The fused forward: the compiled CPU kernel, else the decomposition."""
    if not _native_ok(x):
        return _decomposed(x, reduced, weight, bias, kernel_size, tuple(stride), tuple(padding), tuple(dilation),
                           groups, "fast")
    out = native.INVOLUTION.module.forward(*_compute((x, reduced, _span(weight), bias)),
                                           *_geometry(kernel_size, stride, padding, dilation, groups))
    return laid_out(out.to(x.dtype), _memory_format(x))


@torch.library.custom_op("dynconv::involution_backward", mutates_args=())
def _involution_backward_op(grad_out: Tensor, x: Tensor, reduced: Tensor, weight: Tensor, bias: Tensor,
                            kernel_size: int, stride: list[int], padding: list[int], dilation: list[int],
                            groups: int, need: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients for x, reduced, weight and bias (`library.absent` where `need` is False): the compiled
    kernel recomputes the span weights row by row; else the decomposition's, with the span weights
    recomputed and their gradient from `pixel_filter`'s backward (both transient)."""
    inputs = (x, reduced, weight, bias)
    if _native_ok(x):
        grads = native.INVOLUTION.module.backward(*_compute((grad_out, x, reduced, _span(weight), bias)),
                                                  *_geometry(kernel_size, stride, padding, dilation, groups))
    else:
        B, _, Ho, Wo = reduced.shape
        span = _span(weight)
        spans = F.conv2d(reduced, span[:, :, None, None], bias).view(B, groups, kernel_size ** 2, Ho, Wo)
        gx, gspans, _ = torch.ops.dynconv.pixel_filter_backward(
            grad_out, x, spans, None, kernel_size, stride, padding, dilation, "mul", [need[0], True, False])
        gspans = gspans.flatten(1, 2)
        grads = [gx, torch.einsum("bkhw,km->bmhw", gspans, span), torch.einsum("bkhw,bmhw->km", gspans, reduced),
                 gspans.sum((0, 2, 3))]
    return absent([as_input(g.view(t.shape), t) if n else None for g, t, n in zip(grads, inputs, need)], x)


@_involution_op.register_fake
def _(x, reduced, weight, bias, kernel_size, stride, padding, dilation, groups):
    return empty_out((*x.shape[:2], *reduced.shape[-2:]), x)


@_involution_backward_op.register_fake
def _(grad_out, x, reduced, weight, bias, kernel_size, stride, padding, dilation, groups, need):
    return absent([torch.empty_like(t) if n else None for t, n in zip((x, reduced, weight, bias), need)], x)


register_autograd(_involution_op, torch.ops.dynconv.involution_backward, tensors=4)


@register_flop_formula(torch.ops.dynconv.involution)
def _flops(x_shape, reduced_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """The span projection's FLOPs (a 1×1 conv M → G·K²), as `FlopCounterMode` counts the unfused `conv2`;
    the aggregation is the operator's `aggregation_macs`."""
    B, M, Ho, Wo = reduced_shape
    return 2 * B * weight_shape[0] * M * Ho * Wo


def _prepare(x, reduced, weight, bias, kernel_size, stride, padding, dilation, groups):
    """Checked inputs in one dtype and the ops' geometry arguments [K, stride, padding, dilation, G]. The span
    weight stays as given, (G·K², M) or the 1×1 conv's (G·K², M, 1, 1), so that its gradient comes back in the
    parameter's own strides."""
    K = int(kernel_size)
    s, d = _pair(stride), _pair(dilation)
    p = resolve_padding(K, padding, d)
    _check(x, reduced, weight, bias, K, s, p, d, int(groups))
    return common_dtype(x, reduced, weight, bias), [K, list(s), list(p), list(d), int(groups)]


def _fused_ops(tensors, backend):
    """(op, backward op) of the unmaterialised path for these prepared inputs, or None where the
    decomposition runs (the reference or export backend, or a device without a fused kernel)."""
    if resolve(backend) != "fast":
        return None
    if triton_involution.available(*tensors):  # CUDA (or the opted-in interpreter)
        return torch.ops.dynconv.involution_triton, torch.ops.dynconv.involution_triton_backward
    if tensors[0].device.type == "cpu":
        return torch.ops.dynconv.involution, torch.ops.dynconv.involution_backward
    return None


def involution(x: Tensor, reduced: Tensor, weight: Tensor, bias: Tensor, *, kernel_size: int, stride=1,
               padding=None, dilation=1, groups: int = 1, backend: str | None = None, fused: bool = True) -> Tensor:
    """Involution's span projection and aggregation (module docstring).

    x: (B, C, H, W). reduced: (B, M, Ho, Wo), (Ho, Wo) by the conv formula. weight: (G·K², M) or the
    1×1 conv's (G·K², M, 1, 1). bias: (G·K²,). groups: G, dividing C. padding None means d·(K−1)//2.
    Inputs of mixed floating dtypes are promoted (or cast to the autocast dtype, as `pixel_filter`);
    any strides and memory formats are taken (the compiled kernel copies to contiguous once).
    fused=False runs the decomposition on `backend` everywhere (the unfused operator, for comparisons).
    """
    tensors, geometry = _prepare(x, reduced, weight, bias, kernel_size, stride, padding, dilation, groups)
    with autocast_off(x.device.type):
        ops = _fused_ops(tensors, backend) if fused else None
        if ops is None:
            return _decomposed(*tensors, geometry[0], *map(tuple, geometry[1:4]), geometry[4], backend)
        return ops[0](*tensors, *geometry)


class _Recomputed(torch.autograd.Function):
    """`involution` whose reduced features autograd does not keep: the backward recomputes them."""

    @staticmethod
    def forward(ctx, reduce, options, x, weight, bias, *params):
        dev = x.device.type
        ctx.autocast = torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
        ctx.reduce, ctx.options = reduce, options
        ctx.save_for_backward(x, weight, bias, *params)
        return involution(x, reduce(x, *params, update_stats=True), weight, bias, **options)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        leaves = [t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, ctx.needs_input_grad[2:])]
        x, weight, bias, *params = leaves
        options = dict(ctx.options)
        backend = options.pop("backend")
        enabled, dtype = ctx.autocast
        with torch.enable_grad():
            with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                reduced = ctx.reduce(x, *params, update_stats=False)
                tensors, geometry = _prepare(x, reduced, weight, bias, **options)
            ops = _fused_ops([t.detach() for t in tensors], backend)
            if ops is None:  # the decomposition: its forward runs again, with the graph
                outputs = [_decomposed(*tensors, geometry[0], *map(tuple, geometry[1:4]), geometry[4], backend)]
                grads = [grad_out]
            else:
                need = [t.requires_grad for t in tensors]
                grads = ops[1](grad_out, *(t.detach() for t in tensors), *geometry, need)
                outputs, grads = zip(*[(t, g) for t, g, n in zip(tensors, grads, need) if n]) if any(need) else ((), ())
        wanted = [t for t in leaves if t.requires_grad]
        found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True) if wanted and outputs else ())
        return (None, None, *(next(found, None) if t.requires_grad else None for t in leaves))


def involution_recomputed(x: Tensor, reduce, params, weight: Tensor, bias: Tensor, *, kernel_size: int, stride=1,
                          padding=None, dilation=1, groups: int = 1, backend: str | None = None) -> Tensor:
    """`involution(x, reduce(x, *params, update_stats=True), weight, bias, ...)` for training, where
    autograd keeps x, `params`, weight and bias but not the reduced features nor anything `reduce`
    would save (its BatchNorm input): the backward recomputes them with
    `reduce(x, *params, update_stats=False)`, which must give the same values without touching
    running statistics, then takes the fused op's backward. The gradients are the plain path's."""
    options = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
                   backend=resolve(backend))  # the backward runs the backend of this call
    return _Recomputed.apply(reduce, options, x, weight, bias, *params)
