"""A/B of the Triton `pixel_filter` kernels in one process: a previous version of
`dynconv/functional/triton_pixel_filter.py` (a copy of the file, e.g. from `git show`) against the working
tree's, at several (plane tile, warps) settings, timings interleaved, outputs and gradients compared.

    git show 074294b:dynconv/functional/triton_pixel_filter.py > /tmp/old_tpf.py
    python scripts/dev/ab_triton.py --old /tmp/old_tpf.py            # needs a CUDA GPU
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts import bench_ops  # noqa: E402  (bench_ops puts the repository on sys.path)
from scripts.bench_ops import DEFAULT_SHAPES, parse_shape, pixel_filter_forms  # noqa: E402
from dynconv.functional import triton_pixel_filter as new  # noqa: E402

CONFIGS = [(1024, 4), (2048, 4), (4096, 8), (4096, 4)]  # (_PLANE_TILE, _PLANE_WARPS)


def call(mod, inputs):
    """One module's direct entry `pixel_filter` on a form's inputs (K from the filter's taps, centred padding)."""
    x, s, *a = inputs
    K = math.isqrt(s.shape[2])
    return mod.pixel_filter(x, s, a[0] if a else None, kernel_size=K, stride=(1, 1), padding=((K - 1) // 2,) * 2,
                            dilation=(1, 1), combine="mul")


def main(argv=None) -> None:
    import triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="path of the previous triton_pixel_filter.py")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median reported)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    bench_ops.DEVICE = torch.device("cuda")
    spec = importlib.util.spec_from_file_location("old_triton_pixel_filter", args.old)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    default = (new._PLANE_TILE, new._PLANE_WARPS)
    variants = [("old", old, None)] + [(f"{t}/{w}", new, (t, w)) for t, w in CONFIGS]
    print("fwd+bwd ms (forward ms); median over rounds of triton.testing.do_bench medians; "
          "rel. diff: working tree (default setting) vs old, output and gradients")
    print("| shape | form | " + " | ".join(v[0] for v in variants) + " | rel. diff |")
    for shape in map(parse_shape, DEFAULT_SHAPES):
        torch.manual_seed(0)
        for name, _, inputs in pixel_filter_forms(*shape):
            leaves = [t.detach().requires_grad_() for t in inputs]
            out = call(old, leaves)
            go = torch.randn_like(out)
            ref = [out.detach(), *torch.autograd.grad(out, leaves, go)]
            new._PLANE_TILE, new._PLANE_WARPS = default
            out = call(new, leaves)
            got = [out.detach(), *torch.autograd.grad(out, leaves, go)]
            diff = max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref))
            times: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                for tag, mod, cfg in variants:
                    if cfg:
                        new._PLANE_TILE, new._PLANE_WARPS = cfg
                    with torch.no_grad():
                        times.setdefault(tag + "f", []).append(triton.testing.do_bench(
                            lambda: call(mod, inputs), warmup=10, rep=40, return_mode="median"))

                    def fwd_bwd(mod=mod):
                        torch.autograd.grad(call(mod, leaves), leaves, go)
                    times.setdefault(tag + "b", []).append(triton.testing.do_bench(
                        fwd_bwd, warmup=10, rep=40, return_mode="median"))
            m = {k: statistics.median(v) for k, v in times.items()}
            cells = " | ".join(f"{m[v[0] + 'b']:.3f} ({m[v[0] + 'f']:.3f})" for v in variants)
            print(f"| {'x'.join(map(str, shape))} | {name} | {cells} | {diff:.1e} |", flush=True)
    new._PLANE_TILE, new._PLANE_WARPS = default


if __name__ == "__main__":
    main()
