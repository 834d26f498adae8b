"""Deformable Kernels' kernel sampling (Gao et al., ICLR 2020, Eq. 6) and the local DK aggregation.

A channel's S_h×S_w scope kernel W_c is resampled bilinearly at learnt scope positions; tap k of the
k×k kernel at pixel p is W_c(fh + Δh + (S_h−k)/2, fw + Δw + (S_w−k)/2), channel c using offset group
c mod G. Sampling follows the official `planar_bilinear`: 0 unless −1 < h < S_h and −1 < w < S_w, and
corners outside the scope count as 0.

Backends: "reference" resamples the whole (B, C, k², Ho, Wo) kernel with one gather (every corner of
every tap) and filters with `pixel_filter`'s reference: plain PyTorch ops, the tests' oracle; "export"
(what `dynconv.export` traces for ONNX) resamples one tap's (B, C, Ho, Wo) kernel at a time, by one gather of
its four corners, and sums the taps as `pixel_filter`'s export form does. "fast" is the custom op
`torch.ops.dynconv.deform_kernel_local`
(fake kernel and registered autograd): for CPU tensors the compiled kernel
(`dynconv/csrc/deform_kernel_cpu.cpp`) samples each tap's kernel value where it multiplies the input,
forward and backward; CUDA tensors take the Triton kernels (`triton_deform_kernel`, op
`dynconv::deform_kernel_local_triton`, equally unmaterialised) where triton is installed; elsewhere a
PyTorch tap loop that holds one tap's (B, C, Ho, Wo) kernel at a time.
None keeps the per-pixel kernel. The compiled kernel computes float32 and float64 natively and
bfloat16/float16 in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from . import triton_deform_kernel
from .backend import resolve
from .geometry import conv_out_hw, resolve_padding
from .library import absent, as_input, laid_out, register_autograd
from .pixel_filter import (_memory_format, acc_dtype, autocast_off, common_dtype, empty_out, padded_input, pixel_filter,
                           shifted_taps, tap, zeros_in_format)

try:
    from . import native
except ImportError:
    native = None

__all__ = ["deform_kernel_local", "resampled_kernel", "scope_corners", "tap_kernel"]


def scope_corners(h: Tensor, w: Tensor, scope: tuple[int, int]):
    """The four bilinear corners of scope coordinates (h, w) in an S_h×S_w plane.

    Yields (index hi·S_w + wi, coefficient, ∂coefficient/∂h, ∂coefficient/∂w); corners outside the
    scope, and every corner of a point outside (−1, S), get coefficient 0 (index clamped, unused).
    """
    sh, sw = scope
    inside = ((h > -1) & (h < sh) & (w > -1) & (w < sw)).to(h.dtype)
    h0, w0 = h.floor(), w.floor()
    lh, lw = h - h0, w - w0
    for dh in (0, 1):
        ah, sign_h, hi = (lh, 1.0, h0 + 1) if dh else (1 - lh, -1.0, h0)
        for dw in (0, 1):
            aw, sign_w, wi = (lw, 1.0, w0 + 1) if dw else (1 - lw, -1.0, w0)
            valid = inside * ((hi >= 0) & (hi < sh) & (wi >= 0) & (wi < sw)).to(h.dtype)
            index = (hi.clamp(0, sh - 1) * sw + wi.clamp(0, sw - 1)).long()
            yield index, ah * aw * valid, sign_h * aw * valid, ah * sign_w * valid


def _tap_coords(offset: Tensor, k: int, kernel_size: int, scope: tuple[int, int]):
    """Scope coordinates (h, w), each (B, G, Ho, Wo), of tap k for each offset group."""
    fh, fw = divmod(k, kernel_size)
    return (offset[:, :, k, 0] + (fh + (scope[0] - kernel_size) / 2),
            offset[:, :, k, 1] + (fw + (scope[1] - kernel_size) / 2))


def _all_tap_coords(offset: Tensor, kernel_size: int, scope: tuple[int, int], first: int = 0):
    """`_tap_coords` of the taps `offset` holds (from tap `first` on) at once, each (B, G, n, Ho, Wo)."""
    t = torch.arange(first, first + offset.shape[2], device=offset.device).view(-1, 1, 1)
    return (offset[:, :, :, 0] + ((t // kernel_size).to(offset.dtype) + (scope[0] - kernel_size) / 2),
            offset[:, :, :, 1] + ((t % kernel_size).to(offset.dtype) + (scope[1] - kernel_size) / 2))


def _gather(planes: Tensor, index: Tensor) -> Tensor:
    """planes (C, S·S), index (B, G, Ho, Wo) → (B, C/G, G, Ho, Wo): channel c = m·G + g reads
    planes[c, index[b, g]], i.e. channel c uses offset group c mod G."""
    B, G = index.shape[:2]
    M = planes.shape[0] // G
    src = planes.view(1, M, G, -1).expand(B, -1, -1, -1)
    return src.gather(3, index.reshape(B, 1, G, index.shape[2:].numel()).expand(-1, M, -1, -1)).view(B, M, G, *index.shape[2:])


def tap_kernel(weight: Tensor, offset: Tensor, k: int, kernel_size: int) -> Tensor:
    """The resampled kernel of tap k at every pixel, (B, C, Ho, Wo); weight (C, S_h, S_w)."""
    C, sh, sw = weight.shape
    h, w = _tap_coords(offset, k, kernel_size, (sh, sw))
    planes = weight.reshape(C, sh * sw)
    kern = sum(coef.unsqueeze(1) * _gather(planes, index) for index, coef, _, _ in scope_corners(h, w, (sh, sw)))
    # reshape: offsets sliced from a channels_last offset conv give a kernel that cannot be viewed as (B, C, ...)
    return kern.reshape(h.shape[0], C, *h.shape[2:])


def resampled_kernel(weight: Tensor, offset: Tensor, kernel_size: int, first: int = 0) -> Tensor:
    """The resampled kernel (B, C, n, Ho, Wo) of the n taps `offset` holds (all k² by default; from tap `first`
    on) in a few standard ops: equal, element by element, to stacking `tap_kernel` over those taps.

    The scope planes get a border of zeros, so the four corners of a point inside (−1, S) are inside the
    bordered plane and a corner outside the scope reads 0; one gather fetches all corners of all taps."""
    C, sh, sw = weight.shape
    h, w = _all_tap_coords(offset, kernel_size, (sh, sw), first)
    inside = (h > -1) & (h < sh) & (w > -1) & (w < sw)
    h0, w0 = h.floor(), w.floor()
    lh, lw = h - h0, w - w0
    row = sw + 2
    base = torch.where(inside, (h0 + 1) * row + (w0 + 1), 0).long()  # any in-range index where the sample is 0
    index = torch.stack([base, base + 1, base + row, base + row + 1], 2)  # (B, G, 4, k², Ho, Wo)
    val = _gather(F.pad(weight, (1, 1, 1, 1)).reshape(C, -1), index)  # (B, C/G, G, 4, k², Ho, Wo)
    inside = inside.to(h.dtype).unsqueeze(1)
    ah, aw = (1 - lh).unsqueeze(1) * inside, (1 - lw).unsqueeze(1)
    bh, bw = lh.unsqueeze(1) * inside, lw.unsqueeze(1)
    kern = ah * aw * val[:, :, :, 0] + ah * bw * val[:, :, :, 1] + bh * aw * val[:, :, :, 2] + bh * bw * val[:, :, :, 3]
    return kern.reshape(h.shape[0], C, *h.shape[2:])


def _local_forward(x, offset, weight, k, s, p, d) -> Tensor:
    """Tap by tap: build the tap's (B, C, Ho, Wo) kernel slice, multiply, accumulate; the whole
    (B, C·k², Ho, Wo) kernel never exists."""
    acc = acc_dtype(x.dtype)
    B, C = x.shape[:2]
    size = offset.shape[-2:]
    xp = padded_input(x, p, acc)
    offset, weight = offset.to(acc), weight.to(acc)
    out = zeros_in_format((B, C, *size), x, acc)
    for t in range(k * k):
        out.addcmul_(tap(xp, t, k, s, d, size), tap_kernel(weight, offset, t, k))
    return out.to(x.dtype)


def _local_backward(grad_out, x, offset, weight, k, s, p, d, need):
    """Gradients (x, offset, weight; None where `need` says so), rebuilding each tap's kernel slice.
    Coordinates and bilinear coefficients live at the offset groups' size (B, G, Ho, Wo) and
    broadcast over channels. With P = grad_out · x_tap: grad_x_tap += grad_out · kernel;
    grad_W_c[corner] += Σ P · coefficient; grad_Δ = Σ_corner ∂coefficient/∂Δ · Σ_{c: c mod G = g} P · W_c[corner].
    """
    need_x, need_off, need_w = need
    acc = acc_dtype(x.dtype)
    B, C, H, W = x.shape
    G, size = offset.shape[1], offset.shape[-2:]
    M, scope = C // G, tuple(weight.shape[-2:])
    go, off, wt = grad_out.to(acc).reshape(B, M, G, *size), offset.to(acc), weight.to(acc)
    planes = wt.reshape(C, -1)
    xp = padded_input(x, p, acc)
    gxp = torch.zeros_like(xp) if need_x else None
    goff = torch.zeros_like(off) if need_off else None
    gw = torch.zeros(B, M, G, planes.shape[1], dtype=acc, device=x.device) if need_w else None
    for t in range(k * k):
        h, w = _tap_coords(off, t, k, scope)
        kern = torch.zeros_like(go) if need_x else None
        prod = go * tap(xp, t, k, s, d, size).view(B, M, G, *size) if need_off or need_w else None
        for index, coef, dch, dcw in scope_corners(h, w, scope):
            val = _gather(planes, index)
            if need_x:
                kern.addcmul_(coef.unsqueeze(1), val)
            if need_off:
                pv = (prod * val).sum(1)
                goff[:, :, t, 0].addcmul_(dch, pv)
                goff[:, :, t, 1].addcmul_(dcw, pv)
            if need_w:
                gw.scatter_add_(3, index.reshape(B, 1, G, size.numel()).expand(-1, M, -1, -1),
                                (prod * coef.unsqueeze(1)).reshape(B, M, G, size.numel()))
        if need_x:
            tap(gxp, t, k, s, d, size).view(B, M, G, *size).addcmul_(go, kern)
    ph, pw = p
    gx = torch.empty_like(x).copy_(gxp[:, :, ph:ph + H, pw:pw + W]) if need_x else None
    return (gx, None if goff is None else goff.to(offset.dtype),
            None if gw is None else gw.sum(0).view_as(weight).to(weight.dtype))


def _native_ok(*tensors: Tensor) -> bool:
    """True when the compiled kernel serves these tensors: CPU, and built (not switched off by DYNCONV_NATIVE=0)."""
    return (native is not None and native.enabled() and all(t.device.type == "cpu" for t in tensors)
            and tensors[0].numel() > 0 and native.DEFORM_KERNEL.load() is not None)


def _to_groups(t: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """(B, C, H, W) → the compiled kernel's contiguous (B, H, W, G, C/G), channel c = m·G + g at [.., c mod G, m]
    (for G = 1 a channels_last tensor is already laid out so, and is not copied)."""
    B, C, H, W = t.shape
    return t.to(dtype).reshape(B, C // groups, groups, H, W).permute(0, 3, 4, 2, 1).contiguous()


def _from_groups(t: Tensor) -> Tensor:
    """The inverse of `_to_groups`, (B, H, W, G, M) → (B, C, H, W) (a view where the strides allow)."""
    B, H, W, G, M = t.shape
    return t.permute(0, 4, 3, 1, 2).reshape(B, G * M, H, W)


def _native_args(x, offset, weight, k, s, p, d):
    """The compiled kernel's inputs: x in `_to_groups` layout, contiguous offsets, the scope planes bordered
    with zeros as (G, (S_h+2)·(S_w+2), C/G), all in float32 (float64 for float64), and the geometry."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    G, (C, sh, sw) = offset.shape[1], weight.shape
    wt = F.pad(weight.to(cdt), (1, 1, 1, 1)).reshape(C // G, G, -1).permute(1, 2, 0).contiguous()
    return _to_groups(x, G, cdt), offset.to(cdt).contiguous(), wt, (k, *s, *p, *d, sh, sw)


def _native_forward(x, offset, weight, k, s, p, d) -> Tensor:
    xw, off, wt, geom = _native_args(x, offset, weight, k, s, p, d)
    out = native.DEFORM_KERNEL.module.forward(xw, off, wt, *geom)
    return laid_out(_from_groups(out).to(x.dtype), _memory_format(x))


def _native_backward(grad_out, x, offset, weight, k, s, p, d, need):
    """Gradients by the compiled kernel, each in its input's dtype and strides (None where `need` says so)."""
    xw, off, wt, geom = _native_args(x, offset, weight, k, s, p, d)
    go = _to_groups(grad_out, offset.shape[1], xw.dtype)
    gx, goff, gwt = native.DEFORM_KERNEL.module.backward(go, xw, off, wt, *geom)
    C, sh, sw = weight.shape
    gw = gwt.view(gwt.shape[0], sh + 2, sw + 2, -1)[:, 1:-1, 1:-1].permute(3, 0, 1, 2).reshape(C, sh, sw)
    grads = (_from_groups(gx), goff, gw)
    return tuple(as_input(g, t) if n else None for t, g, n in zip((x, offset, weight), grads, need))


@torch.library.custom_op("dynconv::deform_kernel_local", mutates_args=())
def _local_op(x: Tensor, offset: Tensor, weight: Tensor, kernel_size: int, stride: list[int], padding: list[int],
              dilation: list[int]) -> Tensor:
    """The fast local DK aggregation: the compiled kernel for CPU tensors, else the tap loop (`_local_forward`)."""
    geom = (kernel_size, tuple(stride), tuple(padding), tuple(dilation))
    if _native_ok(x, offset, weight):
        return _native_forward(x, offset, weight, *geom)
    return laid_out(_local_forward(x, offset, weight, *geom), _memory_format(x))


@torch.library.custom_op("dynconv::deform_kernel_local_backward", mutates_args=())
def _local_backward_op(grad_out: Tensor, x: Tensor, offset: Tensor, weight: Tensor, kernel_size: int,
                       stride: list[int], padding: list[int], dilation: list[int],
                       need: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for x, offset and weight, on the forward's implementation; an empty tensor where `need` is False."""
    geom = (kernel_size, tuple(stride), tuple(padding), tuple(dilation))
    if _native_ok(x, offset, weight):
        return absent(_native_backward(grad_out, x, offset, weight, *geom, need), x)
    grads = _local_backward(grad_out, x, offset, weight, *geom, need)
    return absent([None if g is None else as_input(g, t) for g, t in zip(grads, (x, offset, weight))], x)


@_local_op.register_fake
def _(x, offset, weight, kernel_size, stride, padding, dilation):
    return empty_out((*x.shape[:2], *offset.shape[-2:]), x)


@_local_backward_op.register_fake
def _(grad_out, x, offset, weight, kernel_size, stride, padding, dilation, need):
    return absent((torch.empty_like(t) if n else None for t, n in zip((x, offset, weight), need)), x)


register_autograd(_local_op, torch.ops.dynconv.deform_kernel_local_backward)


def _check_local(x: Tensor, offset: Tensor, weight: Tensor, k: int, s, p, d) -> None:
    for name, t, dim in (("x", x, 4), ("offset", offset, 6), ("weight", weight, 3)):
        if t.dim() != dim or not t.is_floating_point():
            raise ValueError(f"deform_kernel_local: {name} must be a {dim}-d floating-point tensor, "
                             f"got shape {tuple(t.shape)} of {t.dtype}")
    if not x.device == offset.device == weight.device:
        raise ValueError(f"deform_kernel_local: x, offset and weight must be on one device, got {x.device}, "
                         f"{offset.device} and {weight.device}; move them with .to(device)")
    B, C = x.shape[:2]
    ho, wo = conv_out_hw(x.shape[2:], k, s, p, d)
    G = offset.shape[1]
    if G < 1 or C % G:
        raise ValueError(f"deform_kernel_local: offset groups {G} must divide the {C} channels")
    if tuple(offset.shape) != (B, G, k * k, 2, ho, wo):
        raise ValueError(f"deform_kernel_local: offset must be (B, G, k², 2, Ho, Wo) = {(B, G, k * k, 2, ho, wo)} "
                         f"for x {tuple(x.shape)} and this geometry, got {tuple(offset.shape)}")
    if weight.shape[0] != C or min(weight.shape[1:]) < 1:
        raise ValueError(f"deform_kernel_local: weight must be the scope planes (C={C}, S_h, S_w), "
                         f"got {tuple(weight.shape)}")


def deform_kernel_local(x: Tensor, offset: Tensor, weight: Tensor, *, kernel_size: int, stride=1, padding=None,
                        dilation=1, backend: str | None = None) -> Tensor:
    """Local DK aggregation: x (B, C, H, W), offset (B, G, k², 2, Ho, Wo) as (Δh, Δw), weight (C, S_h, S_w).
    Under autocast, x and weight take the autocast dtype and the offsets stay (at least) float32.

    "reference" materialises the resampled (B, C, k², Ho, Wo) kernel (`resampled_kernel`) and calls
    `pixel_filter`'s reference; "export" resamples and applies one tap at a time (`shifted_taps`); "fast" is the
    custom op `torch.ops.dynconv.deform_kernel_local`.
    """
    k, s, d = int(kernel_size), _pair(stride), _pair(dilation)
    p = resolve_padding(k, padding, d)
    _check_local(x, offset, weight, k, s, p, d)
    if torch.is_autocast_enabled(x.device.type):  # sample at float32 coordinates, as torchvision's deform_conv2d
        offset = offset.to(torch.promote_types(offset.dtype, torch.float32))
        x, weight = common_dtype(x, weight)
    else:
        x, offset, weight = common_dtype(x, offset, weight)
    mode = resolve(backend)
    if mode == "reference":
        kernel = resampled_kernel(weight, offset, k)
        return pixel_filter(x, kernel, kernel_size=k, stride=s, padding=p, dilation=d, backend="reference")
    if mode == "export":  # one tap's kernel at a time, (B, C, Ho, Wo), by one gather of its four corners
        return shifted_taps(x, lambda t: resampled_kernel(weight, offset[:, :, t:t + 1], k, t).view(
            x.shape[0], 1, x.shape[1], *offset.shape[-2:]), k, s, p, d, tuple(offset.shape[-2:]))
    op = torch.ops.dynconv.deform_kernel_local
    if triton_deform_kernel.available(x, offset, weight):
        op = torch.ops.dynconv.deform_kernel_local_triton  # CUDA (or the opted-in interpreter)
    with autocast_off(x.device.type):
        return op(x, offset, weight, k, list(s), list(p), list(d))
