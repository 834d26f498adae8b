"""Compiled CUDA path for `pixel_filter`: Triton kernels with a hand-derived backward.

    out[b,c,i,j] = Σ_k F[b,c,k,i,j] · x[b, c, i·sh − ph + kh·dh, j·sw − pw + kw·dw]      k = kh·K + kw

with F = S[b', g(c), k, i, j], times or plus A[b,c,k] (DESIGN.md "The one idea"; involution Eq. 4,
DDF Eq. 5). Each program holds a (taps × pixels) tile for one (b, c): zero padding is a load mask,
nothing is padded or unfolded, sums run in float32 (float64 for float64 inputs) and are stored in
the input dtype. Tensors are addressed through their strides, so channels_last and expanded
(stride-0) tensors need no copy; a filter shared by the batch is read with batch stride 0.

Backward, with P_k = grad_out · x_tap_k, three kernels, none with atomics (deterministic):
  grad_x[b,c,y,z]   = Σ_k grad_out[b,c,i,j] · F_k[i,j]   over the taps k whose output (i, j) read
                      (y, z): i = (y + ph − kh·dh) / sh when that is a whole number in [0, Ho)
                      (a gather over input pixels, instead of the scatter-add of `_PixelFilter`);
  grad_S[b',g,k,i,j] = Σ_{c∈g} P_k · A_k ("mul") or Σ_{c∈g} P_k, also Σ_b when S is shared;
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

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MODE = {None: 0, "mul": 1, "add": 2}
_TILE = 4096  # taps × pixels per program: 16×256 for K=3, 32×128 for K=5, 64×64 for K=7
# Channels (or, for the filter gradient, (sample, channel) pairs) one program handles with one filter tile.
_CHANNELS_PER_PROGRAM = int(os.environ.get("DYNCONV_TRITON_CPB", "16"))

# Triton decides at decoration time whether a kernel is compiled or interpreted.
_INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)


def enabled() -> bool:
    """False when the environment says `DYNCONV_TRITON=0` (or `false`/`off`/`no`)."""
    return os.environ.get("DYNCONV_TRITON", "1").strip().lower() not in ("0", "false", "off", "no")


def interpreter_opted_in() -> bool:
    """CPU tensors run the kernels only under Triton's interpreter and the explicit opt-in."""
    return _INTERPRETED and os.environ.get("DYNCONV_TRITON_INTERPRET", "0").strip() == "1"


def available(x: Tensor, spatial: Tensor, channel: Tensor | None = None) -> bool:
    """True when these kernels can serve the inputs: triton present, one floating dtype and one
    device, and that device CUDA (or CPU under the interpreter opt-in). Any stride/padding/dilation
    pairs are supported."""
    if triton is None or not enabled():
        return False
    tensors = [t for t in (x, spatial, channel) if t is not None]
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors) or x.dtype not in DTYPES:
        return False
    if x.numel() == 0:  # nothing to launch; the PyTorch path handles empty batches
        return False
    if max(x[0].numel(), spatial[0].numel()) >= 2**31:  # offsets within one sample are 32-bit
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and interpreter_opted_in())


