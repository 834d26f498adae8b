"""Compiled CUDA path for `pixel_filter`: Triton kernels with a hand-derived backward.

    out[b,c,i,j] = Σ_k F[b,c,k,i,j] · x[b, c, i·sh − ph + kh·dh, j·sw − pw + kw·dw]      k = kh·K + kw

with F = S[b', g(c), k, i, j], times or plus A[b,c,k] (involution Eq. 4,
DDF Eq. 5). The forward, grad_x and grad_S kernels hold a (planes × pixels) tile: up to 16 of the
(sample, channel) planes that one filter serves (the channels of a group, and the batch too when the
filter is shared) × a block of pixels, and loop over the taps, so each filter row is read once for
the whole tile and the sum over taps stays in registers (measured on an H100 in docs/BENCHMARKS.md).
Zero padding is a load mask, nothing is padded or unfolded, sums run in float32 (float64 for
float64 inputs) and are stored in the input dtype; offsets within one sample are 32-bit (grad_S's
buffer of partial sums, which can be larger, is addressed in 64 bits). Tensors
are addressed through their strides, so channels_last and expanded (stride-0) tensors need no
copy; a filter shared by the batch is read with batch stride 0.

Backward, with P_k = grad_out · x_tap_k, three kernels, none with atomics (deterministic):
  grad_x[b,c,y,z]   = Σ_k grad_out[b,c,i,j] · F_k[i,j]   over the taps k whose output (i, j) read
                      (y, z): i = (y + ph − kh·dh) / sh when that is a whole number in [0, Ho)
                      (a gather over input pixels, instead of the scatter-add of `_PixelFilter`);
  grad_S[b',g,k,i,j] = Σ_{c∈g} P_k · A_k ("mul") or Σ_{c∈g} P_k, also Σ_b when S is shared
                      (one partial sum per chunk of planes, added by the caller when there are several);
  grad_A[b,c,k]     = Σ_{i,j} P_k · S_k ("mul") or Σ_{i,j} P_k ("add").

`available(...)` is true for CUDA tensors when triton imports, and on CPU only when Triton's
interpreter is on (`TRITON_INTERPRET=1`, read by triton when it is imported) and the opt-in
`DYNCONV_TRITON_INTERPRET=1` is set, which is how the tests run these kernels without a GPU.
`DYNCONV_TRITON=0` switches the path off (read at every call).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor
from torch.library import wrap_triton

from .library import absent, register_autograd

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MODE = {None: 0, "mul": 1, "add": 2}
_TILE = 4096  # taps × pixels of grad_channel's tile (16×256 for K=3, 64×64 for K=7)
# planes × pixels of the other kernels' tiles (16×128) and their warps: about 16 elements and 160
# registers per thread (ptxas, sm_90), so three programs fit an SM
_PLANE_TILE, _PLANE_WARPS = 2048, 4
# Planes ((sample, channel) pairs sharing one filter) in one program's tile: a power of two, at most this.
_CHANNELS_PER_PROGRAM = int(os.environ.get("DYNCONV_TRITON_CPB", "16"))

# Programs of a weight-gradient kernel of the fused ops (about four per SM of an H100): see `reduction_splits`.
_REDUCTION_PROGRAMS = 512

# Triton decides at decoration time whether a kernel is compiled or interpreted.
_INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)


def enabled() -> bool:
    """False when the environment says `DYNCONV_TRITON=0` (or `false`/`off`/`no`)."""
    return os.environ.get("DYNCONV_TRITON", "1").strip().lower() not in ("0", "false", "off", "no")


def interpreter_opted_in() -> bool:
    """CPU tensors run the kernels only under Triton's interpreter and the explicit opt-in."""
    return _INTERPRETED and os.environ.get("DYNCONV_TRITON_INTERPRET", "0").strip() == "1"


