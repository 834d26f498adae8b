"""Compile every Triton kernel of the package for sm_90 (H100/H200) without a GPU and print each one's
registers per thread, spills and shared memory as a Markdown table, so that a spilling tile is seen
before device time is spent.

Each kernel is compiled by `triton.compile` from its source (`ASTSource`) for
`GPUTarget("cuda", 90, 32)` with the tile the launcher picks at the shapes below (RedNet-50's four
involution stages at batch 64, K 7, a DDF stage, K 3, and a `dk_local` stage, K 3); `ptxas -v`
(bundled with triton) reports registers and spill bytes, Triton's metadata the shared memory.
Pointers are declared 16-byte aligned (as torch allocations are); integer arguments stay
unspecialised (a launch specialises those equal to 1 or divisible by 16, which can only lower the
counts).

    python scripts/dev/triton_sm90_report.py            # no GPU needed; about a minute on 2 cores
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dynconv.functional import triton_deform_kernel as tdk  # noqa: E402
from dynconv.functional import triton_involution as tinv  # noqa: E402
from dynconv.functional import triton_pixel_filter as tpf  # noqa: E402

BATCH = 64
# RedNet-50 stages: (channels, size); span generator M = C/4, G = C/16 (involution's official defaults)
REDNET_STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]
DDF_STAGE = (256, 56)
# local Deformable Kernels (`dk_local`, K 3, scope 4, one offset group) at RedNet-50's first stage size (the
# tile, and so the compiled kernel, is the same at every stage: 16 channels × 128 pixels)
DK_STAGE = (64, 56)
_TL = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _meta(*shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def configs(dtype: torch.dtype):
    """(label, kernel, constexprs, num_warps, pointer dtypes that differ from `dtype`) as launched."""
    out = []
    # pixel_filter: the unfused involution at RedNet-50 stage 1 (K 7, G 4, no channel filter) and DDF (K 3,
    # one spatial filter per sample and a channel filter, "mul")
    C, S = DDF_STAGE
    for label, x, spatial, channel, K in [
        ("unfused involution 64×56², K 7", _meta(BATCH, 64, 56, 56, dtype=dtype),
         _meta(BATCH, 4, 49, 56, 56, dtype=dtype), None, 7),
        (f"DDF {C}×{S}², K 3", _meta(BATCH, C, S, S, dtype=dtype), _meta(BATCH, 1, 9, S, S, dtype=dtype),
         _meta(BATCH, C, 9, dtype=dtype), 3),
    ]:
        pixels = spatial.shape[-1] * spatial.shape[-2]
        _, meta = tpf._launch(x, spatial, channel, K, (1, 1), (1, 1), "mul", pixels)
        nb, ncb = meta.pop("NB_NCB")
        warps = meta.pop("num_warps")
        part = {} if ncb == 1 else {"gs_ptr": torch.float32}
        out += [(f"pixel_filter fwd, {label}", tpf._forward_kernel, meta, warps, {}),
                (f"pixel_filter grad x, {label}", tpf._grad_x_kernel, meta, warps, {}),
                (f"pixel_filter grad spatial, {label}", tpf._grad_spatial_kernel, meta, warps, part)]
        if channel is not None:
            kkp = tpf.triton.next_power_of_2(K * K)
            block = min(max(16, tpf._TILE // kkp), tpf.triton.next_power_of_2(pixels))
            cmeta = {k: meta[k] for k in ("K", "SH", "SW", "DH", "DW", "MODE", "ACC")}
            out.append((f"pixel_filter grad channel, {label}", tpf._grad_channel_kernel,
                        dict(cmeta, KKP=kkp, BLOCK=block), 8 if kkp * block >= tpf._TILE else 4, {}))
    for C, size in REDNET_STAGES:
        x, K, M, G = _meta(BATCH, C, size, size, dtype=dtype), 7, C // 4, C // 16
        meta = tinv._meta(x, K, (1, 1), (1, 1), tinv.tiles(C, M, G, size * size))
        wmeta = tinv._meta(x, K, (1, 1), (1, 1), tinv.weight_tiles(K, M, size * size))
        warps = meta.pop("num_warps")
        label = f"RedNet-50 {C}×{size}², M {M}, G {G}"
        partials = {"gw_ptr": torch.float32, "gb_ptr": torch.float32}
        out += [(f"involution fwd, {label}", tinv._forward_kernel, meta, warps, {}),
                (f"involution grad x, {label}", tinv._grad_x_kernel, meta, warps, {}),
                (f"involution grad r, {label}", tinv._grad_r_kernel, meta, warps, {}),
                (f"involution grad W2/b2, {label}", tinv._grad_weight_kernel, wmeta, wmeta.pop("num_warps"),
                 partials)]
    C, size = DK_STAGE
    x, weight = _meta(BATCH, C, size, size, dtype=dtype), _meta(C, 4, 4, dtype=dtype)
    meta = tdk._meta(x, weight, 3, (1, 1), (1, 1), 1, size * size)
    warps = meta.pop("num_warps")
    label = f"dk_local {C}×{size}², K 3, scope 4"
    wmeta = tdk._weight_meta(x, weight, 3, (1, 1), (1, 1), 1, size * size)
    out += [(f"deform kernel fwd, {label}", tdk._forward_kernel, meta, warps, {}),
            (f"deform kernel grad x, {label}", tdk._grad_x_kernel, meta, warps, {}),
            (f"deform kernel grad offset, {label}", tdk._grad_offset_kernel, meta, warps, {}),
            (f"deform kernel grad W, {label}", tdk._grad_weight_kernel, wmeta, wmeta.pop("num_warps"),
             {"gw_ptr": torch.float32})]
    return out


def compile_sm90(fn, constexprs: dict, num_warps: int, dtype: torch.dtype, pointer_dtypes: dict):
    """The compiled kernel for sm_90 (no device needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = [p.name for p in fn.params]
    signature = {n: "constexpr" if n in constexprs else
                 ("*" + _TL[pointer_dtypes.get(n, dtype)] if n.endswith("_ptr") else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr")}
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        run = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(path), "-o", str(path) + ".o"],
                             capture_output=True, text=True, check=True)
    log = run.stderr + run.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = (int(v) for v in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, stores, loads


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", nargs="+", choices=sorted(_TL.values()), default=["fp32", "bf16"])
    args = ap.parse_args(argv)
    if tpf.triton is None:
        ap.error("needs the `triton` package")
    if tpf._INTERPRETED:
        ap.error("unset TRITON_INTERPRET: the interpreter replaces the kernels and nothing is compiled")
    print("| kernel | dtype | BLOCK × CPB or taps (MP) | warps | registers | spill stores / loads (B) | shared (B) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.dtypes:
        dtype = next(d for d, n in _TL.items() if n == name)
        for label, fn, constexprs, warps, pointers in configs(dtype):
            kernel = compile_sm90(fn, constexprs, warps, dtype, pointers)
            regs, stores, loads = ptxas_usage(kernel.asm["ptx"])
            tile = " × ".join(str(constexprs[k]) for k in ("BLOCK", "CPB", "KKP") if k in constexprs)
            tile += f" ({constexprs['MP']})" if "MP" in constexprs else ""
            print(f"| {label} | {name} | {tile} | {warps} | {regs} | {stores} / {loads} | "
                  f"{kernel.metadata.shared} |", flush=True)


if __name__ == "__main__":
    main()
