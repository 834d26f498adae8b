"""`pixel_filter`: per-pixel (translation-variant) filtering, the aggregation of involution, DDF,
TVConv and local Deformable Kernels.

    out[b,c,i,j] = Σ_k F[b,c,k,i,j] · x[b, c, i·s − p + kh·d, j·s − p + kw·d]      k = kh·K + kw

with zero padding, `F = spatial[b', g(c), k, i, j]` (b' = b, or 0 when the filter is shared by the
batch as in TVConv) and channels in contiguous groups `g(c) = c // (C // G)` as in involution
(Li et al. 2021, Eq. 4). An optional channel filter `A[b, c, k]` (DDF, Zhou et al. 2021, Eq. 5)
is combined first: `F = A · S` ("mul") or `F = A + S` ("add").

Backends: "reference" unfolds the input with plain PyTorch ops (obviously correct, the tests'
oracle); "export" (what `dynconv.export` traces) sums the taps as strided slices of the padded input,
out of place, so ONNX Runtime never builds the unfolded (B, C·K², Ho, Wo) input;
"fast" is the custom op `torch.ops.dynconv.pixel_filter`
(with `dynconv::pixel_filter_backward`, a fake kernel each and registered autograd, so
`torch.compile(fullgraph=True)` traces through it). It never holds a (B, C·K², Ho, Wo) tensor and
runs the compiled CPU kernel (`native`) for CPU tensors, the Triton kernels (`triton_pixel_filter`)
for CUDA tensors where they are available, else the PyTorch tap loop with a hand-derived backward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from . import triton_pixel_filter
from .backend import resolve
from .library import absent, as_input, laid_out, register_autograd
from .geometry import conv_out_hw, resolve_padding

try:
    from . import native
except ImportError:
    native = None

COMBINES = ("mul", "add")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types accumulate in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def empty_out(shape, x: Tensor) -> Tensor:
    """An uninitialised output of `shape` in x's dtype, device and memory format: the fake kernels' promise,
    which the real ones keep with `library.laid_out`."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


def zeros_in_format(shape, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero tensor in `like`'s memory format (torch.zeros takes no memory_format)."""
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=_memory_format(like)).zero_()


def padded_input(x: Tensor, padding: tuple[int, int], dtype: torch.dtype | None = None) -> Tensor:
    """`x` zero-padded by `padding` on each side, in `dtype`, keeping x's memory format."""
    dtype = dtype or x.dtype
    ph, pw = padding
    if ph == pw == 0 and dtype == x.dtype:
        return x
    B, C, H, W = x.shape
    xp = zeros_in_format((B, C, H + 2 * ph, W + 2 * pw), x, dtype)
    xp[:, :, ph:ph + H, pw:pw + W] = x
    return xp


def tap(xp: Tensor, k: int, kernel_size: int, stride, dilation, out_size) -> Tensor:
    """The (..., Ho, Wo) strided view of padded input `xp` (..., H, W) that tap k = kh·K + kw reads."""
    kh, kw = divmod(k, kernel_size)
    (sh, sw), (dh, dw), (ho, wo) = stride, dilation, out_size
    return xp[..., kh * dh: kh * dh + (ho - 1) * sh + 1: sh, kw * dw: kw * dw + (wo - 1) * sw + 1: sw]


