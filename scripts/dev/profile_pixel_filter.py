"""Where a `pixel_filter` training pass spends its time: torch.profiler over forward + backward of the
involution, DDF and TVConv forms (the shapes of `bench_ops.py`), one table of the busiest kernels each.

    python scripts/dev/profile_pixel_filter.py --device cuda            # Triton kernels, by kernel name
    python scripts/dev/profile_pixel_filter.py --shapes 32x256x14x14    # CPU: the native kernel's ops
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts import bench_ops  # noqa: E402  (bench_ops puts the repository on sys.path)
from scripts.bench_ops import DEFAULT_SHAPES, parse_shape, pixel_filter_forms  # noqa: E402


def profile_form(fn, inputs, steps: int, row_limit: int) -> str:
    leaves = [t.detach().requires_grad_() for t in inputs]

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).sum().backward()

    for _ in range(2):  # compile and warm up outside the profile
        step()
    bench_ops._sync()
    cuda = bench_ops.DEVICE.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        bench_ops._sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit, max_name_column_width=60)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=None)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=5, help="profiled fwd+bwd passes per form")
    ap.add_argument("--rows", type=int, default=8, help="kernels listed per form")
    args = ap.parse_args(argv)
    bench_ops.DEVICE = torch.device(args.device)
    print(bench_ops.header())
    for b, c, h, w in args.shapes or [parse_shape(s) for s in DEFAULT_SHAPES]:
        torch.manual_seed(0)
        for name, fn, inputs in pixel_filter_forms(b, c, h, w):
            print(f"\n## {b}x{c}x{h}x{w} {name}: {args.steps} fwd+bwd passes")
            print(profile_form(fn, inputs, args.steps, args.rows))


if __name__ == "__main__":
    main()
