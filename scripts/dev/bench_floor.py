"""GPU operator tables for the device run: the fused involution against its memory floor, and `dk_local`
against a depthwise conv, at RedNet-50's four stage shapes (C 64 at 56², 128 at 28², 256 at 14², 512 at 7²).

`--table floor`: the fused involution op (`dynconv.functional.involution`: Triton on CUDA) forward, and its
backward op alone, with M = C/4, G = C/16, K 7 (the official RedNet defaults). "bytes" is the least traffic
the pass can have: every input read once and every output written once (forward: x, r, W2, b2 → out;
backward: grad_out, x, r, W2, b2 → grad x, r, W2, b2). "× floor" is the measured time over bytes / the
device's copy bandwidth, itself measured here (a 1 GiB device-to-device `copy_`, read + write).

`--table dk`: the `dk_local` operator module (3×3) fwd+bwd against `nn.Conv2d` depthwise 3×3 fwd+bwd (bf16:
float32 modules under bfloat16 autocast).

    python scripts/dev/bench_floor.py --device cuda --table floor dk --batch 64
    python scripts/dev/bench_floor.py --device cpu --batch 1 --repeat 1 --table dk     # a smoke run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts import bench_ops  # noqa: E402  (bench_ops puts the repository on sys.path)
from scripts.bench_ops import header, median_ms  # noqa: E402
from dynconv.functional.involution import involution  # noqa: E402

STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
K = 7


def copy_bandwidth(repeat: int) -> float:
    """Bytes per second of a device-to-device copy (read + write) of 1 GiB (a few MiB on CPU)."""
    n = 2**28 if bench_ops.DEVICE.type == "cuda" else 2**20
    src = torch.empty(n, dtype=torch.float32, device=bench_ops.DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (median_ms(lambda: dst.copy_(src), repeat) / 1e3)


def floor_rows(batch: int, dtype: torch.dtype, repeat: int, bandwidth: float):
    for C, size in STAGES:
        M, G = C // 4, C // 16
        dev = bench_ops.DEVICE
        x = torch.randn(batch, C, size, size, device=dev, dtype=dtype)
        r = torch.randn(batch, M, size, size, device=dev, dtype=dtype)
        w, b = torch.randn(G * K * K, M, device=dev, dtype=dtype), torch.randn(G * K * K, device=dev, dtype=dtype)
        go = torch.randn_like(x)
        geometry = (K, [1, 1], [K // 2] * 2, [1, 1], G)

        def forward():
            return involution(x, r, w, b, kernel_size=K, groups=G)

        backward_op = torch.ops.dynconv.involution_triton_backward if x.is_cuda else \
            torch.ops.dynconv.involution_backward

        def backward():
            return backward_op(go, x, r, w, b, *geometry, [True] * 4)

        size_of = sum(t.nbytes for t in (x, r, w, b))
        for name, fn, nbytes in (("forward", forward, size_of + go.nbytes),
                                 ("backward", backward, 2 * size_of + go.nbytes)):
            ms = median_ms(fn, repeat)
            yield (f"| involution {name} | {batch}×{C}×{size}² | {ms:.3f} | {nbytes / 1e6:.1f} "
                   f"| {nbytes / ms / 1e6:.1f} | {ms / (nbytes / bandwidth * 1e3):.2f} |")


def dk_rows(batch: int, dtype: torch.dtype, repeat: int):
    """fwd+bwd of float32 modules, under bfloat16 autocast for bf16 (as the models train)."""
    dev = bench_ops.DEVICE
    for C, size in STAGES:
        x = torch.randn(batch, C, size, size, device=dev).requires_grad_()
        modules = {"dk_local": bench_ops.make_op("dk_local", C, size, size),
                   "depthwise 3×3": nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False).to(dev)}
        times = {}
        for name, module in modules.items():
            module.train()

            def step(module=module):
                x.grad = None
                module.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    out = module(x)
                out.float().sum().backward()

            times[name] = median_ms(step, repeat)
        yield (f"| {batch}×{C}×{size}² | {times['dk_local']:.3f} | {times['depthwise 3×3']:.3f} "
               f"| {times['dk_local'] / times['depthwise 3×3']:.2f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--table", nargs="+", choices=("floor", "dk"), default=["floor", "dk"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per entry (median reported)")
    args = ap.parse_args(argv)
    bench_ops.DEVICE = torch.device(args.device)
    if bench_ops.DEVICE.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch")
    print(header())
    if "floor" in args.table:
        bandwidth = copy_bandwidth(args.repeat)
        print(f"\ncopy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
        for name in args.dtypes:
            print(f"\n{name}\n\n| op | shape | ms | bytes (MB) | GB/s | × floor |\n|---|---|---:|---:|---:|---:|")
            for row in floor_rows(args.batch, DTYPES[name], args.repeat, bandwidth):
                print(row, flush=True)
    if "dk" in args.table:
        for name in args.dtypes:
            print(f"\n{name}, fwd+bwd\n\n| shape | dk_local ms | depthwise 3×3 ms | × depthwise |\n"
                  "|---|---:|---:|---:|")
            for row in dk_rows(args.batch, DTYPES[name], args.repeat):
                print(row, flush=True)


if __name__ == "__main__":
    main()
