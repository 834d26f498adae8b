"""Operator benchmark: every registered operator, both primitive backends, side by side (issues 3, 6).

For each shape (default: the four RedNet-50 stage shapes at batch 32: C=64 56x56, C=128 28x28,
C=256 14x14, C=512 7x7) it measures, in one run:
- every operator of `dynconv.list_ops()` (or `--ops`) under the "reference" and "fast" backends,
  with its official kernel size (involution 7, the rest 3); an operator that calls no primitive
  (conv, DCD, DCN, ...) runs the same code under both, so its speed-up column reads "same path";
- `nn.Conv2d` 3x3 and depthwise 3x3 as baselines, and depthwise 7x7 with involution, whose module also
  runs unfused ("fast unfused": `conv2` then `pixel_filter`, `Involution.fused = False`);
- the raw `pixel_filter` in its involution (G = C/16, K 7), DDF (G 1 + channel filter, K 3) and
  TVConv (filter shared by the batch, G = C, K 3) forms, with the compiled kernel (on CPU "native",
  the C++ kernel; on CUDA "triton", the Triton kernels), the pure-PyTorch fast path ("fast",
  DYNCONV_NATIVE=0 / DYNCONV_TRITON=0) and the unfold reference.

Times are medians over `--repeat` runs after one warm-up: "fwd" is inference (eval mode, no grad),
"fwd+bwd" a training pass (train mode, forward, `out.sum().backward()`, parameter grads cleared
first). "peak MB" is the peak extra memory of one fwd+bwd pass: on CPU the high-water mark of the
running sum of the CPU allocator's allocations and frees, as recorded by `torch.profiler` with
`profile_memory=True` (inputs that exist before the pass are not counted; outputs, saved tensors
and gradients are; thread-local scratch of the compiled kernel, below 1 MB per thread, is not); on
CUDA `max_memory_allocated` above what was allocated before the pass. On CUDA every timed call is
bracketed by `torch.cuda.synchronize()`, the warm-up call pays the Triton compile, and the
baselines are cuDNN's.

Each row is announced on stderr as it starts ("[i/N, elapsed s] shape operator (backend) ...") and
printed when measured; the table follows on stdout. "/ depthwise KxK" compares a row with the
depthwise conv of its own kernel size (7 for involution, 3 otherwise).

    python scripts/bench_ops.py                      # full tables (long: every operator, 4 shapes, the unfold reference)
    python scripts/bench_ops.py --ops involution ddf --shapes 32x64x56x56 --repeat 7
    python scripts/bench_ops.py --ops involution dk_local --shapes 32x64x56x56 --backends fast --modules-only
    python scripts/bench_ops.py --quick              # tiny smoke run
    python scripts/bench_ops.py --device cuda        # on a GPU: Triton kernels vs cuDNN and the reference
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynconv  # noqa: E402
from dynconv.functional import backend as backend_lib, native, triton_pixel_filter  # noqa: E402
from dynconv.functional.pixel_filter import pixel_filter  # noqa: E402

DEFAULT_SHAPES = ["32x64x56x56", "32x128x28x28", "32x256x14x14", "32x512x7x7"]
KERNEL_SIZE = {"involution": 7}  # official kernel sizes; every other operator replaces a 3x3 conv


DEVICE = torch.device("cpu")  # set by --device


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def median_ms(fn, repeat: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in milliseconds over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    gc.collect()
    gc.disable()  # as timeit does: no collector pauses inside the timed calls
    try:
        times = []
        for _ in range(repeat):
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return 1e3 * statistics.median(times)


def paired_ms(fns, repeat: int, warmup: int = 1, settle: int = 0) -> list[list[float]]:
    """Wall times in milliseconds of `repeat` rounds in which every fn in `fns` runs once, in turn (after
    `warmup` such rounds): a drift of the machine then hits each alike, and round i's times pair up. With
    `settle`, each timed call follows that many untimed calls of the same fn, which absorb the switch from the
    previous fn (another engine's worker threads still spinning, or parked and cold)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    gc.collect()
    gc.disable()
    try:
        times = [[] for _ in fns]
        for _ in range(repeat):
            for fn, out in zip(fns, times):
                for _ in range(settle):
                    fn()
                _sync()
                t0 = time.perf_counter()
                fn()
                _sync()
                out.append(1e3 * (time.perf_counter() - t0))
    finally:
        gc.enable()
    return times


def median_ci(values, level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of `values` (order statistics: the
    largest k with P(Binomial(n, ½) < k) ≤ (1 − level)/2 gives (v_(k), v_(n+1−k))); with too few
    values for `level`, the whole range."""
    v, n = sorted(values), len(values)
    tail, k, cdf = (1 - level) / 2, 0, 0.0
    while k < n // 2:
        cdf += math.comb(n, k) / 2**n  # P(Binomial < k + 1)
        if cdf > tail:
            break
        k += 1
    k = max(k, 1)
    return v[k - 1], v[n - k]


def peak_extra_mb(fn, clear=None) -> float:
    """Peak extra memory of `fn()` in MB (CPU: allocator events recorded by torch.profiler; CUDA: the
    caching allocator's peak above what was allocated before, after `clear()` dropped the gradients
    that an earlier call left, which `fn` would free and count against its own allocations)."""
    from torch.profiler import ProfilerActivity, profile

    if DEVICE.type == "cuda":
        if clear is not None:
            clear()
        _sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        fn()
        _sync()
        return (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


# the compiled kernel of each device: (row label, environment switch, availability check)
COMPILED = {"cpu": ("native", "DYNCONV_NATIVE", native.available),
            "cuda": ("triton", "DYNCONV_TRITON", triton_pixel_filter.available)}


@contextlib.contextmanager
def compiled_enabled(on: bool):
    """Switch this device's compiled kernel on or off (DYNCONV_NATIVE / DYNCONV_TRITON) inside the block."""
    var = COMPILED[DEVICE.type][1]
    prev = os.environ.get(var)
    os.environ[var] = "1" if on else "0"
    try:
        yield
    finally:
        if prev is None:
            del os.environ[var]
        else:
            os.environ[var] = prev


def measure_module(module: nn.Module, x: torch.Tensor, repeat: int) -> dict:
    """fwd (eval, no grad), fwd+bwd (train) medians and the fwd+bwd peak memory of `module(x)`."""
    xg = x.detach().requires_grad_()

    def clear():
        module.zero_grad(set_to_none=True)
        xg.grad = None

    def train_step():
        clear()
        module(xg).sum().backward()

    def infer():
        with torch.no_grad():
            module(x)

    module.eval()
    fwd = median_ms(infer, repeat)
    module.train()
    fb = median_ms(train_step, repeat)
    return dict(fwd=fwd, fb=fb, mem=peak_extra_mb(train_step, clear))


def measure_fn(fn, inputs: list[torch.Tensor], repeat: int) -> dict:
    """As `measure_module` for a function of tensors (all of which get gradients)."""
    leaves = [t.detach().requires_grad_() for t in inputs]

    def clear():
        for t in leaves:
            t.grad = None

    def train_step():
        clear()
        fn(*leaves).sum().backward()

    def infer():
        with torch.no_grad():
            fn(*inputs)

    return dict(fwd=median_ms(infer, repeat), fb=median_ms(train_step, repeat),
                mem=peak_extra_mb(train_step, clear))


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = [int(v) for v in text.lower().split("x")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be BxCxHxW, e.g. 32x64x56x56")
    return tuple(parts)


def make_op(name: str, c: int, h: int, w: int) -> nn.Module:
    kwargs = {"input_size": (h, w)} if "input_size" in dynconv.op_options(name) else {}
    return dynconv.create_op(name, c, c, KERNEL_SIZE.get(name, 3), **kwargs).to(DEVICE)


def consults_backend(op: nn.Module, x: torch.Tensor) -> bool:
    """Whether `op(x)` reaches a primitive's backend choice; if not, both backends time the same code."""
    code, calls = backend_lib.resolve.__code__, []

    def profile(frame, event, _arg):
        if event == "call" and frame.f_code is code:
            calls.append(frame)

    sys.setprofile(profile)
    try:
        with torch.no_grad():
            op(x)
    finally:
        sys.setprofile(None)
    return bool(calls)


def pixel_filter_forms(b: int, c: int, h: int, w: int):
    """(name, fn, inputs) for the involution, DDF and TVConv forms of the raw primitive."""
    g = max(c // 16, 1)
    randn = lambda *shape: torch.randn(*shape, device=DEVICE)  # noqa: E731
    inv = (randn(b, c, h, w), randn(b, g, 49, h, w))
    ddf = (randn(b, c, h, w), randn(b, 1, 9, h, w), randn(b, c, 9))
    tv = (randn(b, c, h, w), randn(1, c, 9, h, w))
    return [
        (f"pixel_filter involution (G={g}, K=7)", lambda x, s: pixel_filter(x, s, kernel_size=7), list(inv)),
        ("pixel_filter DDF (G=1 + channel, K=3)", lambda x, s, a: pixel_filter(x, s, a, kernel_size=3), list(ddf)),
        ("pixel_filter TVConv (Bs=1, G=C, K=3)", lambda x, s: pixel_filter(x, s, kernel_size=3), list(tv)),
    ]


def depthwise(c: int, k: int) -> nn.Module:
    return nn.Conv2d(c, c, k, padding=k // 2, groups=c).to(DEVICE)


def plan(shapes, ops, repeat: int, backends=("reference", "fast"), primitives: bool = True) -> list[dict]:
    """Every row to measure, in order: per shape the conv baselines (a depthwise conv of each kernel size the
    operators use), each operator module under each backend (and, for one with a `fused` switch, unfused on
    the fast backend), then the raw pixel_filter forms. Each row's `run` returns the measured figures."""
    kernels = sorted({3} | {KERNEL_SIZE.get(name, 3) for name in ops})
    compiled, _, available = COMPILED[DEVICE.type]
    rows = []
    for b, c, h, w in shapes:
        shape = f"{b}x{c}x{h}x{w}"

        def x(b=b, c=c, h=h, w=w):  # the shape's input, made when a row is measured (the same seed for each)
            torch.manual_seed(0)
            return torch.randn(b, c, h, w, device=DEVICE)

        def add(name, backend, k, fn):
            rows.append(dict(shape=shape, name=name, backend=backend, k=k, run=fn))

        add("nn.Conv2d 3x3", "-", 3, lambda c=c, x=x: measure_module(nn.Conv2d(c, c, 3, padding=1).to(DEVICE),
                                                                       x(), repeat))
        for k in kernels:
            add(f"depthwise {k}x{k}", "-", k, lambda c=c, k=k, x=x: measure_module(depthwise(c, k), x(), repeat))
        for name in ops:
            try:
                fused_switch = hasattr(make_op(name, c, h, w), "fused")
            except Exception:  # the timed rows below report the error
                fused_switch = False
            variants = [(backend, True) for backend in backends]
            if fused_switch and "fast" in backends:
                variants.append(("fast unfused", False))
            for label, fused in variants:
                def bench(name=name, backend=label.split()[0], fused=fused, c=c, h=h, w=w, x=x):
                    op, inputs = make_op(name, c, h, w), x()
                    if not fused:
                        op.fused = False
                    same_path = not consults_backend(op.eval(), inputs[:1])
                    with dynconv.use_backend(backend):
                        return dict(measure_module(op, inputs, repeat), same_path=same_path)
                add(name, label, KERNEL_SIZE.get(name, 3), bench)
        if not primitives:
            continue
        for name, fn, inputs in pixel_filter_forms(b, c, h, w):
            k = math.isqrt(inputs[1].shape[2])  # spatial: (B, G, K*K, Ho, Wo)
            for label, backend, on in ((compiled, "fast", True), ("fast", "fast", False),
                                       ("reference", "reference", False)):
                if backend not in backends:
                    continue

                def bench(fn=fn, inputs=inputs, backend=backend, on=on):
                    with compiled_enabled(on), dynconv.use_backend(backend):
                        if on and not available(*inputs):
                            raise RuntimeError(f"{compiled} kernel not available on {DEVICE}")
                        return measure_fn(fn, inputs, repeat)
                add(name, label, k, bench)
    return rows


def run(shapes, ops, repeat: int, log=print, backends=("reference", "fast"), primitives: bool = True) -> list[dict]:
    """Measure the rows of `plan`, logging each as it starts (with its index and the elapsed time) and ends."""
    rows, start = plan(shapes, ops, repeat, backends, primitives), time.perf_counter()
    for i, row in enumerate(rows, 1):
        log(f"[{i}/{len(rows)}, {time.perf_counter() - start:.0f} s] {row['shape']} {row['name']} "
            f"({row['backend']}) ...", file=sys.stderr, flush=True)
        try:
            row.update(row.pop("run")())
        except Exception as err:  # one broken operator must not hide the others' figures
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:120]
        log(format_row(row), file=sys.stderr, flush=True)
    return rows


def format_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['shape']} | {r['name']} | {r['backend']} | error: {r['error']} | | |"
    return f"| {r['shape']} | {r['name']} | {r['backend']} | {r['fwd']:.1f} | {r['fb']:.1f} | {r['mem']:.1f} |"


def markdown(rows: list[dict]) -> str:
    """The table, with each fwd+bwd time and peak memory also as a ratio to the depthwise conv of the row's
    kernel size (K 7 for involution, 3 otherwise) and to the operator's reference backend."""
    dw = {(r["shape"], r["k"]): r for r in rows if r["name"].startswith("depthwise") and "fb" in r}
    ref = {(r["shape"], r["name"]): r for r in rows if r["backend"] == "reference" and "fb" in r}
    lines = ["| shape | operator | backend | fwd ms | fwd+bwd ms | peak MB (fwd+bwd) | fwd+bwd / depthwise KxK "
             "| speed-up vs reference (fwd+bwd) | memory vs reference | peak MB / depthwise KxK |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['name']} | {r['backend']} | error: {r['error']} | | | | | | |")
            continue
        base, conv = ref.get((r["shape"], r["name"])), dw.get((r["shape"], r["k"]))
        ratio = f"{r['fb'] / conv['fb']:.2f}" if conv else ""
        speed = f"{base['fb'] / r['fb']:.1f}x" if base and base is not r else ""
        speed = "same path" if r.get("same_path") and speed else speed
        mem = f"{r['mem'] / base['mem']:.2f}" if base and base is not r and base["mem"] > 0 else ""
        mem_dw = f"{r['mem'] / conv['mem']:.2f}" if conv and conv["mem"] > 0 else ""
        lines.append(f"| {r['shape']} | {r['name']} | {r['backend']} | {r['fwd']:.1f} | {r['fb']:.1f} "
                     f"| {r['mem']:.1f} | {ratio} | {speed} | {mem} | {mem_dw} |")
    return "\n".join(lines)


def header() -> str:
    """The machine and the compiled kernel the run uses (on CPU: whether the C++ build was cached)."""
    if DEVICE.type == "cuda":
        import triton
        return f"torch {torch.__version__}, {torch.cuda.get_device_name(DEVICE)}; triton {triton.__version__}"
    info = native.build_info()
    how = "loaded from cache" if info.get("cached") else "compiled now"
    native_line = (f"native kernel: {how} in {info['seconds']:.2f} s ({info['path']})" if info.get("built")
                   else "native kernel: not available")
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform_cpu()}; {native_line}"


def platform_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                    help="BxCxHxW shapes (default: %s)" % " ".join(DEFAULT_SHAPES))
    ap.add_argument("--ops", nargs="+", default=None, help="operator names (default: all registered)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per entry (median reported)")
    ap.add_argument("--quick", action="store_true", help="tiny shape, 2 repeats, 1 thread: a smoke test")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cpu: native C++ kernel rows; cuda: Triton kernel rows, cuDNN baselines")
    ap.add_argument("--backends", nargs="+", default=["reference", "fast"], choices=("reference", "fast"),
                    help="primitive backends to time (default both; 'fast' alone skips the slow unfold reference)")
    ap.add_argument("--modules-only", action="store_true",
                    help="only the operator modules and the conv baselines, not the raw pixel_filter rows")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch")
    if args.quick:  # tiny ops gain nothing from threads, and waking them dominates on a busy machine
        torch.set_num_threads(1)
    shapes = args.shapes or [parse_shape(s) for s in (["2x16x8x8"] if args.quick else DEFAULT_SHAPES)]
    repeat = 2 if args.quick else args.repeat
    ops = args.ops or dynconv.list_ops()
    for name in ops:
        dynconv.get_op(name)  # an unknown name fails here, listing the known ones
    print(header(), flush=True)
    print(markdown(run(shapes, ops, repeat, backends=args.backends, primitives=not args.modules_only)))


if __name__ == "__main__":
    main()
