"""Compiled CUDA path of the fused local Deformable Kernels op (Gao et al., "Deformable Kernels:
Adapting Effective Receptive Fields for Object Deformation", ICLR 2020, Eq. 6): Triton kernels that
sample each tap's kernel value from the channel's scope where it multiplies the input.

    out[b, c, p] = Σ_t W'_c(t, p) · x[b, c, p·s − pad + t·d]
    W'_c(t, p)   = Σ_corners a · W_c[corner],   at (fh + Δh + (S_h − K)/2, fw + Δw + (S_w − K)/2)

with (Δh, Δw) = offset[b, g, t, :, p], g = c mod G, and bilinear weights a that are 0 for a point
outside (−1, S) and for corners outside the scope (the official `planar_bilinear`). No (B, C, K², Ho, Wo)
kernel is written, forward or backward: each program holds a (channels × pixels) tile of one offset
group's channels and, per tap, computes the group's bilinear corners once for its pixels.

Backward, with P = grad_out · x_tap:
  grad_x[b, c, y] = Σ_t grad_out[b, c, p_t(y)] · W'_c(t, p_t(y))   (a gather over input pixels, the
                    kernel value resampled at the output pixel p_t(y) that read y);
  grad_Δ[b, g, t, p] = Σ_corners ∂a/∂Δ · Σ_{c∈g} P · W_c[corner]   (one program per (b, g, pixel block)
                    owns all the group's channels, so it writes each element once);
  grad_W_c[q] = Σ_{b,p,t} P · Σ_{corners at q} a   (a two-pass reduction: one program per (group, channel
                    chunk, split of the (sample, pixel block) pairs) splats P onto the S_h·S_w scope positions
                    by a dot with the (pixels × scope) matrix of bilinear weights, sums over its split in
                    registers and stores one partial into a float32 (float64) buffer of splits × the weight's
                    size (`triton_pixel_filter.reduction_splits`: about 512 programs); the caller adds the
                    partials. No atomics: runs are bitwise reproducible).
P is formed twice, once per kernel: grad Δ sums over a group's channels per pixel, grad W over pixels per
channel, and one program holding both would need the whole group's (channels × S_h·S_w) sums in registers.
Loads are in the tensors' dtype (bf16/fp16 read as such), sums in float32 (float64 for float64), stores in
the tensors' dtype; tensors are addressed through their strides (channels_last and expanded gradients need
no copy). Only the small scope weight is made contiguous.

`available(...)` follows `triton_pixel_filter.available`: CUDA tensors, or CPU tensors under Triton's
interpreter with `DYNCONV_TRITON_INTERPRET=1`; `DYNCONV_TRITON=0` switches it off.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.library import wrap_triton

from .library import absent, register_autograd
from .triton_pixel_filter import _acc_tl, _device, _empty, launchable, reduction_splits, triton

if triton is not None:
    import triton.language as tl

    from .triton_pixel_filter import _program, _tap_offsets

# Channels × pixels of a program's tile, and its warps (as `triton_involution`).
_PLANE_TILE, _WARPS = 2048, 4
_CHANNELS_PER_PROGRAM = int(os.environ.get("DYNCONV_TRITON_CPB", "16"))


def available(x: Tensor, offset: Tensor, weight: Tensor) -> bool:
    """True when these kernels can serve the inputs: triton present and enabled, one floating dtype and
    one device, CUDA (or CPU under the interpreter opt-in), per-sample offsets within 32 bits."""
    return launchable((x, offset, weight), (x, offset))


if triton is not None:

    @triton.jit
    def _coords(off_ptr, b, g, t, i, j, pm, sfb, sfg, sft, sf2, sfh, sfw,
                K: tl.constexpr, SCH: tl.constexpr, SCW: tl.constexpr, ACC: tl.constexpr):
        """Tap t's scope coordinates at pixels (i, j) of offset group g: (row of the top-left corner,
        its column, fractional parts lh, lw, inside (−1, S)); a point outside gets (0, 0, 0, 0)."""
        base = off_ptr + b * sfb + g * sfg + t * sft + i * sfh + j * sfw
        h = tl.load(base, mask=pm, other=0.0).to(ACC) + ((t // K) + (SCH - K) * 0.5)
        w = tl.load(base + sf2, mask=pm, other=0.0).to(ACC) + ((t % K) + (SCW - K) * 0.5)
        inside = pm & (h > -1) & (h < SCH) & (w > -1) & (w < SCW)
        h0 = tl.floor(tl.where(inside, h, 0.0))
        w0 = tl.floor(tl.where(inside, w, 0.0))
        lh, lw = tl.where(inside, h - h0, 0.0), tl.where(inside, w - w0, 0.0)
        return h0.to(tl.int32), w0.to(tl.int32), lh, lw, inside

    @triton.jit
    def _corner(h0, w0, lh, lw, inside, DY: tl.constexpr, DX: tl.constexpr, SCH: tl.constexpr,
                SCW: tl.constexpr):
        """Corner (h0 + DY, w0 + DX): its index in the S_h×S_w plane, whether it counts, its bilinear
        weight a and ∂a/∂h, ∂a/∂w."""
        hi, wi = h0 + DY, w0 + DX
        ok = inside & (hi >= 0) & (hi < SCH) & (wi >= 0) & (wi < SCW)
        ah = lh if DY else 1 - lh
        aw = lw if DX else 1 - lw
        sh = 1.0 if DY else -1.0
        sw = 1.0 if DX else -1.0
        return hi * SCW + wi, ok, ah * aw, sh * aw, ah * sw

    @triton.jit
    def _kernel_value(w_ptr, wrow, h0, w0, lh, lw, inside, rv, SCH: tl.constexpr, SCW: tl.constexpr,
                      ACC: tl.constexpr):
        """W'_c at the tile's pixels, (channels × pixels): the four corners' bilinear sum."""
        val = tl.zeros((wrow.shape[0], h0.shape[0]), dtype=ACC)
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                idx, ok, a, _, _ = _corner(h0, w0, lh, lw, inside, dy, dx, SCH, SCW)
                wv = tl.load(w_ptr + wrow[:, None] + idx[None, :], mask=rv[:, None] & ok[None, :], other=0.0).to(ACC)
                val += wv * a[None, :]
        return val

    @triton.jit
    def _channels(cb, g, G, M, CPB: tl.constexpr):
        """Chunk cb of offset group g's channels c = m·G + g, m < M: (c, whether it exists)."""
        m = cb * CPB + tl.arange(0, CPB)
        return (m * G + g).to(tl.int64), m < M

    @triton.jit
    def _forward_kernel(x_ptr, off_ptr, w_ptr, o_ptr, G, M, NCB, H, W, Ho, Wo, ph, pw,
                        sxb, sxc, sxh, sxw, sfb, sfg, sft, sf2, sfh, sfw, sob, soc, soh, sow,
                        K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                        DW: tl.constexpr, SCH: tl.constexpr, SCW: tl.constexpr, BLOCK: tl.constexpr,
                        CPB: tl.constexpr, ACC: tl.constexpr):
        """A (channels × pixels) tile of offset group g: per tap, the group's corners once, then the
        kernel value of every channel, times its input tap."""
        b, g, cb, offs = _program(Ho * Wo, G, NCB, BLOCK)
        c, rv = _channels(cb, g, G, M, CPB)
        pm = offs < Ho * Wo
        i, j = offs // Wo, offs % Wo
        xrow, wrow = (b * sxb + c * sxc)[:, None], c * (SCH * SCW)
        acc = tl.zeros((CPB, BLOCK), dtype=ACC)
        for t in range(K * K):
            h0, w0, lh, lw, inside = _coords(off_ptr, b, g, t, i, j, pm, sfb, sfg, sft, sf2, sfh, sfw,
                                             K, SCH, SCW, ACC)
            kv = _kernel_value(w_ptr, wrow, h0, w0, lh, lw, inside, rv, SCH, SCW, ACC)
            xoff, xm = _tap_offsets(i, j, pm, t, H, W, ph, pw, sxh, sxw, K, SH, SW, DH, DW)
            xv = tl.load(x_ptr + xrow + xoff[None, :], mask=rv[:, None] & xm[None, :], other=0.0).to(ACC)
            acc += xv * kv
        tl.store(o_ptr + (b * sob + c * soc)[:, None] + (i * soh + j * sow)[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=rv[:, None] & pm[None, :])

    @triton.jit
    def _grad_x_kernel(go_ptr, off_ptr, w_ptr, gx_ptr, G, M, NCB, H, W, Ho, Wo, ph, pw,
                       sgb, sgc, sgh, sgw, sfb, sfg, sft, sf2, sfh, sfw, sxb, sxc, sxh, sxw,
                       K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                       DW: tl.constexpr, SCH: tl.constexpr, SCW: tl.constexpr, BLOCK: tl.constexpr,
                       CPB: tl.constexpr, ACC: tl.constexpr):
        """Over input pixels (y, z): tap t was read by output (i, j) with i = (y + ph − fh·dh) / sh when
        that is a whole number in [0, Ho) (likewise j); the kernel value is resampled there."""
        b, g, cb, offs = _program(H * W, G, NCB, BLOCK)
        c, rv = _channels(cb, g, G, M, CPB)
        pm = offs < H * W
        y, z = offs // W, offs % W
        gorow, wrow = (b * sgb + c * sgc)[:, None], c * (SCH * SCW)
        acc = tl.zeros((CPB, BLOCK), dtype=ACC)
        for t in range(K * K):
            th = y + ph - (t // K) * DH
            tw = z + pw - (t % K) * DW
            i, j = tl.maximum(th, 0) // SH, tl.maximum(tw, 0) // SW
            om = pm & (th >= 0) & (tw >= 0) & (th % SH == 0) & (tw % SW == 0) & (i < Ho) & (j < Wo)
            h0, w0, lh, lw, inside = _coords(off_ptr, b, g, t, i, j, om, sfb, sfg, sft, sf2, sfh, sfw,
                                             K, SCH, SCW, ACC)
            kv = _kernel_value(w_ptr, wrow, h0, w0, lh, lw, inside, rv, SCH, SCW, ACC)
            go = tl.load(go_ptr + gorow + (i * sgh + j * sgw)[None, :], mask=rv[:, None] & om[None, :],
                         other=0.0).to(ACC)
            acc += go * kv
        tl.store(gx_ptr + (b * sxb + c * sxc)[:, None] + (y * sxh + z * sxw)[None, :],
                 acc.to(gx_ptr.dtype.element_ty), mask=rv[:, None] & pm[None, :])

    @triton.jit
    def _grad_offset_kernel(x_ptr, go_ptr, off_ptr, w_ptr, goff_ptr, G, M, H, W, Ho, Wo, ph, pw,
                            sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sfb, sfg, sft, sf2, sfh, sfw,
                            sqb, sqg, sqt, sq2, sqh, sqw,
                            K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                            DW: tl.constexpr, SCH: tl.constexpr, SCW: tl.constexpr,
                            BLOCK: tl.constexpr, CPB: tl.constexpr, ACC: tl.constexpr):
        """One (sample, group, pixel block) per program, over the taps and the group's channel chunks:
        P = grad_out · x_tap per chunk, then per corner Σ_c P · W_c[corner] into grad Δ (registers, stored
        once per tap; the weight is contiguous (C, S_h·S_w))."""
        b, g, _, offs = _program(Ho * Wo, G, 1, BLOCK)
        pm = offs < Ho * Wo
        i, j = offs // Wo, offs % Wo
        for t in range(K * K):
            h0, w0, lh, lw, inside = _coords(off_ptr, b, g, t, i, j, pm, sfb, sfg, sft, sf2, sfh, sfw,
                                             K, SCH, SCW, ACC)
            xoff, xm = _tap_offsets(i, j, pm, t, H, W, ph, pw, sxh, sxw, K, SH, SW, DH, DW)
            gh = tl.zeros((BLOCK,), dtype=ACC)
            gwd = tl.zeros((BLOCK,), dtype=ACC)
            for cb in range(0, tl.cdiv(M, CPB)):
                c, rv = _channels(cb, g, G, M, CPB)
                go = tl.load(go_ptr + (b * sgb + c * sgc)[:, None] + (i * sgh + j * sgw)[None, :],
                             mask=rv[:, None] & pm[None, :], other=0.0).to(ACC)
                xv = tl.load(x_ptr + (b * sxb + c * sxc)[:, None] + xoff[None, :],
                             mask=rv[:, None] & xm[None, :], other=0.0).to(ACC)
                prod, wrow = go * xv, (c * (SCH * SCW))[:, None]
                for dy in tl.static_range(2):
                    for dx in tl.static_range(2):
                        idx, ok, _a, dah, daw = _corner(h0, w0, lh, lw, inside, dy, dx, SCH, SCW)
                        wv = tl.load(w_ptr + wrow + idx[None, :], mask=rv[:, None] & ok[None, :],
                                     other=0.0).to(ACC)
                        pv = tl.sum(prod * wv, axis=0)
                        gh += dah * pv
                        gwd += daw * pv
            q = goff_ptr + b * sqb + g * sqg + t * sqt + i * sqh + j * sqw
            tl.store(q, gh.to(goff_ptr.dtype.element_ty), mask=pm)
            tl.store(q + sq2, gwd.to(goff_ptr.dtype.element_ty), mask=pm)

    @triton.jit
    def _grad_weight_kernel(x_ptr, go_ptr, off_ptr, gw_ptr, G, M, NCB, H, W, Ho, Wo, ph, pw, UPS, NU,
                            sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sfb, sfg, sft, sf2, sfh, sfw,
                            K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                            DW: tl.constexpr, SCH: tl.constexpr, SCW: tl.constexpr, SP: tl.constexpr,
                            BLOCK: tl.constexpr, CPB: tl.constexpr, ACC: tl.constexpr):
        """Program (split s, group g, channel chunk), over split s's UPS (sample, pixel block) units and the
        taps: P = grad_out · x_tap, splatted onto the scope by the bilinear weights, grad W_c[q] += Σ_p
        P[c, p] · A[p, q] with A[p, q] = Σ_corners a · [corner index = q] (a dot), in registers; the (channels
        × S_h·S_w) partial is stored once, at row s of the buffer."""
        pid = tl.program_id(0)
        cb, g, s = pid % NCB, (pid // NCB) % G, pid // (NCB * G)
        c, rv = _channels(cb, g, G, M, CPB)
        q = tl.arange(0, SP)
        nblk = tl.cdiv(Ho * Wo, BLOCK)
        acc = tl.zeros((CPB, SP), dtype=ACC)
        for u in range(s * UPS, tl.minimum(s * UPS + UPS, NU)):
            b = (u // nblk).to(tl.int64)
            offs = (u % nblk) * BLOCK + tl.arange(0, BLOCK)
            pm = offs < Ho * Wo
            i, j = offs // Wo, offs % Wo
            go = tl.load(go_ptr + (b * sgb + c * sgc)[:, None] + (i * sgh + j * sgw)[None, :],
                         mask=rv[:, None] & pm[None, :], other=0.0).to(ACC)
            xrow = (b * sxb + c * sxc)[:, None]
            for t in range(K * K):
                h0, w0, lh, lw, inside = _coords(off_ptr, b, g, t, i, j, pm, sfb, sfg, sft, sf2, sfh, sfw,
                                                 K, SCH, SCW, ACC)
                xoff, xm = _tap_offsets(i, j, pm, t, H, W, ph, pw, sxh, sxw, K, SH, SW, DH, DW)
                xv = tl.load(x_ptr + xrow + xoff[None, :], mask=rv[:, None] & xm[None, :], other=0.0).to(ACC)
                splat = tl.zeros((BLOCK, SP), dtype=ACC)
                for dy in tl.static_range(2):
                    for dx in tl.static_range(2):
                        idx, ok, a, _, _ = _corner(h0, w0, lh, lw, inside, dy, dx, SCH, SCW)
                        splat += tl.where(ok[:, None] & (idx[:, None] == q[None, :]), a[:, None], 0.0)
                acc = tl.dot(go * xv, splat, acc, input_precision="ieee")
        tl.store(gw_ptr + (s.to(tl.int64) * G * M + c)[:, None] * (SCH * SCW) + q[None, :], acc,
                 mask=rv[:, None] & (q < SCH * SCW)[None, :])


def tiles(C: int, groups: int, pixels: int) -> dict:
    """Compile-time tile: CPB channels of an offset group (a power of two, at most DYNCONV_TRITON_CPB) ×
    BLOCK pixels, about `_PLANE_TILE` elements."""
    cpb = max(2, min(triton.next_power_of_2(_CHANNELS_PER_PROGRAM), triton.next_power_of_2(C // groups)))
    return dict(BLOCK=max(16, min(_PLANE_TILE // cpb, triton.next_power_of_2(pixels))), CPB=cpb)


def _meta(x: Tensor, weight: Tensor, K: int, s, d, groups: int, pixels: int) -> dict:
    return dict(K=K, SH=s[0], SW=s[1], DH=d[0], DW=d[1], SCH=weight.shape[1], SCW=weight.shape[2],
                ACC=_acc_tl(x.dtype), num_warps=_WARPS, **tiles(x.shape[1], groups, pixels))


def _weight_meta(x: Tensor, weight: Tensor, K: int, s, d, groups: int, pixels: int) -> dict:
    """The grad weight kernel's parameters: SP scope positions (a power of two), and a quarter of the pixel
    block, as P and the (pixels × scope) splat operand are live at once (at half the block it spills, ptxas
    sm_90)."""
    meta = _meta(x, weight, K, s, d, groups, pixels)
    return dict(meta, BLOCK=max(16, meta["BLOCK"] // 4), SP=triton.next_power_of_2(weight.shape[1] * weight.shape[2]))


def forward(x: Tensor, offset: Tensor, weight: Tensor, K: int, s, p, d) -> Tensor:
    """The forward kernel: x (B, C, H, W), offset (B, G, K², 2, Ho, Wo), weight (C, S_h, S_w); geometry as pairs."""
    B, C, H, W = x.shape
    G, Ho, Wo = offset.shape[1], *offset.shape[-2:]
    weight = weight.contiguous()
    out = _empty(x, (B, C, Ho, Wo), x.dtype)
    meta = _meta(x, weight, K, s, d, G, Ho * Wo)
    ncb = triton.cdiv(C // G, meta["CPB"])
    with _device(x):
        wrap_triton(_forward_kernel)[(B * G * ncb * triton.cdiv(Ho * Wo, meta["BLOCK"]),)](
            x, offset, weight, out, G, C // G, ncb, H, W, Ho, Wo, *p, *x.stride(), *offset.stride(),
            *out.stride(), **meta)
    return out


def backward(grad_out: Tensor, x: Tensor, offset: Tensor, weight: Tensor, K: int, s, p, d, need) -> list:
    """Gradients of x, offset and weight (None where `need` says so): grad x by a gather kernel, grad offset
    by one kernel, grad weight by one kernel and a sum over its (splits, C, S_h, S_w) partial buffer."""
    B, C, H, W = x.shape
    G, Ho, Wo = offset.shape[1], *offset.shape[-2:]
    weight = weight.contiguous()
    grads = [None] * 3
    with _device(x):
        if need[0]:
            meta = _meta(x, weight, K, s, d, G, H * W)
            ncb = triton.cdiv(C // G, meta["CPB"])
            gx = grads[0] = _empty(x, x.shape, x.dtype)
            wrap_triton(_grad_x_kernel)[(B * G * ncb * triton.cdiv(H * W, meta["BLOCK"]),)](
                grad_out, offset, weight, gx, G, C // G, ncb, H, W, Ho, Wo, *p, *grad_out.stride(),
                *offset.stride(), *gx.stride(), **meta)
        if need[1]:
            meta = _meta(x, weight, K, s, d, G, Ho * Wo)
            goff = grads[1] = torch.empty_like(offset)
            wrap_triton(_grad_offset_kernel)[(B * G * triton.cdiv(Ho * Wo, meta["BLOCK"]),)](
                x, grad_out, offset, weight, goff, G, C // G, H, W, Ho, Wo, *p, *x.stride(),
                *grad_out.stride(), *offset.stride(), *goff.stride(), **meta)
        if need[2]:
            meta = _weight_meta(x, weight, K, s, d, G, Ho * Wo)
            ncb = triton.cdiv(C // G, meta["CPB"])
            units = B * triton.cdiv(Ho * Wo, meta["BLOCK"])
            splits, per = reduction_splits(units, G * ncb)
            gw = torch.empty((splits, *weight.shape), dtype=torch.promote_types(x.dtype, torch.float32),
                             device=x.device)
            wrap_triton(_grad_weight_kernel)[(splits * G * ncb,)](
                x, grad_out, offset, gw, G, C // G, ncb, H, W, Ho, Wo, *p, per, units, *x.stride(),
                *grad_out.stride(), *offset.stride(), **meta)
            grads[2] = gw.sum(0).to(weight.dtype)
    return [g if n else None for g, n in zip(grads, need)]


if triton is not None:  # the custom ops: inductor sees the Triton kernels through `wrap_triton`

    @torch.library.triton_op("dynconv::deform_kernel_local_triton", mutates_args=())
    def _op(x: Tensor, offset: Tensor, weight: Tensor, kernel_size: int, stride: list[int], padding: list[int],
            dilation: list[int]) -> Tensor:
        return forward(x, offset, weight, kernel_size, tuple(stride), tuple(padding), tuple(dilation))

    @torch.library.triton_op("dynconv::deform_kernel_local_triton_backward", mutates_args=())
    def _backward_op(grad_out: Tensor, x: Tensor, offset: Tensor, weight: Tensor, kernel_size: int,
                     stride: list[int], padding: list[int], dilation: list[int],
                     need: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
        return absent(backward(grad_out, x, offset, weight, kernel_size, tuple(stride), tuple(padding),
                               tuple(dilation), need), x)

    register_autograd(_op, torch.ops.dynconv.deform_kernel_local_triton_backward)
