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

    python scripts/bench_ops.py                      # full tables (minutes: the unfold reference is slow)
    python scripts/bench_ops.py --ops involution ddf --shapes 32x64x56x56 --repeat 7
    python scripts/bench_ops.py --quick              # tiny smoke run
    python scripts/bench_ops.py --device cuda        # on a GPU: Triton kernels vs cuDNN and the reference
"""
from __future__ import annotations

import argparse
import contextlib
import gc
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


def run(shapes, ops, repeat: int, log=print) -> list[dict]:
    rows = []

    def add(shape, name, backend, fn):
        try:
            res = fn()
        except Exception as err:  # one broken operator must not hide the others' figures
            res = dict(error=f"{type(err).__name__}: {err}".splitlines()[0][:120])
        rows.append(dict(shape=shape, name=name, backend=backend, **res))
        log(format_row(rows[-1]), file=sys.stderr)

    for b, c, h, w in shapes:
        shape = f"{b}x{c}x{h}x{w}"
        torch.manual_seed(0)
        x = torch.randn(b, c, h, w, device=DEVICE)
        add(shape, "nn.Conv2d 3x3", "-", lambda: measure_module(nn.Conv2d(c, c, 3, padding=1).to(DEVICE), x, repeat))
        add(shape, "depthwise 3x3", "-",
            lambda: measure_module(nn.Conv2d(c, c, 3, padding=1, groups=c).to(DEVICE), x, repeat))
        if "involution" in ops:
            add(shape, "depthwise 7x7", "-",
                lambda: measure_module(nn.Conv2d(c, c, 7, padding=3, groups=c).to(DEVICE), x, repeat))
        for name in ops:
            try:
                same_path = not consults_backend(make_op(name, c, h, w).eval(), x[:1])
            except Exception:  # the timed rows below report the error
                same_path = False
            for backend in ("reference", "fast"):
                def bench(name=name, backend=backend):
                    op = make_op(name, c, h, w)
                    with dynconv.use_backend(backend):
                        return measure_module(op, x, repeat)
                add(shape, name, backend, bench)
                rows[-1]["same_path"] = same_path
            if name == "involution":
                def bench_unfused():
                    op = make_op(name, c, h, w)
                    op.fused = False
                    return measure_module(op, x, repeat)
                add(shape, name, "fast unfused", bench_unfused)
        compiled, _, available = COMPILED[DEVICE.type]
        for name, fn, inputs in pixel_filter_forms(b, c, h, w):
            for label, backend, on in ((compiled, "fast", True), ("fast", "fast", False),
                                       ("reference", "reference", False)):
                def bench(fn=fn, inputs=inputs, backend=backend, on=on):
                    with compiled_enabled(on), dynconv.use_backend(backend):
                        if on and not available(*inputs):
                            raise RuntimeError(f"{compiled} kernel not available on {DEVICE}")
                        return measure_fn(fn, inputs, repeat)
                add(shape, name, label, bench)
    return rows


def format_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['shape']} | {r['name']} | {r['backend']} | error: {r['error']} | | |"
    return f"| {r['shape']} | {r['name']} | {r['backend']} | {r['fwd']:.1f} | {r['fb']:.1f} | {r['mem']:.1f} |"


def markdown(rows: list[dict]) -> str:
    """The table, with each fwd+bwd time also as a ratio to the depthwise conv and to the reference."""
    dw = {r["shape"]: r["fb"] for r in rows if r["name"] == "depthwise 3x3" and "fb" in r}
    ref = {(r["shape"], r["name"]): r for r in rows if r["backend"] == "reference" and "fb" in r}
    lines = ["| shape | operator | backend | fwd ms | fwd+bwd ms | peak MB (fwd+bwd) | fwd+bwd / dw 3x3 "
             "| speed-up vs reference (fwd+bwd) | memory vs reference |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['name']} | {r['backend']} | error: {r['error']} | | | | | |")
            continue
        base = ref.get((r["shape"], r["name"]))
        ratio = f"{r['fb'] / dw[r['shape']]:.2f}" if r["shape"] in dw else ""
        speed = f"{base['fb'] / r['fb']:.1f}x" if base and base is not r else ""
        speed = "same path" if r.get("same_path") and speed else speed
        mem = f"{r['mem'] / base['mem']:.2f}" if base and base is not r and base["mem"] > 0 else ""
        lines.append(f"| {r['shape']} | {r['name']} | {r['backend']} | {r['fwd']:.1f} | {r['fb']:.1f} "
                     f"| {r['mem']:.1f} | {ratio} | {speed} | {mem} |")
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
    print(header())
    print(markdown(run(shapes, ops, repeat)))


if __name__ == "__main__":
    main()