if triton is not None:

    @triton.jit
    def _program(n_pixels, G, NCB, BLOCK: tl.constexpr):
        """This program's (b, g, channel chunk, pixel offsets): the grid is B·G·NCB·⌈n_pixels / BLOCK⌉
        programs, pixel blocks fastest, so the programs that share a filter tile run together."""
        pid = tl.program_id(0)
        nblk = tl.cdiv(n_pixels, BLOCK)
        rest = pid // nblk
        bg = rest // NCB
        return (bg // G).to(tl.int64), bg % G, rest % NCB, (pid % nblk) * BLOCK + tl.arange(0, BLOCK)

    @triton.jit
    def _tap_offsets(i, j, pm, k, H, W, ph, pw, sh_, sw_,
                     K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
        """Offsets (within one plane, strides sh_, sw_) and mask of x[i·sh − ph + kh·dh, j·sw − pw + kw·dw]
        for taps k (rows) × output pixels (i, j)."""
        y = i * SH - ph + (k // K) * DH
        z = j * SW - pw + (k % K) * DW
        return y * sh_ + z * sw_, pm & (k < K * K) & (y >= 0) & (y < H) & (z >= 0) & (z < W)

    @triton.jit
    def _combine(f, a_ptr, c, k, sac, sak, valid, K: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr):
        """F = S (·|+) A[b, c, k] for one channel (a_ptr already at sample b); S alone when MODE is 0.
        Positions outside the image need no masking here: the operand F meets is zero there."""
        if MODE != 0:
            a = tl.load(a_ptr + c * sac + k * sak, mask=(k < K * K) & valid, other=0.0).to(ACC)
            if MODE == 1:
                f = f * a
            else:
                f = f + a
        return f

    @triton.jit
    def _forward_kernel(x_ptr, s_ptr, a_ptr, o_ptr, G, CG, NCB, H, W, Ho, Wo, ph, pw,
                        sxb, sxc, sxh, sxw, ssb, ssg, ssk, ssh, ssw, sab, sac, sak, sob, soc, soh, sow,
                        K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                        DW: tl.constexpr, MODE: tl.constexpr, KKP: tl.constexpr, BLOCK: tl.constexpr,
                        CPB: tl.constexpr, ACC: tl.constexpr):
        """One (b, g, chunk of CPB of the group's channels, pixel block): the filter tile and the tap
        offsets are loaded and computed once, then each channel costs one gather and one reduction."""
        b, g, cb, offs = _program(Ho * Wo, G, NCB, BLOCK)
        pm = (offs < Ho * Wo)[None, :]
        i, j = (offs // Wo)[None, :], (offs % Wo)[None, :]
        k = tl.arange(0, KKP)[:, None]
        xoff, m = _tap_offsets(i, j, pm, k, H, W, ph, pw, sxh, sxw, K, SH, SW, DH, DW)
        f0 = tl.load(s_ptr + b * ssb + g * ssg + k * ssk + i * ssh + j * ssw, mask=pm & (k < K * K),
                     other=0.0).to(ACC)
        ooff = offs // Wo * soh + offs % Wo * sow
        for cc in range(CPB):
            c0 = cb * CPB + cc
            valid = c0 < CG
            c = (g * CG + c0).to(tl.int64)
            xv = tl.load(x_ptr + b * sxb + c * sxc + xoff, mask=m & valid, other=0.0).to(ACC)
            f = _combine(f0, a_ptr + b * sab, c, k, sac, sak, valid, K, MODE, ACC)
            out = tl.sum(xv * f, axis=0)
            tl.store(o_ptr + b * sob + c * soc + ooff, out.to(o_ptr.dtype.element_ty),
                     mask=(offs < Ho * Wo) & valid)

    @triton.jit
    def _grad_x_kernel(go_ptr, s_ptr, a_ptr, gx_ptr, G, CG, NCB, H, W, Ho, Wo, ph, pw,
                       sgb, sgc, sgh, sgw, ssb, ssg, ssk, ssh, ssw, sab, sac, sak, sxb, sxc, sxh, sxw,
                       K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                       DW: tl.constexpr, MODE: tl.constexpr, KKP: tl.constexpr, BLOCK: tl.constexpr,
                       CPB: tl.constexpr, ACC: tl.constexpr):
        """As the forward, over input pixels: the filter and grad_out offsets of the taps that read
        each input pixel are computed once per (b, g, chunk, block)."""
        b, g, cb, offs = _program(H * W, G, NCB, BLOCK)
        y, z = (offs // W)[None, :], (offs % W)[None, :]
        k = tl.arange(0, KKP)[:, None]
        # The output pixel (i, j) that read input (y, z) through tap k; clamped before dividing so
        # negative numerators never meet the division (they are masked off anyway).
        th = y + ph - (k // K) * DH
        tw = z + pw - (k % K) * DW
        i, j = tl.maximum(th, 0) // SH, tl.maximum(tw, 0) // SW
        m = ((offs < H * W)[None, :] & (k < K * K) & (th >= 0) & (tw >= 0)
             & (th % SH == 0) & (tw % SW == 0) & (i < Ho) & (j < Wo))
        f0 = tl.load(s_ptr + b * ssb + g * ssg + k * ssk + i * ssh + j * ssw, mask=m, other=0.0).to(ACC)
        gooff = i * sgh + j * sgw
        xoff = offs // W * sxh + offs % W * sxw
        for cc in range(CPB):
            c0 = cb * CPB + cc
            valid = c0 < CG
            c = (g * CG + c0).to(tl.int64)
            go = tl.load(go_ptr + b * sgb + c * sgc + gooff, mask=m & valid, other=0.0).to(ACC)
            f = _combine(f0, a_ptr + b * sab, c, k, sac, sak, valid, K, MODE, ACC)
            gx = tl.sum(go * f, axis=0)
            tl.store(gx_ptr + b * sxb + c * sxc + xoff, gx.to(gx_ptr.dtype.element_ty),
                     mask=(offs < H * W) & valid)

    @triton.jit
    def _grad_spatial_kernel(x_ptr, go_ptr, a_ptr, gs_ptr, G, CG, NB, NCB, H, W, Ho, Wo, ph, pw,
                             sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sab, sac, sak,
                             srb, srg, srn, srk, srh, srw,
                             K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                             DW: tl.constexpr, MODE: tl.constexpr, KKP: tl.constexpr,
                             BLOCK: tl.constexpr, CPB: tl.constexpr, ACC: tl.constexpr):
        """One (b', g, chunk, pixel block): sums P·A over a chunk of CPB of the NB·CG (sample, channel)
        pairs that share the filter (NB = B for a filter shared by the batch, else 1) into partial sums
        (b', g, chunk, k, i, j), which the caller adds over chunks when there are several: no two
        programs write one element and no atomics are needed."""
        bs, g, cb, offs = _program(Ho * Wo, G, NCB, BLOCK)
        pm = (offs < Ho * Wo)[None, :]
        i, j = (offs // Wo)[None, :], (offs % Wo)[None, :]
        k = tl.arange(0, KKP)[:, None]
        xoff, m = _tap_offsets(i, j, pm, k, H, W, ph, pw, sxh, sxw, K, SH, SW, DH, DW)
        gooff = i * sgh + j * sgw
        acc = tl.zeros((KKP, BLOCK), dtype=ACC)
        for t in range(CPB):
            n = cb * CPB + t
            valid = n < NB * CG
            b = bs + (n // CG).to(tl.int64)
            c = (g * CG + n % CG).to(tl.int64)
            xv = tl.load(x_ptr + b * sxb + c * sxc + xoff, mask=m & valid, other=0.0).to(ACC)
            go = tl.load(go_ptr + b * sgb + c * sgc + gooff, mask=pm & valid, other=0.0).to(ACC)
            p = xv * go
            if MODE == 1:
                p = p * tl.load(a_ptr + b * sab + c * sac + k * sak, mask=(k < K * K) & valid,
                                other=0.0).to(ACC)
            acc += p
        tl.store(gs_ptr + bs * srb + g * srg + cb * srn + k * srk + i * srh + j * srw,
                 acc.to(gs_ptr.dtype.element_ty), mask=pm & (k < K * K))

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


class _TritonPixelFilter(torch.autograd.Function):
    """The Triton forward and the three gradient kernels of the module docstring."""

    @staticmethod
    def forward(ctx, x, spatial, channel, K, s, p, d, combine):
        ctx.save_for_backward(x, spatial, channel)
        ctx.geometry = (K, s, p, d, combine)
        B, C, H, W = x.shape
        G, Ho, Wo = spatial.shape[1], *spatial.shape[-2:]
        out = _empty(x, (B, C, Ho, Wo), x.dtype)
        sb = _batched(spatial, B)
        meta = _meta(x, spatial, channel, K, s, d, combine, Ho * Wo, C // G)
        ncb = triton.cdiv(C // G, meta["CPB"])
        with _device(x):
            _forward_kernel[(B * G * ncb * triton.cdiv(Ho * Wo, meta["BLOCK"]),)](
                x, sb, _or(channel, x), out, G, C // G, ncb, H, W, Ho, Wo, *p,
                *x.stride(), *sb.stride(), *_strides(channel, 3), *out.stride(), **meta)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, spatial, channel = ctx.saved_tensors
        K, s, p, d, combine = ctx.geometry
        need_x, need_s, need_c = ctx.needs_input_grad[:3]
        B, C, H, W = x.shape
        Bs, G, KK, Ho, Wo = spatial.shape
        sb, a = _batched(spatial, B), _or(channel, x)
        gx = gs = gc = None
        with _device(x):
            if need_x:
                meta = _meta(x, spatial, channel, K, s, d, combine, H * W, C // G)
                ncb = triton.cdiv(C // G, meta["CPB"])
                gx = _empty(x, x.shape, x.dtype)
                _grad_x_kernel[(B * G * ncb * triton.cdiv(H * W, meta["BLOCK"]),)](
                    grad_out, sb, a, gx, G, C // G, ncb, H, W, Ho, Wo, *p, *grad_out.stride(), *sb.stride(),
                    *_strides(channel, 3), *gx.stride(), **meta)
            pairs = (B // Bs) * (C // G)  # (sample, channel) pairs summed into each filter element
            meta = _meta(x, spatial, channel, K, s, d, combine, Ho * Wo, pairs)
            if need_s:
                ncb = triton.cdiv(pairs, meta["CPB"])
                acc = spatial.dtype if ncb == 1 else _acc_torch(x.dtype)
                part = torch.empty((Bs, G, ncb, KK, Ho, Wo), dtype=acc, device=x.device)
                _grad_spatial_kernel[(Bs * G * ncb * triton.cdiv(Ho * Wo, meta["BLOCK"]),)](
                    x, grad_out, a, part, G, C // G, B // Bs, ncb, H, W, Ho, Wo, *p, *x.stride(),
                    *grad_out.stride(), *_strides(channel, 3), *part.stride(), **meta)
                gs = part.sum(2, dtype=spatial.dtype) if ncb > 1 else part.squeeze(2)
            if need_c and channel is not None:
                gc = torch.empty(channel.shape, dtype=channel.dtype, device=x.device)
                _grad_channel_kernel[(B * C,)](
                    x, grad_out, sb, gc, C, C // G, H, W, Ho, Wo, *p, *x.stride(), *grad_out.stride(),
                    *sb.stride(), *gc.stride(), **{k: v for k, v in meta.items() if k != "CPB"})
        return gx, gs, gc, None, None, None, None, None


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _batched(spatial: Tensor, B: int) -> Tensor:
    """The filter viewed with B samples; a shared one (batch 1) becomes batch stride 0, no copy."""
    return spatial.expand(B, *spatial.shape[1:])


def _or(channel: Tensor | None, x: Tensor) -> Tensor:
    """A pointer for the kernels' channel-filter argument, never read when there is no filter."""
    return x if channel is None else channel


def _strides(t: Tensor | None, n: int) -> tuple[int, ...]:
    """`t`'s strides, or n zeros for an absent channel filter."""
    return (0,) * n if t is None else t.stride()


def _meta(x, spatial, channel, K, s, d, combine, pixels, items) -> dict:
    """The compile-time parameters: geometry, combine mode, tile shape, accumulation dtype, warps, and
    how many of the `items` (channels or (sample, channel) pairs) that share a filter one program takes."""
    kkp = triton.next_power_of_2(K * K)
    block = min(max(16, _TILE // kkp), triton.next_power_of_2(pixels))
    cpb = max(1, min(_CHANNELS_PER_PROGRAM, items))
    # 8 warps keep a full tile at 16 elements per thread (64-128 registers for K=7 with ptxas, sm_90).
    return dict(K=K, SH=s[0], SW=s[1], DH=d[0], DW=d[1], MODE=_MODE[None if channel is None else combine],
                KKP=kkp, BLOCK=block, CPB=cpb, ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
                num_warps=8 if kkp * block >= _TILE else 4)


def pixel_filter(x: Tensor, spatial: Tensor, channel: Tensor | None = None, *, kernel_size: int,
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                 combine: str = "mul") -> Tensor:
    """The Triton kernels; called by `dynconv.functional.pixel_filter` (which checks the shapes and
    resolves the geometry into pairs) when `available(...)` is true."""
    if triton is None:
        raise RuntimeError("the Triton pixel_filter path needs the `triton` package; check available(...) first")
    return _TritonPixelFilter.apply(x, spatial, channel, int(kernel_size), tuple(stride), tuple(padding),
                                    tuple(dilation), combine)
