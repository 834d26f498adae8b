"""Compiled CUDA path of the fused `involution` op: Triton kernels that form the span weights on the
fly (Li et al., "Involution: Inverting the Inherence of Convolution", CVPR 2021, Eqs. 4 and 6).

    w[b, g, k, p] = Σ_m W2[g·K²+k, m] · r[b, m, p] + b2[g·K²+k]
    out[b, c, p]  = Σ_k w[b, g(c), k, p] · x[b, c, p·s − pad + k·d]

No (B, G·K², Ho, Wo) tensor is ever written, forward or backward. Each program holds the (M × pixels)
tile of the reduced features r in registers and, per tap k, forms the row w_k of the span weights
(a dot product over M per pixel) and uses it for a (planes × pixels) tile of the channels of group g,
as `triton_pixel_filter`'s kernels do with a stored filter (whose tile and tap helpers are reused).

Backward, with gw[b, g, k, p] = Σ_{c∈g} grad_out[b, c, p] · x[b, c, tap_k(p)] formed per tap:
  grad_x[b, c, y] = Σ_k grad_out[b, c, p_k(y)] · w[b, g(c), k, p_k(y)]   (a gather over input pixels,
                    the span weights recomputed from r at the output pixels p_k(y) that read y);
  grad_r[b, m, p] = Σ_{g,k} W2[g·K²+k, m] · gw[b, g, k, p]               (one program per (sample, pixel
                    block), summed in registers, stored once);
  grad_W2[g·K²+k, m] = Σ_{b,p} gw · r[b, m, p],   grad_b2[g·K²+k] = Σ_{b,p} gw   (a two-pass reduction:
                    one program per (group, split of the (sample, pixel block) pairs) forms the group's
                    (taps × pixels) tile of gw, sums gw·rᵀ (a dot) and gw over its split in registers and
                    stores one partial per split into a float32 (float64) buffer of splits × the
                    weight's size (`triton_pixel_filter.reduction_splits`: about 512 programs); the
                    caller adds the partials. No atomics: runs are bitwise reproducible).
gw is formed twice, once per kernel: the per-pixel sum over G·K² rows (grad_r) and the sum over pixels
(grad_W2) cannot share one program without a per-program partial of the weight's size, which at
RedNet-50's last stage (G·K²·M ≈ 2·10⁵ per 16 pixels) would dwarf the activations.
Loads are in the tensors' dtype (bf16/fp16 read as such), sums in float32 (float64 for float64),
stores in the tensors' dtype; tensors are addressed through their strides (channels_last and
expanded gradients need no copy). Only the small W2, b2 are made contiguous.

`available(...)` follows `triton_pixel_filter.available`: CUDA tensors, or CPU tensors under Triton's
interpreter with `DYNCONV_TRITON_INTERPRET=1`; `DYNCONV_TRITON=0` switches it off.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.library import wrap_triton

from .library import absent, as_input, register_autograd
from .triton_pixel_filter import _acc_tl, _device, _empty, launchable, reduction_splits, triton

if triton is not None:
    import triton.language as tl

    from .triton_pixel_filter import _program, _rows, _tap_offsets

# Tile budgets in elements (per program, 4 warps): planes × pixels of the x / grad_out tile, and
# M × pixels of the r tile (the span-gradient kernel also holds grad_r's tile of that size).
_PLANE_TILE, _R_TILE, _WARPS = 2048, 2048, 4
_CHANNELS_PER_PROGRAM = int(os.environ.get("DYNCONV_TRITON_CPB", "16"))


def available(x: Tensor, reduced: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """True when these kernels can serve the inputs: triton present and enabled, one floating dtype
    and one device, CUDA (or CPU under the interpreter opt-in), per-sample offsets within 32 bits."""
    return launchable((x, reduced, weight, bias), (x, reduced))


if triton is not None:

    @triton.jit
    def _span_row(w_ptr, b_ptr, row, M, m, mm, rt, ACC: tl.constexpr):
        """w[row, p] = Σ_m W2[row, m] · r[m, p] + b2[row] over the (MP × BLOCK) tile `rt` of r."""
        wrow = tl.load(w_ptr + row * M + m, mask=mm, other=0.0).to(ACC)
        return tl.sum(wrow[:, None] * rt, axis=0) + tl.load(b_ptr + row).to(ACC)

    @triton.jit
    def _forward_kernel(x_ptr, r_ptr, w_ptr, b_ptr, o_ptr, G, CG, NCB, M, H, W, Ho, Wo, ph, pw,
                        sxb, sxc, sxh, sxw, srb, src, srh, srw, sob, soc, soh, sow,
                        K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                        DW: tl.constexpr, BLOCK: tl.constexpr, CPB: tl.constexpr, MP: tl.constexpr,
                        ACC: tl.constexpr):
        """A (planes × pixels) tile of group g's channels: r's tile is loaded once, and per tap the span
        row is formed from it and applied to every plane."""
        b, g, cb, offs = _program(Ho * Wo, G, NCB, BLOCK)
        _, c, rv = _rows(b, g, cb, CG, 1, CPB)
        pm = offs < Ho * Wo
        i, j = offs // Wo, offs % Wo
        m = tl.arange(0, MP)
        mm = m < M
        rt = tl.load(r_ptr + b * srb + (m * src)[:, None] + (i * srh + j * srw)[None, :],
                     mask=mm[:, None] & pm[None, :], other=0.0).to(ACC)
        xrow = (b * sxb + c * sxc)[:, None]
        acc = tl.zeros((CPB, BLOCK), dtype=ACC)
        for k in range(K * K):
            w = _span_row(w_ptr, b_ptr, g * K * K + k, M, m, mm, rt, ACC)
            xoff, xm = _tap_offsets(i, j, pm, k, H, W, ph, pw, sxh, sxw, K, SH, SW, DH, DW)
            xv = tl.load(x_ptr + xrow + xoff[None, :], mask=rv[:, None] & xm[None, :], other=0.0).to(ACC)
            acc += xv * w[None, :]
        tl.store(o_ptr + (b * sob + c * soc)[:, None] + (i * soh + j * sow)[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=rv[:, None] & pm[None, :])

    @triton.jit
    def _grad_x_kernel(go_ptr, r_ptr, w_ptr, b_ptr, gx_ptr, G, CG, NCB, M, H, W, Ho, Wo, ph, pw,
                       sgb, sgc, sgh, sgw, srb, src, srh, srw, sxb, sxc, sxh, sxw,
                       K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                       DW: tl.constexpr, BLOCK: tl.constexpr, CPB: tl.constexpr, MP: tl.constexpr,
                       ACC: tl.constexpr):
        """Over input pixels (y, z): tap k was read by output (i, j) with i = (y + ph − kh·dh) / sh when
        that is a whole number in [0, Ho) (likewise j); the span row is formed from r at those pixels."""
        b, g, cb, offs = _program(H * W, G, NCB, BLOCK)
        _, c, rv = _rows(b, g, cb, CG, 1, CPB)
        pm = offs < H * W
        y, z = offs // W, offs % W
        m = tl.arange(0, MP)
        mm = m < M
        gorow = (b * sgb + c * sgc)[:, None]
        acc = tl.zeros((CPB, BLOCK), dtype=ACC)
        for k in range(K * K):
            th = y + ph - (k // K) * DH
            tw = z + pw - (k % K) * DW
            i, j = tl.maximum(th, 0) // SH, tl.maximum(tw, 0) // SW
            om = pm & (th >= 0) & (tw >= 0) & (th % SH == 0) & (tw % SW == 0) & (i < Ho) & (j < Wo)
            rk = tl.load(r_ptr + b * srb + (m * src)[:, None] + (i * srh + j * srw)[None, :],
                         mask=mm[:, None] & om[None, :], other=0.0).to(ACC)
            w = _span_row(w_ptr, b_ptr, g * K * K + k, M, m, mm, rk, ACC)
            go = tl.load(go_ptr + gorow + (i * sgh + j * sgw)[None, :], mask=rv[:, None] & om[None, :],
                         other=0.0).to(ACC)
            acc += go * w[None, :]
        tl.store(gx_ptr + (b * sxb + c * sxc)[:, None] + (y * sxh + z * sxw)[None, :],
                 acc.to(gx_ptr.dtype.element_ty), mask=rv[:, None] & pm[None, :])

    @triton.jit
    def _grad_r_kernel(x_ptr, go_ptr, w_ptr, gr_ptr, G, CG, M, H, W, Ho, Wo, ph, pw,
                       sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sqb, sqc, sqh, sqw,
                       K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                       DW: tl.constexpr, BLOCK: tl.constexpr, CPB: tl.constexpr, MP: tl.constexpr,
                       ACC: tl.constexpr):
        """One (sample, pixel block) per program, over every group, channel chunk and tap: gw_k from the
        (planes × pixels) tiles, then grad_r's tile += W2[:, row] gw_k in registers, stored once."""
        pid = tl.program_id(0)
        nblk = tl.cdiv(Ho * Wo, BLOCK)
        b = (pid // nblk).to(tl.int64)
        offs = (pid % nblk) * BLOCK + tl.arange(0, BLOCK)
        pm = offs < Ho * Wo
        i, j = offs // Wo, offs % Wo
        m = tl.arange(0, MP)
        mm = m < M
        gr = tl.zeros((MP, BLOCK), dtype=ACC)
        n = tl.arange(0, CPB)
        for g in range(G):
            for c0 in range(0, CG, CPB):
                rv = c0 + n < CG
                c = (g * CG + c0 + n).to(tl.int64)
                go = tl.load(go_ptr + (b * sgb + c * sgc)[:, None] + (i * sgh + j * sgw)[None, :],
                             mask=rv[:, None] & pm[None, :], other=0.0).to(ACC)
                xrow = (b * sxb + c * sxc)[:, None]
                for k in range(K * K):
                    xoff, xm = _tap_offsets(i, j, pm, k, H, W, ph, pw, sxh, sxw, K, SH, SW, DH, DW)
                    xv = tl.load(x_ptr + xrow + xoff[None, :], mask=rv[:, None] & xm[None, :],
                                 other=0.0).to(ACC)
                    gwk = tl.sum(go * xv, axis=0)
                    w = tl.load(w_ptr + (g * K * K + k) * M + m, mask=mm, other=0.0).to(ACC)
                    gr += w[:, None] * gwk[None, :]
        tl.store(gr_ptr + b * sqb + (m * sqc)[:, None] + (i * sqh + j * sqw)[None, :],
                 gr.to(gr_ptr.dtype.element_ty), mask=mm[:, None] & pm[None, :])

    @triton.jit
    def _grad_weight_kernel(x_ptr, go_ptr, r_ptr, gw_ptr, gb_ptr, G, CG, M, H, W, Ho, Wo, ph, pw, UPS, NU,
                            sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, srb, src, srh, srw,
                            K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                            DW: tl.constexpr, BLOCK: tl.constexpr, KKP: tl.constexpr, MP: tl.constexpr,
                            ACC: tl.constexpr):
        """Program (split s, group g), over split s's UPS (sample, pixel block) units: the group's span-weight
        gradient as a (taps × pixels) tile gw[k, p] = Σ_{c∈g} grad_out[c, p] · x[c, tap_k(p)], then
        grad_W2's rows += gw · rᵀ (a dot) and grad_b2's += Σ_p gw, in registers; the (K² × M) and (K²)
        partials are stored once, at row s of the buffers."""
        pid = tl.program_id(0)
        g, s = pid % G, pid // G
        nblk = tl.cdiv(Ho * Wo, BLOCK)
        k = tl.arange(0, KKP)
        m = tl.arange(0, MP)
        mm = m < M
        acc_w = tl.zeros((KKP, MP), dtype=ACC)
        acc_b = tl.zeros((KKP,), dtype=ACC)
        for u in range(s * UPS, tl.minimum(s * UPS + UPS, NU)):
            b = (u // nblk).to(tl.int64)
            offs = (u % nblk) * BLOCK + tl.arange(0, BLOCK)
            pm = offs < Ho * Wo
            i, j = offs // Wo, offs % Wo
            xoff, xm = _tap_offsets(i[None, :], j[None, :], pm[None, :], k[:, None], H, W, ph, pw, sxh, sxw,
                                    K, SH, SW, DH, DW)
            gw = tl.zeros((KKP, BLOCK), dtype=ACC)
            for n in range(CG):
                c = (g * CG + n).to(tl.int64)
                go = tl.load(go_ptr + b * sgb + c * sgc + i * sgh + j * sgw, mask=pm, other=0.0).to(ACC)
                gw += tl.load(x_ptr + b * sxb + c * sxc + xoff, mask=xm, other=0.0).to(ACC) * go[None, :]
            rt = tl.load(r_ptr + b * srb + (m * src)[:, None] + (i * srh + j * srw)[None, :],
                         mask=mm[:, None] & pm[None, :], other=0.0).to(ACC)
            acc_w = tl.dot(gw, tl.trans(rt), acc_w, input_precision="ieee")
            acc_b += tl.sum(gw, axis=1)
        km = k < K * K
        row = s.to(tl.int64) * G * K * K + g * K * K + k
        tl.store(gw_ptr + (row * M)[:, None] + m[None, :], acc_w, mask=km[:, None] & mm[None, :])
        tl.store(gb_ptr + row, acc_b, mask=km)


def tiles(C: int, M: int, groups: int, pixels: int) -> dict:
    """Compile-time tile of the kernels: CPB planes of a group (a power of two, at most
    DYNCONV_TRITON_CPB) × BLOCK pixels, with the (MP × BLOCK) tile of r within `_R_TILE`."""
    cpb = max(2, min(triton.next_power_of_2(_CHANNELS_PER_PROGRAM), triton.next_power_of_2(C // groups)))
    mp = max(2, triton.next_power_of_2(M))
    block = max(16, min(_PLANE_TILE // cpb, _R_TILE // mp, triton.next_power_of_2(pixels)))
    return dict(BLOCK=block, CPB=cpb, MP=mp)


def weight_tiles(K: int, M: int, pixels: int) -> dict:
    """Compile-time tile of the grad W2/b2 kernel: its (KKP × MP) sums in registers set the warps (8 from
    4096 elements), and the pixel block is 4 per warp (16 or 32): 80–182 registers and no spills at
    RedNet-50's four stages (ptxas sm_90), where 4 warps at the last stage need 254 and twice the block spills."""
    kkp, mp = triton.next_power_of_2(K * K), max(2, triton.next_power_of_2(M))
    warps = 8 if kkp * mp >= 4096 else 4
    return dict(BLOCK=max(16, min(4 * warps, triton.next_power_of_2(pixels))), KKP=kkp, MP=mp, num_warps=warps)


def _meta(x: Tensor, K: int, s, d, tile: dict) -> dict:
    return dict(dict(K=K, SH=s[0], SW=s[1], DH=d[0], DW=d[1], ACC=_acc_tl(x.dtype), num_warps=_WARPS), **tile)


def forward(x: Tensor, reduced: Tensor, weight: Tensor, bias: Tensor, K: int, s, p, d, groups: int) -> Tensor:
    """The forward kernel (weight as (G·K², M); geometry as pairs)."""
    B, C, H, W = x.shape
    M, Ho, Wo = reduced.shape[1:]
    weight, bias = weight.contiguous(), bias.contiguous()
    out = _empty(x, (B, C, Ho, Wo), x.dtype)
    meta = _meta(x, K, s, d, tiles(C, M, groups, Ho * Wo))
    ncb = triton.cdiv(C // groups, meta["CPB"])
    grid = (B * groups * ncb * triton.cdiv(Ho * Wo, meta["BLOCK"]),)
    with _device(x):
        wrap_triton(_forward_kernel)[grid](
            x, reduced, weight, bias, out, groups, C // groups, ncb, M, H, W, Ho, Wo, *p, *x.stride(),
            *reduced.stride(), *out.stride(), **meta)
    return out


def backward(grad_out: Tensor, x: Tensor, reduced: Tensor, weight: Tensor, bias: Tensor, K: int, s, p, d,
             groups: int, need) -> list:
    """Gradients of x, reduced, weight (as (G·K², M)) and bias; None where `need` says so. Grad x and grad r
    come from a kernel each, grad W2 and b2 from one kernel, run when either is needed, and a sum over its
    float32 (float64) partial buffers of (splits, G·K², M) and (splits, G·K²) (`reduction_splits`)."""
    B, C, H, W = x.shape
    M, Ho, Wo = reduced.shape[1:]
    weight, bias = weight.contiguous(), bias.contiguous()
    grads = [None] * 4
    with _device(x):
        if need[0]:
            meta = _meta(x, K, s, d, tiles(C, M, groups, H * W))
            ncb = triton.cdiv(C // groups, meta["CPB"])
            gx = grads[0] = _empty(x, x.shape, x.dtype)
            wrap_triton(_grad_x_kernel)[(B * groups * ncb * triton.cdiv(H * W, meta["BLOCK"]),)](
                grad_out, reduced, weight, bias, gx, groups, C // groups, ncb, M, H, W, Ho, Wo, *p,
                *grad_out.stride(), *reduced.stride(), *gx.stride(), **meta)
        if need[1]:
            meta = _meta(x, K, s, d, tiles(C, M, groups, Ho * Wo))
            gr = grads[1] = _empty(reduced, reduced.shape, reduced.dtype)
            wrap_triton(_grad_r_kernel)[(B * triton.cdiv(Ho * Wo, meta["BLOCK"]),)](
                x, grad_out, weight, gr, groups, C // groups, M, H, W, Ho, Wo, *p,
                *x.stride(), *grad_out.stride(), *gr.stride(), **meta)
        if need[2] or need[3]:
            meta = _meta(x, K, s, d, weight_tiles(K, M, Ho * Wo))
            units = B * triton.cdiv(Ho * Wo, meta["BLOCK"])
            splits, per = reduction_splits(units, groups)
            acc = torch.promote_types(x.dtype, torch.float32)
            gw = torch.empty((splits, *weight.shape), dtype=acc, device=x.device)
            gb = torch.empty((splits, *bias.shape), dtype=acc, device=x.device)
            wrap_triton(_grad_weight_kernel)[(splits * groups,)](
                x, grad_out, reduced, gw, gb, groups, C // groups, M, H, W, Ho, Wo, *p, per, units,
                *x.stride(), *grad_out.stride(), *reduced.stride(), **meta)
            grads[2:] = [as_input(gw.sum(0), weight), as_input(gb.sum(0), bias)]  # the parameters' own strides
    return [g if n else None for g, n in zip(grads, need)]


if triton is not None:  # the custom ops: inductor sees the Triton kernels through `wrap_triton`

    @torch.library.triton_op("dynconv::involution_triton", mutates_args=())
    def _op(x: Tensor, reduced: Tensor, weight: Tensor, bias: Tensor, kernel_size: int, stride: list[int],
            padding: list[int], dilation: list[int], groups: int) -> Tensor:
        return forward(x, reduced, weight, bias, kernel_size, tuple(stride), tuple(padding), tuple(dilation),
                       groups)

    @torch.library.triton_op("dynconv::involution_triton_backward", mutates_args=())
    def _backward_op(grad_out: Tensor, x: Tensor, reduced: Tensor, weight: Tensor, bias: Tensor,
                     kernel_size: int, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                     need: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return absent(backward(grad_out, x, reduced, weight, bias, kernel_size, tuple(stride), tuple(padding),
                               tuple(dilation), groups, need), x)

    register_autograd(_op, torch.ops.dynconv.involution_triton_backward, tensors=4)