def common_dtype(*tensors: Tensor | None) -> list[Tensor | None]:
    """Cast `tensors` (None passes through) to one dtype: autocast's when it is on (the primitives
    are conv-like), else their promoted dtype."""
    present = [t for t in tensors if t is not None]
    dev = present[0].device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = present[0].dtype
        for t in present[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return [None if t is None else t.to(dtype) for t in tensors]


def autocast_off(device_type: str):
    """A context that turns autocast off while it is on (the inputs are already cast: the ops run without it), and
    does nothing otherwise, so that a traced graph (torch.export, ONNX) holds no autocast region."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _check(x, spatial, channel, K, s, p, d, combine) -> None:
    if x.dim() != 4:
        raise ValueError(f"pixel_filter: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if spatial.dim() != 5:
        raise ValueError(f"pixel_filter: spatial must be (B or 1, G, K*K, Ho, Wo), got shape {tuple(spatial.shape)}")
    B, C, H, W = x.shape
    Bs, G, KK, Ho, Wo = spatial.shape
    if Bs not in (1, B):
        raise ValueError(f"pixel_filter: spatial batch {Bs} must be 1 (shared) or the input batch {B}")
    if G < 1 or C % G:
        raise ValueError(f"pixel_filter: spatial groups G={G} must divide the {C} input channels")
    if KK != K * K:
        raise ValueError(f"pixel_filter: spatial has {KK} taps but kernel_size={K} needs {K * K}")
    expected = conv_out_hw((H, W), K, s, p, d)
    if min(expected) < 1:
        raise ValueError(f"pixel_filter: input {H}x{W} is too small for kernel_size={K}, dilation={d}, padding={p}")
    if (Ho, Wo) != expected:
        raise ValueError(
            f"pixel_filter: spatial filter is {Ho}x{Wo} but a {H}x{W} input with kernel_size={K}, stride={s}, "
            f"padding={p}, dilation={d} gives an output of {expected[0]}x{expected[1]}; make the filter that size"
        )
    if channel is not None and tuple(channel.shape) != (B, C, KK):
        raise ValueError(f"pixel_filter: channel must be (B, C, K*K) = {(B, C, KK)}, got {tuple(channel.shape)}")
    if combine not in COMBINES:
        raise ValueError(f"pixel_filter: combine must be one of {COMBINES}, got {combine!r}")


def _reference(x, spatial, channel, K, s, p, d, combine) -> Tensor:
    B, C = x.shape[:2]
    _, G, KK, Ho, Wo = spatial.shape
    cols = F.unfold(x, K, dilation=d, padding=p, stride=s).view(B, G, C // G, KK, Ho, Wo)
    filt = spatial.unsqueeze(2)
    if channel is not None:
        a = channel.view(B, G, C // G, KK, 1, 1)
        filt = filt * a if combine == "mul" else filt + a
    return (cols * filt).sum(3).view(B, C, Ho, Wo)


def shifted_taps(x: Tensor, tap_filter, K: int, s, p, d, out_size, groups: int = 1) -> Tensor:
    """The export decomposition: out = Σ_k x_tap_k · tap_filter(k), each tap a strided slice of the zero-padded
    input viewed (B, G, C/G, H, W) and its filter broadcastable to (B, G, C/G, Ho, Wo), summed out of place
    (torch.export and ONNX reject in-place ops). Every temporary is (B, C, Ho, Wo)-sized: an unfold would be
    K² times that. Per tap the ONNX graph holds two slices, a multiply and an add."""
    B, C = x.shape[:2]
    xp = F.pad(x, (p[1], p[1], p[0], p[0]))
    xp = xp.view(B, groups, C // groups, *xp.shape[-2:])
    out = None
    for k in range(K * K):
        term = tap(xp, k, K, s, d, out_size) * tap_filter(k)
        out = term if out is None else out + term
    return out.view(B, C, *out_size)


def _shifted(x, spatial, channel, K, s, p, d, combine) -> Tensor:
    """`pixel_filter` as `shifted_taps`, each tap's filter combined as the reference combines it."""
    B, C = x.shape[:2]
    _, G, KK, Ho, Wo = spatial.shape
    a = None if channel is None else channel.view(B, G, C // G, KK, 1)

    def tap_filter(k):
        filt = spatial[:, :, k:k + 1]
        if a is None:
            return filt
        return filt * a[:, :, :, k:k + 1] if combine == "mul" else filt + a[:, :, :, k:k + 1]

    return shifted_taps(x, tap_filter, K, s, p, d, (Ho, Wo), G)


def _taps_forward(x, spatial, channel, K, s, p, d, combine) -> Tensor:
    """The fast path in plain PyTorch: tap by tap, every temporary at most (B, C, Ho, Wo)."""
    acc = acc_dtype(x.dtype)
    B, C = x.shape[:2]
    _, G, KK, Ho, Wo = spatial.shape
    xp = padded_input(x, p, acc)
    out = zeros_in_format((B, C, Ho, Wo), x, acc)
    out_g = out.view(B, G, C // G, Ho, Wo)
    ch = None if channel is None else channel.to(acc).view(B, G, C // G, KK)
    buf = torch.empty_like(out_g) if combine == "mul" and ch is not None else None
    for k in range(KK):
        xt = tap(xp, k, K, s, d, (Ho, Wo)).view(B, G, C // G, Ho, Wo)
        sk = spatial[:, :, k].to(acc).unsqueeze(2)
        if ch is None:
            out_g.addcmul_(xt, sk)
        elif combine == "add":
            out_g.addcmul_(xt, sk).addcmul_(xt, ch[..., k, None, None])
        else:
            out_g.addcmul_(torch.mul(xt, ch[..., k, None, None], out=buf), sk)
    return out.to(x.dtype)


def _taps_backward(grad_out, x, spatial, channel, K, s, p, d, combine, need):
    """Gradients (x, spatial, channel; None where `need` says so) tap by tap. With P_k = grad_out · x_tap_k:
      grad_x_tap_k   += grad_out · F_k                        (scatter-add into a padded buffer)
      grad_spatial_k  = Σ_{c∈g} P_k · A_k  ("mul"), Σ_{c∈g} P_k  (otherwise; also Σ_b when shared)
      grad_channel_k  = Σ_{i,j} P_k · S_k  ("mul"), Σ_{i,j} P_k  ("add")
    """
    need_x, need_s, need_c = need
    acc = acc_dtype(x.dtype)
    B, C, H, W = x.shape
    Bs, G, KK, Ho, Wo = spatial.shape
    go = grad_out.to(acc).view(B, G, C // G, Ho, Wo)
    ch = None if channel is None else channel.to(acc).view(B, G, C // G, KK)
    mul = combine == "mul" and ch is not None
    xp = padded_input(x, p, acc) if need_s or need_c else None
    (ph, pw) = p
    gxp = zeros_in_format((B, C, H + 2 * ph, W + 2 * pw), x, acc) if need_x else None
    gs = torch.empty(spatial.shape, dtype=acc, device=x.device) if need_s else None
    gc = torch.empty(B, G, C // G, KK, dtype=acc, device=x.device) if need_c else None
    buf = torch.empty_like(go)
    for k in range(KK):
        sk = spatial[:, :, k].to(acc)
        if need_s or need_c:
            prod = torch.mul(go, tap(xp, k, K, s, d, (Ho, Wo)).view(B, G, C // G, Ho, Wo), out=buf)
            if need_s:
                gsk = torch.einsum("bgchw,bgc->bghw", prod, ch[..., k]) if mul else prod.sum(2)
                gs[:, :, k] = gsk.sum(0, keepdim=True) if Bs != B else gsk
            if need_c:
                gc[..., k] = torch.einsum("bgchw,bghw->bgc", prod, sk) if mul else prod.sum((-2, -1))
        if need_x:
            gxt = tap(gxp, k, K, s, d, (Ho, Wo)).view(B, G, C // G, Ho, Wo)
            if ch is None:
                gxt.addcmul_(go, sk.unsqueeze(2))
            elif combine == "add":
                gxt.addcmul_(go, sk.unsqueeze(2)).addcmul_(go, ch[..., k, None, None])
            else:
                gxt.addcmul_(torch.mul(go, ch[..., k, None, None], out=buf), sk.unsqueeze(2))
    gx = torch.empty_like(x).copy_(gxp[:, :, ph:ph + H, pw:pw + W]) if need_x else None
    return (gx, None if gs is None else gs.to(spatial.dtype),
            None if gc is None else gc.view(B, C, KK).to(channel.dtype))


def _native_ok(x, spatial, channel, s, p, d) -> bool:
    square = s[0] == s[1] and p[0] == p[1] and d[0] == d[1]  # the compiled kernel takes int geometry
    # an empty batch takes the tap loop, which needs no work split over the batch
    return native is not None and square and x.numel() > 0 and native.available(x, spatial, channel)


@torch.library.custom_op("dynconv::pixel_filter", mutates_args=())
def _pixel_filter_op(x: Tensor, spatial: Tensor, channel: Tensor | None, kernel_size: int, stride: list[int],
                     padding: list[int], dilation: list[int], combine: str) -> Tensor:
    """The fast forward: the compiled CPU kernel where it serves the inputs, else the PyTorch tap loop."""
    K, s, p, d = kernel_size, tuple(stride), tuple(padding), tuple(dilation)
    if _native_ok(x, spatial, channel, s, p, d):
        with torch.no_grad():  # its direct entry point carries its own autograd; the op's is registered
            out = native.pixel_filter(x, spatial, channel, kernel_size=K, stride=s[0], padding=p[0],
                                      dilation=d[0], combine=combine)
    else:
        out = _taps_forward(x, spatial, channel, K, s, p, d, combine)
    return laid_out(out, _memory_format(x))


@torch.library.custom_op("dynconv::pixel_filter_backward", mutates_args=())
def _pixel_filter_backward_op(grad_out: Tensor, x: Tensor, spatial: Tensor, channel: Tensor | None,
                              kernel_size: int, stride: list[int], padding: list[int], dilation: list[int],
                              combine: str, need: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for x, spatial and channel on the forward's implementation (`library.absent` where
    `need` is False)."""
    K, s, p, d = kernel_size, tuple(stride), tuple(padding), tuple(dilation)
    need = (need[0], need[1], need[2] and channel is not None)
    if _native_ok(x, spatial, channel, s, p, d):
        grads = native.backward(grad_out, x, spatial, channel, K, s[0], p[0], d[0], combine, need)
    else:
        grads = _taps_backward(grad_out, x, spatial, channel, K, s, p, d, combine, need)
    return absent([None if g is None else as_input(g, t) for g, t in zip(grads, (x, spatial, channel))], x)


@_pixel_filter_op.register_fake
def _(x, spatial, channel, kernel_size, stride, padding, dilation, combine):
    return empty_out((*x.shape[:2], *spatial.shape[-2:]), x)


@_pixel_filter_backward_op.register_fake
def _(grad_out, x, spatial, channel, kernel_size, stride, padding, dilation, combine, need):
    need = (need[0], need[1], need[2] and channel is not None)
    return absent([torch.empty_like(t) if n else None for t, n in zip((x, spatial, channel), need)], x)


register_autograd(_pixel_filter_op, torch.ops.dynconv.pixel_filter_backward)


def pixel_filter(x: Tensor, spatial: Tensor, channel: Tensor | None = None, *, kernel_size: int, stride=1,
                 padding=None, dilation=1, combine: str = "mul", backend: str | None = None) -> Tensor:
    """Apply per-pixel filters (module docstring) to `x`.

    x: (B, C, H, W). spatial: (B or 1, G, K*K, Ho, Wo), G dividing C, taps ordered (kh, kw).
    channel: None or (B, C, K*K). padding None means d·(K−1)//2. (Ho, Wo) follow the conv formula.
    Under `torch.autocast` the inputs are cast to the autocast dtype (sums still run in float32).
    """
    K = int(kernel_size)
    s, d = _pair(stride), _pair(dilation)
    p = resolve_padding(K, padding, d)
    _check(x, spatial, channel, K, s, p, d, combine)
    x, spatial, channel = common_dtype(x, spatial, channel)
    with autocast_off(x.device.type):
        mode = resolve(backend)
        if mode != "fast":
            return (_reference if mode == "reference" else _shifted)(x, spatial, channel, K, s, p, d, combine)
        op = torch.ops.dynconv.pixel_filter
        if triton_pixel_filter.available(x, spatial, channel):  # CUDA (or the opted-in interpreter)
            op = torch.ops.dynconv.pixel_filter_triton
        return op(x, spatial, channel, K, list(s), list(p), list(d), combine)