def launchable(tensors, sampled) -> bool:
    """True when a Triton kernel here can take `tensors` (None skipped): triton present and enabled, one floating
    dtype and one device, that device CUDA (or CPU under the interpreter opt-in), and each of the `sampled` tensors
    (those addressed per sample) non-empty with one sample's offsets within 32 bits."""
    x = tensors[0]  # the device first: a CPU tensor outside the interpreter leaves at once
    on_device = x.device.type == "cuda" or (x.device.type == "cpu" and interpreter_opted_in())
    if triton is None or not on_device or not enabled():
        return False
    if any(t is not None and (t.dtype != x.dtype or t.device != x.device) for t in tensors) or x.dtype not in DTYPES:
        return False
    if any(t.numel() == 0 for t in sampled):  # nothing to launch; the PyTorch path handles empty batches
        return False
    if max(t[0].numel() for t in sampled) >= 2**31:  # offsets within one sample are 32-bit
        return False
    return True


def available(x: Tensor, spatial: Tensor, channel: Tensor | None = None) -> bool:
    """True when these kernels can serve the inputs (`launchable`). Any stride/padding/dilation pairs are
    supported."""
    return launchable((x, spatial, channel), (x, spatial))


if triton is not None:

    @triton.jit
    def _program(n_pixels, G, NCB, BLOCK: tl.constexpr):
        """This program's (b', g, chunk, pixel offsets): the grid is B'·G·NCB·⌈n_pixels / BLOCK⌉ programs
        (B' the filter's batch, 1 when shared), pixel blocks fastest."""
        pid = tl.program_id(0)
        nblk = tl.cdiv(n_pixels, BLOCK)
        rest = pid // nblk
        bg = rest // NCB
        return (bg // G).to(tl.int64), bg % G, rest % NCB, (pid % nblk) * BLOCK + tl.arange(0, BLOCK)

    @triton.jit
    def _rows(bs, g, cb, CG, NB, CPB: tl.constexpr):
        """The tile's rows: chunk `cb` of the NB·CG (sample, channel) planes that filter (b', g) serves
        (NB = B when the filter is shared by the batch, else 1): their b, c and whether they exist."""
        n = cb * CPB + tl.arange(0, CPB)
        return bs + (n // CG).to(tl.int64), (g * CG + n % CG).to(tl.int64), n < NB * CG

    @triton.jit
    def _tap_offsets(i, j, pm, k, H, W, ph, pw, sh_, sw_,
                     K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
        """Offsets (within one plane, strides sh_, sw_) and mask of x[i·sh − ph + kh·dh, j·sw − pw + kw·dw]
        for tap(s) k and output pixels (i, j)."""
        y = i * SH - ph + (k // K) * DH
        z = j * SW - pw + (k % K) * DW
        return y * sh_ + z * sw_, pm & (k < K * K) & (y >= 0) & (y < H) & (z >= 0) & (z < W)

    @triton.jit
    def _fma(acc, v, f, a_ptr, arow, k, sak, rv, MODE: tl.constexpr, ACC: tl.constexpr):
        """acc + v · F for tap k, with the (planes × pixels) filter F = S (pixels) alone, or times or plus
        A[b, c, k] (planes). Positions outside the image need no mask: v is zero there."""
        if MODE == 0:
            acc += v * f[None, :]
        else:
            a = tl.load(a_ptr + arow + k * sak, mask=rv, other=0.0).to(ACC)[:, None]
            if MODE == 1:
                acc += v * (f[None, :] * a)
            else:
                acc += v * (f[None, :] + a)
        return acc

    @triton.jit
    def _forward_kernel(x_ptr, s_ptr, a_ptr, o_ptr, G, CG, NB, NCB, H, W, Ho, Wo, ph, pw,
                        sxb, sxc, sxh, sxw, ssb, ssg, ssk, ssh, ssw, sab, sac, sak, sob, soc, soh, sow,
                        K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                        DW: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr, CPB: tl.constexpr,
                        ACC: tl.constexpr):
        """A (planes × pixels) tile of planes that share one filter: per tap, one filter row is read and
        used by every plane; the sum over taps stays in registers (no reduction across threads)."""
        bs, g, cb, offs = _program(Ho * Wo, G, NCB, BLOCK)
        b, c, rv = _rows(bs, g, cb, CG, NB, CPB)
        pm = offs < Ho * Wo
        i, j = offs // Wo, offs % Wo
        xrow, arow = (b * sxb + c * sxc)[:, None], b * sab + c * sac
        s_base = s_ptr + bs * ssb + g * ssg + i * ssh + j * ssw
        acc = tl.zeros((CPB, BLOCK), dtype=ACC)
        for k in range(K * K):
            xoff, m = _tap_offsets(i, j, pm, k, H, W, ph, pw, sxh, sxw, K, SH, SW, DH, DW)
            f = tl.load(s_base + k * ssk, mask=pm, other=0.0).to(ACC)
            xv = tl.load(x_ptr + xrow + xoff[None, :], mask=rv[:, None] & m[None, :], other=0.0).to(ACC)
            acc = _fma(acc, xv, f, a_ptr, arow, k, sak, rv, MODE, ACC)
        tl.store(o_ptr + (b * sob + c * soc)[:, None] + (i * soh + j * sow)[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=rv[:, None] & pm[None, :])

    @triton.jit
    def _grad_x_kernel(go_ptr, s_ptr, a_ptr, gx_ptr, G, CG, NB, NCB, H, W, Ho, Wo, ph, pw,
                       sgb, sgc, sgh, sgw, ssb, ssg, ssk, ssh, ssw, sab, sac, sak, sxb, sxc, sxh, sxw,
                       K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                       DW: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr, CPB: tl.constexpr,
                       ACC: tl.constexpr):
        """As the forward, over input pixels (y, z): tap k was read by output (i, j) with
        i = (y + ph − kh·dh) / sh when that is a whole number in [0, Ho) (likewise j)."""
        bs, g, cb, offs = _program(H * W, G, NCB, BLOCK)
        b, c, rv = _rows(bs, g, cb, CG, NB, CPB)
        pm = offs < H * W
        y, z = offs // W, offs % W
        gorow, arow = (b * sgb + c * sgc)[:, None], b * sab + c * sac
        s_base = s_ptr + bs * ssb + g * ssg
        acc = tl.zeros((CPB, BLOCK), dtype=ACC)
        for k in range(K * K):
            # clamped before dividing so negative numerators never meet the division (masked anyway)
            th = y + ph - (k // K) * DH
            tw = z + pw - (k % K) * DW
            i, j = tl.maximum(th, 0) // SH, tl.maximum(tw, 0) // SW
            m = pm & (th >= 0) & (tw >= 0) & (th % SH == 0) & (tw % SW == 0) & (i < Ho) & (j < Wo)
            f = tl.load(s_base + k * ssk + i * ssh + j * ssw, mask=m, other=0.0).to(ACC)
            go = tl.load(go_ptr + gorow + (i * sgh + j * sgw)[None, :], mask=rv[:, None] & m[None, :],
                         other=0.0).to(ACC)
            acc = _fma(acc, go, f, a_ptr, arow, k, sak, rv, MODE, ACC)
        tl.store(gx_ptr + (b * sxb + c * sxc)[:, None] + (y * sxh + z * sxw)[None, :],
                 acc.to(gx_ptr.dtype.element_ty), mask=rv[:, None] & pm[None, :])

    @triton.jit
    def _grad_spatial_kernel(x_ptr, go_ptr, a_ptr, gs_ptr, G, CG, NB, NCB, H, W, Ho, Wo, ph, pw,
                             sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sab, sac, sak,
                             srb, srg, srn, srk, srh, srw,
                             K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                             DW: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
                             CPB: tl.constexpr, ACC: tl.constexpr):
        """Per tap, Σ over the tile's planes of grad_out · x_tap (· A): a partial sum (b', g, chunk, k,
        i, j) per chunk, which the caller adds over chunks when there are several; no two programs
        write one element and no atomics are needed."""
        bs, g, cb, offs = _program(Ho * Wo, G, NCB, BLOCK)
        b, c, rv = _rows(bs, g, cb, CG, NB, CPB)
        pm = offs < Ho * Wo
        i, j = offs // Wo, offs % Wo
        xrow, arow = (b * sxb + c * sxc)[:, None], b * sab + c * sac
        rm = rv[:, None] & pm[None, :]
        go = tl.load(go_ptr + (b * sgb + c * sgc)[:, None] + (i * sgh + j * sgw)[None, :], mask=rm,
                     other=0.0).to(ACC)
        out = gs_ptr + _chunk_offset(bs, g, cb, srb, srg, srn) + i * srh + j * srw
        for k in range(K * K):
            xoff, m = _tap_offsets(i, j, pm, k, H, W, ph, pw, sxh, sxw, K, SH, SW, DH, DW)
            p = go * tl.load(x_ptr + xrow + xoff[None, :], mask=rv[:, None] & m[None, :], other=0.0).to(ACC)
            if MODE == 1:
                p = p * tl.load(a_ptr + arow + k * sak, mask=rv, other=0.0).to(ACC)[:, None]
            tl.store(out + k * srk, tl.sum(p, axis=0).to(gs_ptr.dtype.element_ty), mask=pm)

    @triton.jit
    def _chunk_offset(bs, g, cb, srb, srg, srn):
        """Offset of filter (b', g)'s partial sum for chunk cb in grad_spatial's buffer, in 64 bits: the buffer
        holds NCB partials of the filter, and for a filter shared by the batch (NCB = ⌈B·C/G / CPB⌉) it passes
        2³¹ elements at large batch × channels × size while each stride stays below it."""
        return bs * srb + g.to(tl.int64) * srg + cb.to(tl.int64) * srn

    @triton.jit
    def _grad_channel_kernel(x_ptr, go_ptr, s_ptr, ga_ptr, C, CG, H, W, Ho, Wo, ph, pw,
                             sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, ssb, ssg, ssk, ssh, ssw,
                             srb, src, srk,
                             K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                             DW: tl.constexpr, MODE: tl.constexpr, KKP: tl.constexpr,
                             BLOCK: tl.constexpr, ACC: tl.constexpr):
        """One (b, c) per program, looping over all output pixels: a per-(b, c, k) reduction."""
        bc = tl.program_id(0).to(tl.int64)
        b, c = bc // C, bc % C
        g = c // CG
        k = tl.arange(0, KKP)[:, None]
        x_base, go_base, s_base = x_ptr + b * sxb + c * sxc, go_ptr + b * sgb + c * sgc, s_ptr + b * ssb + g * ssg
        acc = tl.zeros((KKP, BLOCK), dtype=ACC)
        for start in range(0, Ho * Wo, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            pm = (offs < Ho * Wo)[None, :]
            i, j = (offs // Wo)[None, :], (offs % Wo)[None, :]
            xoff, m = _tap_offsets(i, j, pm, k, H, W, ph, pw, sxh, sxw, K, SH, SW, DH, DW)
            p = tl.load(x_base + xoff, mask=m, other=0.0).to(ACC)
            p = p * tl.load(go_base + i * sgh + j * sgw, mask=pm, other=0.0).to(ACC)
            if MODE == 1:
                p = p * tl.load(s_base + k * ssk + i * ssh + j * ssw, mask=pm & (k < K * K), other=0.0).to(ACC)
            acc += p
        kk = tl.arange(0, KKP)
        tl.store(ga_ptr + b * srb + c * src + kk * srk, tl.sum(acc, axis=1).to(ga_ptr.dtype.element_ty),
                 mask=kk < K * K)


def _empty(like: Tensor, shape, dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor in `like`'s memory format (channels_last stays channels_last)."""
    last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    fmt = torch.channels_last if last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)


def _device(t: Tensor):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def forward(x: Tensor, spatial: Tensor, channel: Tensor | None, K: int, s, p, d, combine: str) -> Tensor:
    """The forward kernel (x, spatial and channel of one dtype and device; geometry as pairs)."""
    B, C, H, W = x.shape
    G, Ho, Wo = spatial.shape[1], *spatial.shape[-2:]
    out = _empty(x, (B, C, Ho, Wo), x.dtype)
    sb = _batched(spatial, B)
    grid, meta = _launch(x, spatial, channel, K, s, d, combine, Ho * Wo)
    with _device(x):
        wrap_triton(_forward_kernel)[grid](
            x, sb, _or(channel, x), out, G, C // G, *meta.pop("NB_NCB"), H, W, Ho, Wo, *p,
            *x.stride(), *sb.stride(), *_strides(channel, 3), *out.stride(), **meta)
    return out


def backward(grad_out: Tensor, x: Tensor, spatial: Tensor, channel: Tensor | None, K: int, s, p, d,
             combine: str, need) -> tuple:
    """The three gradient kernels of the module docstring; None for the gradients `need` leaves out."""
    need_x, need_s, need_c = need
    B, C, H, W = x.shape
    Bs, G, KK, Ho, Wo = spatial.shape
    sb, a = _batched(spatial, B), _or(channel, x)
    gx = gs = gc = None
    with _device(x):
        if need_x:
            grid, meta = _launch(x, spatial, channel, K, s, d, combine, H * W)
            gx = _empty(x, x.shape, x.dtype)
            wrap_triton(_grad_x_kernel)[grid](
                grad_out, sb, a, gx, G, C // G, *meta.pop("NB_NCB"), H, W, Ho, Wo, *p, *grad_out.stride(),
                *sb.stride(), *_strides(channel, 3), *gx.stride(), **meta)
        if need_s:
            grid, meta = _launch(x, spatial, channel, K, s, d, combine, Ho * Wo)
            nb, ncb = meta.pop("NB_NCB")
            acc = spatial.dtype if ncb == 1 else torch.promote_types(x.dtype, torch.float32)
            part = torch.empty((Bs, G, ncb, KK, Ho, Wo), dtype=acc, device=x.device)
            wrap_triton(_grad_spatial_kernel)[grid](
                x, grad_out, a, part, G, C // G, nb, ncb, H, W, Ho, Wo, *p, *x.stride(),
                *grad_out.stride(), *_strides(channel, 3), *part.stride(), **meta)
            gs = part.sum(2, dtype=spatial.dtype) if ncb > 1 else part.squeeze(2)
        if need_c and channel is not None:
            gc = torch.empty(channel.shape, dtype=channel.dtype, device=x.device)
            kkp = triton.next_power_of_2(K * K)
            block = min(max(16, _TILE // kkp), triton.next_power_of_2(Ho * Wo))
            wrap_triton(_grad_channel_kernel)[(B * C,)](
                x, grad_out, sb, gc, C, C // G, H, W, Ho, Wo, *p, *x.stride(), *grad_out.stride(),
                *sb.stride(), *gc.stride(), K=K, SH=s[0], SW=s[1], DH=d[0], DW=d[1],
                MODE=_MODE[combine], KKP=kkp, BLOCK=block, ACC=_acc_tl(x.dtype),
                num_warps=8 if kkp * block >= _TILE else 4)
    return gx, gs, gc


if triton is not None:  # the custom ops: inductor sees the Triton kernels through `wrap_triton`

    @torch.library.triton_op("dynconv::pixel_filter_triton", mutates_args=())
    def _op(x: Tensor, spatial: Tensor, channel: Tensor | None, kernel_size: int, stride: list[int],
            padding: list[int], dilation: list[int], combine: str) -> Tensor:
        return forward(x, spatial, channel, kernel_size, tuple(stride), tuple(padding), tuple(dilation), combine)

    @torch.library.triton_op("dynconv::pixel_filter_triton_backward", mutates_args=())
    def _backward_op(grad_out: Tensor, x: Tensor, spatial: Tensor, channel: Tensor | None, kernel_size: int,
                     stride: list[int], padding: list[int], dilation: list[int], combine: str,
                     need: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
        grads = backward(grad_out, x, spatial, channel, kernel_size, tuple(stride), tuple(padding),
                         tuple(dilation), combine, need)
        return absent(grads, x)

    register_autograd(_op, torch.ops.dynconv.pixel_filter_triton_backward)


def _batched(spatial: Tensor, B: int) -> Tensor:
    """The filter viewed with B samples; a shared one (batch 1) becomes batch stride 0, no copy."""
    return spatial.expand(B, *spatial.shape[1:])


def _or(channel: Tensor | None, x: Tensor) -> Tensor:
    """A pointer for the kernels' channel-filter argument, never read when there is no filter."""
    return x if channel is None else channel


def _strides(t: Tensor | None, n: int) -> tuple[int, ...]:
    """`t`'s strides, or n zeros for an absent channel filter."""
    return (0,) * n if t is None else t.stride()


def reduction_splits(units: int, rows: int) -> tuple[int, int]:
    """(splits, units per split) of a two-pass weight-gradient reduction: each of rows × splits programs (about
    `_REDUCTION_PROGRAMS`) sums one row block over a contiguous range of the `units` (sample, pixel block) pairs in
    registers and stores its partial once; the caller adds the splits' partials. No atomics (so GPU runs are
    bitwise reproducible), and the buffer is splits × the gradient's size whatever the batch."""
    per = triton.cdiv(units, max(1, min(units, triton.cdiv(_REDUCTION_PROGRAMS, rows))))
    return triton.cdiv(units, per), per


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch(x, spatial, channel, K, s, d, combine, pixels) -> tuple[tuple[int], dict]:
    """Grid and compile-time parameters of the tiled kernels (forward, grad_x, grad_spatial): tiles of
    CPB planes that share a filter (a power of two, at most DYNCONV_TRITON_CPB) × BLOCK pixels (about
    _PLANE_TILE elements), over B'·G·NCB·⌈pixels / BLOCK⌉ programs; "NB_NCB" (planes per filter sample,
    chunks) goes to the kernel as arguments."""
    B, C = x.shape[:2]
    Bs, G = spatial.shape[:2]
    nb = B // Bs
    planes = nb * (C // G)
    cpb = max(2, min(triton.next_power_of_2(_CHANNELS_PER_PROGRAM), triton.next_power_of_2(planes)))
    block = min(max(32, _PLANE_TILE // cpb), triton.next_power_of_2(pixels))
    ncb = triton.cdiv(planes, cpb)
    meta = dict(NB_NCB=(nb, ncb), K=K, SH=s[0], SW=s[1], DH=d[0], DW=d[1],
                MODE=_MODE[None if channel is None else combine], BLOCK=block, CPB=cpb, ACC=_acc_tl(x.dtype),
                num_warps=_PLANE_WARPS)
    return (Bs * G * ncb * triton.cdiv(pixels, block),), meta


def pixel_filter(x: Tensor, spatial: Tensor, channel: Tensor | None = None, *, kernel_size: int,
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                 combine: str = "mul") -> Tensor:
    """The Triton kernels; called by `dynconv.functional.pixel_filter` (which checks the shapes and
    resolves the geometry into pairs) when `available(...)` is true."""
    if triton is None:
        raise RuntimeError("the Triton pixel_filter path needs the `triton` package; check available(...) first")
    return torch.ops.dynconv.pixel_filter_triton(x, spatial, channel, int(kernel_size), list(stride),
                                                 list(padding), list(dilation), combine)
