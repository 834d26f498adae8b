"""Model benchmark: training step and inference latency of the dynamic-conv backbones (issue 6).

Side by side in one run (float32 on CPU by default; `--device cuda`, `--amp`, `--channels-last`):
ResNet-50, RedNet-50 and DDF-ResNet-50 at 224 (ratios to ResNet-50), and the face MobileNetV2
(depthwise) against its TVConv version, trained and frozen for inference, at 96 (ratios to the
depthwise one); with `--models`, also DDF-ResNet-50 (add) and ResNet-18-DCD (ratio to ResNet-18).
A training step is forward, cross-entropy on random labels over the model's outputs, backward and
an SGD (momentum) step; inference is eval mode under `torch.inference_mode()`. Medians over
`--repeat` steps after one warm-up step, whose time is reported as "first step" (it includes any
one-off cost such as building the compiled kernel). Models come from `timm.create_model(name)` after `import models`; names that are not
registered are listed as missing.

With `--memory` each model (and each compiled variant) runs in a fresh process, which also reports
the peak memory of one training step (after the first, so neither compilation nor the optimizer's
momentum buffers, created in the first step, are counted), side by side with its baseline's. On
CUDA it is `torch.cuda.max_memory_allocated` above what was allocated before the step. On CPU it
is the growth of the resident set: the gradients of the previous step are freed, glibc is asked
to return the pages its freed blocks still hold (`malloc_trim(0)`), the kernel's high-water mark
is reset to the current resident set (`echo 5 > /proc/self/clear_refs`, Linux), and the step's
figure is VmHWM minus that baseline (/proc/self/status). It counts what the system had to
provide: activations kept for backward, gradients, temporaries and any allocator or oneDNN
scratch, not only PyTorch's own tensors.

    python scripts/bench_models.py                 # batch 16, 5 repeats
    python scripts/bench_models.py --quick         # batch 2 at reduced size, 1 repeat: a smoke test
    python scripts/bench_models.py --device cuda --batch 64 --amp --channels-last   # a GPU, as trained there
    python scripts/bench_models.py --compile --size 64 --models RedNet-26 "DDF-ResNet-50 (mul)"   # eager vs compiled
    python scripts/bench_models.py --device cuda --compile default reduce-overhead --models RedNet-26   # + CUDA graphs
    python scripts/bench_models.py --memory --batch 32 --models ResNet-50 RedNet-50 "DDF-ResNet-50 (mul)"
    python scripts/bench_models.py --memory --batch 32 --repeat 3 --rounds 3 --models ResNet-50 RedNet-50
    python scripts/bench_models.py --paired --batch 32 --repeat 15 --models ResNet-50 RedNet-50   # time, in turns
    python scripts/bench_models.py --paired --inference-only --engines eager compile aoti ort --profile --batch 1 \
        --repeat 21 --models ResNet-50 RedNet-50 "DDF-ResNet-50 (mul)"   # deployed: each engine, models in turns
    python scripts/bench_models.py --compile --inference-only --batch 1 --models "DDF-ResNet-50 (add)" ResNet-18-DCD

On CUDA every timed step is bracketed by `torch.cuda.synchronize()`, the pixel_filter operators run
the Triton kernels and the first step includes their compilation (cached by Triton afterwards).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import bench_ops  # also puts the repository on sys.path
from bench_ops import header, median_ci, median_ms, paired_ms


@dataclass
class Spec:
    label: str
    name: str
    size: int  # input resolution
    baseline: str  # label of the row this one's ratio is taken to
    kwargs: dict = field(default_factory=dict)
    frozen: bool = False  # call freeze() on every operator that has it (TVConv) before inference
    default: bool = True  # in the run without --models


SPECS = [
    Spec("ResNet-50", "dynconv_resnet50", 224, "ResNet-50"),
    Spec("RedNet-26", "rednet26", 224, "ResNet-50"),
    Spec("RedNet-50", "rednet50", 224, "ResNet-50"),
    Spec("DDF-ResNet-50 (mul)", "ddf_mul_resnet50", 224, "ResNet-50"),
    Spec("DDF-ResNet-50 (add)", "ddf_add_resnet50", 224, "ResNet-50", default=False),
    Spec("ResNet-18", "dynconv_resnet18", 224, "ResNet-18", default=False),
    Spec("ResNet-18-DCD", "resnet18_dcd", 224, "ResNet-18", default=False),
    Spec("face MobileNetV2 (depthwise)", "face_mobilenetv2_x1_0", 96, "face MobileNetV2 (depthwise)"),
    Spec("face MobileNetV2 + TVConv", "face_mobilenetv2_x1_0", 96, "face MobileNetV2 (depthwise)",
         {"op": "tvconv"}),
    Spec("face MobileNetV2 + TVConv (frozen)", "face_mobilenetv2_x1_0", 96, "face MobileNetV2 (depthwise)",
         {"op": "tvconv"}, frozen=True),
]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def compiled_label(label: str, mode: str) -> str:
    return f"{label}, compiled" + ("" if mode == "default" else f" ({mode})")


def first_ms(fn) -> float:
    """The time of one call of `fn` in milliseconds (the first: it includes any one-off cost)."""
    bench_ops._sync()
    t0 = time.perf_counter()
    fn()
    bench_ops._sync()
    return 1e3 * (time.perf_counter() - t0)


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_mib(fn) -> float:
    """Peak memory growth of one call of `fn` in MiB: CUDA, `max_memory_allocated` above what was allocated
    before; CPU (Linux), the resident set's high-water mark above the resident set before (module docstring)."""
    if bench_ops.DEVICE.type == "cuda":
        bench_ops._sync()
        torch.cuda.reset_peak_memory_stats(bench_ops.DEVICE)
        base = torch.cuda.memory_allocated(bench_ops.DEVICE)
        fn()
        bench_ops._sync()
        return (torch.cuda.max_memory_allocated(bench_ops.DEVICE) - base) / 2**20
    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("--memory on CPU reads /proc/self (Linux); run without --memory here")
    gc.collect()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):  # glibc: hand the pages that freed blocks keep back to the system
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    base = _status_kib("VmHWM")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def build_model(spec: Spec, size: int, fmt=torch.contiguous_format) -> torch.nn.Module:
    """`spec`'s model for `size`² inputs on the benchmark's device (seed 0)."""
    import timm

    kwargs = dict(spec.kwargs, **({"input_size": (size, size)} if size != spec.size else {}))
    torch.manual_seed(0)
    return timm.create_model(spec.name, **kwargs).to(bench_ops.DEVICE, memory_format=fmt)


def training_step(model, x, run=None, autocast=contextlib.nullcontext):
    """(step, optimizer): `step()` is forward (through `run`, default the model), cross-entropy on random labels,
    backward and an SGD (momentum) step; the model is put in training mode."""
    run = run or model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    with autocast():
        n_out = model(x[:2]).shape[1]
    y = torch.randint(0, n_out, (x.shape[0],), device=x.device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        opt.step()

    return step, opt


def bench(spec: Spec, batch: int, repeat: int, size: int, amp: bool = False, channels_last: bool = False,
          compile_mode: str | None = None, memory: bool = False, train: bool = True) -> dict:
    device = bench_ops.DEVICE
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(spec, size, fmt)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    row = dict(label=spec.label, name=spec.name, size=size, baseline=spec.baseline)
    if compile_mode:  # compared with the same model in eager mode, the first of its rows
        row.update(label=compiled_label(spec.label, compile_mode), baseline=spec.label)
    # traced at its first call, so after any freeze(); "reduce-overhead" replays CUDA graphs of the compiled code
    compiled = torch.compile(model, mode=compile_mode) if compile_mode else model

    def run(inputs):
        if compile_mode == "reduce-overhead":  # a new iteration: the previous graph's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(inputs)
    if train and not spec.frozen:
        step, opt = training_step(model, x, run, autocast)
        row["first"] = first_ms(step)
        if memory:  # a step after the first, whose one-off costs (compiling, optimizer state) are not counted
            opt.zero_grad(set_to_none=True)
            row["memory"] = peak_memory_mib(step)
        row["train"] = median_ms(step, repeat, warmup=0)
    model.eval()
    if spec.frozen:
        frozen = [m.freeze() for m in model.modules() if hasattr(m, "freeze")]
        if not frozen:
            raise RuntimeError(f"{spec.name} with {spec.kwargs} has no operator with freeze()")

    def infer():
        with torch.inference_mode(), autocast():
            run(x)

    row["infer"] = median_ms(infer, repeat, warmup=1)
    return row


def paired_table(rows: list[tuple[str, str]], times: dict[str, list[float]], size: int, what: str) -> str:
    """The --paired table: for each (row, its baseline row), the median time and the median of the per-round
    ratios to the baseline (same round) with a distribution-free 95% interval."""
    repeat = len(next(iter(times.values())))
    lines = [f"| model | input | {what}, median of {repeat} | × baseline, median of the paired ratios [95% CI] |",
             "|---|---|---:|---:|"]
    for label, baseline in rows:
        ratio = ""
        if baseline != label and baseline in times:
            ratios = [a / b for a, b in zip(times[label], times[baseline])]
            lo, hi = median_ci(ratios)
            ratio = f"{statistics.median(ratios):.2f} [{lo:.2f}, {hi:.2f}]"
        lines.append(f"| {label} | {size}² | {statistics.median(times[label]):.0f} | {ratio} |")
    return "\n".join(lines)


def paired_train(specs: list[Spec], batch: int, repeat: int, size: int) -> str:
    """Training steps of all `specs` built in this one process and run in turns, `repeat` rounds after a
    warm-up round (`paired_table`): a drift of the machine then cancels in the ratio."""
    labels = [s.label for s in specs]
    steps = [training_step(build_model(spec, size), torch.randn(batch, 3, size, size, device=bench_ops.DEVICE))[0]
             for spec in specs]
    return paired_table([(s.label, s.baseline) for s in specs], dict(zip(labels, paired_ms(steps, repeat))), size,
                        f"train step ms (batch {batch})")


ENGINES = {"eager": "eager", "compile": "torch.compile", "aoti": "AOTInductor", "ort": "ONNX Runtime"}
# untimed runs before each timed one when engines alternate: they absorb the switch (OpenMP's or ONNX Runtime's
# threads still spinning from the other engine, or parked and slow to wake: a 0.2 s sleep instead made every
# AOTInductor run ~45 % slower on the 2-core VM)
CROSS_SETTLE = 1


def engine_run(model: torch.nn.Module, x: torch.Tensor, engine: str, workdir: Path, **ort_options):
    """A call that runs inference of the eval-mode deploy copy `model` on `x` with `engine`, or why it cannot:
    eager under `torch.inference_mode()`; `torch.compile(fullgraph=True, dynamic=True)` with freezing; the
    AOTInductor package `dynconv.export.export_aoti` writes (the fused kernels inside); ONNX Runtime's CPU
    provider on the file `dynconv.export.export_onnx` writes (as `scripts/bench_deploy.py` runs them)."""
    from bench_deploy import compile_model, ort_session

    if engine == "ort":
        session = ort_session(model, x.shape[-1], workdir / "model.onnx", **ort_options)
        feed = {session.get_inputs()[0].name: x.cpu().numpy()}
        run = functools.partial(session.run, None, feed)
        run.session = session
        return run
    if engine == "aoti":
        from torch._inductor import aoti_load_package

        from dynconv.export import export_aoti

        package = aoti_load_package(export_aoti(model, x[:1], workdir / "model.pt2"))
        return lambda: package(x)
    fn = compile_model(model, x) if engine == "compile" else model
    if isinstance(fn, str):
        return fn

    def run():
        with torch.inference_mode():
            fn(x)
    return run


def paired_infer(specs: list[Spec], batch: int, repeat: int, size: int, engines: list[str],
                 baseline_engine: str | None = None) -> str:
    """Inference of all `specs` on every engine, built in this one process; engine by engine, the models run in
    turns (`paired_table`), and each row's ratio is to its baseline model on the same engine. (Engines are not
    interleaved: ONNX Runtime's and OpenMP's worker threads spin for a while after a run, which slowed the next
    engine's run by up to 1.6x when they alternated.) Weights are random; operators that have
    `freeze()` are frozen (`dynconv.export.deploy_copy`), as they are deployed.

    `baseline_engine`: a second table, where each engine's models run in turns with the baseline models on
    `baseline_engine` (e.g. each model's AOTInductor package against ResNet-50 in ONNX Runtime, as deployed), each
    timed run after `CROSS_SETTLE` untimed runs of the same model and engine."""
    from dynconv.export import deploy_copy

    runs, rows, engine_of, spec_of = {}, [], {}, {}
    baselines = {s.baseline for s in specs}
    for spec in specs:
        model = deploy_copy(build_model(spec, size))
        x = torch.randn(batch, 3, size, size, device=bench_ops.DEVICE)
        extra = [baseline_engine] if baseline_engine not in (None, *engines) and spec.label in baselines else []
        for engine in engines + extra:
            label, baseline = f"{spec.label}, {ENGINES[engine]}", f"{spec.baseline}, {ENGINES[engine]}"
            with tempfile.TemporaryDirectory() as tmp:
                runs[label] = engine_run(model, x, engine, Path(tmp))
            rows.append((label, baseline))
            engine_of[label], spec_of[label] = engine, spec
    failed = {label: why for label, why in runs.items() if isinstance(why, str)}
    times = {}
    for engine in engines:  # one engine at a time: the models in turns, no other engine's threads spinning between
        timed = [label for label in runs if label not in failed and engine_of[label] == engine]
        times.update(zip(timed, paired_ms([runs[label] for label in timed], repeat)))
    text = paired_table([r for r in rows if r[0] in times and engine_of[r[0]] in engines], times, size,
                        f"inference ms (batch {batch})")
    text += "".join(f"\n| {label} | {size}² | {why} | |" for label, why in failed.items())
    if baseline_engine is None:
        return text
    bases = [f"{b}, {ENGINES[baseline_engine]}" for b in sorted(baselines)]
    bases = [b for b in bases if b in runs and b not in failed]
    for engine in (e for e in engines if e != baseline_engine):
        models = [label for label in runs if label not in failed and engine_of[label] == engine]
        times = dict(zip(models + bases, paired_ms([runs[label] for label in models + bases], repeat,
                                                   settle=CROSS_SETTLE)))
        cross = [(label, f"{spec_of[label].baseline}, {ENGINES[baseline_engine]}") for label in models]
        text += (f"\n\n{ENGINES[engine]} against the baseline on {ENGINES[baseline_engine]}, in turns "
                 f"(each timed run after {CROSS_SETTLE} untimed):\n\n")
        text += paired_table(cross + [(b, b) for b in bases], times, size, f"inference ms (batch {batch})")
    return text


def op_breakdown(specs: list[Spec], batch: int, repeat: int, size: int, engine: str, top: int = 12) -> str:
    """Time per op, ms per run averaged over `repeat` runs after a warm-up, the models side by side: eager
    inference (engine "eager") or a training step (engine "train", `training_step`), torch.profiler's self CPU
    time per op; ONNX Runtime, its profiler's kernel time per node op type. The `top` ops by their largest time
    in any model, then the rest as "other" and the total."""
    from dynconv.export import deploy_copy
    from torch.profiler import ProfilerActivity, profile

    per_model = {}
    for spec in specs:
        x = torch.randn(batch, 3, size, size, device=bench_ops.DEVICE)
        model = build_model(spec, size) if engine == "train" else deploy_copy(build_model(spec, size))
        with tempfile.TemporaryDirectory() as tmp:
            if engine == "train":
                run = training_step(model, x)[0]
                run()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(repeat):
                        run()
                times = {e.key: e.self_cpu_time_total / 1e3 / repeat for e in prof.key_averages()}
            elif engine == "ort":
                run = engine_run(model, x, "ort", Path(tmp), enable_profiling=True,
                                 profile_file_prefix=str(Path(tmp) / "ort"))
                for _ in range(repeat + 1):
                    run()
                events = json.loads(Path(run.session.end_profiling()).read_text())
                starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
                times = {}
                for e in events:  # node kernels of the timed runs, after the warm-up's
                    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= starts[1]:
                        op = e["args"]["op_name"]
                        times[op] = times.get(op, 0.0) + e["dur"] / 1e3 / repeat
            else:
                run = engine_run(model, x, "eager", Path(tmp))
                run()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(repeat):
                        run()
                times = {e.key: e.self_cpu_time_total / 1e3 / repeat for e in prof.key_averages()}
        per_model[spec.label] = times
    labels = list(per_model)
    ops = sorted({op for t in per_model.values() for op in t}, key=lambda op: -max(t.get(op, 0.0)
                                                                                    for t in per_model.values()))
    what = "training step" if engine == "train" else ENGINES[engine]
    lines = [f"{what}, batch {batch}, {size}², ms per run by op (mean of {repeat}):", "",
             "| op | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for op in ops[:top]:
        lines.append(f"| {op} | " + " | ".join(f"{per_model[m].get(op, 0.0):.1f}" for m in labels) + " |")
    lines.append("| other | " + " | ".join(f"{sum(per_model[m].get(op, 0.0) for op in ops[top:]):.1f}"
                                           for m in labels) + " |")
    lines.append("| total | " + " | ".join(f"{sum(per_model[m].values()):.1f}" for m in labels) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict], batch: int) -> str:
    """The table; with --memory two more columns, the training step's peak memory and its ratio."""
    by_label = {r["label"]: r for r in rows if "error" not in r}
    memory = any("memory" in r for r in rows)
    lines = [f"| model | input | train step ms (batch {batch}) | × baseline | inference ms | × baseline "
             "| first train step ms |" + (" training peak MiB | × baseline |" if memory else ""),
             "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if memory else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | | {r['error']} | | | | |" + (" | |" if memory else ""))
            continue
        base = by_label.get(r["baseline"], {})

        def ratio(key):
            return f"{r[key] / base[key]:.2f}" if key in r and key in base and base[key] > 0 else ""

        train = f"{r['train']:.0f}" if "train" in r else "(inference only)"
        first = f"{r['first']:.0f}" if "first" in r else ""
        line = (f"| {r['label']} | {r['size']}² | {train} | {ratio('train')} | {r['infer']:.0f} "
                f"| {ratio('infer')} | {first} |")
        if memory:
            line += f" {r['memory']:.0f} | {ratio('memory')} |" if "memory" in r else " | |"
        lines.append(line)
    return "\n".join(lines)


def error_row(spec: Spec, mode: str | None, err: Exception) -> dict:
    label = compiled_label(spec.label, mode) if mode else spec.label
    return dict(label=label, error=f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}")


def in_fresh_process(spec: Spec, mode: str | None, args, batch: int, repeat: int, size: int) -> dict:
    """`bench` of one model (and compile mode) run by this script in a new Python process, so that the
    memory it measures is not what earlier models left behind."""
    cmd = [sys.executable, __file__, "--worker", mode or "eager", "--memory", "--models", spec.label,
           "--batch", str(batch), "--repeat", str(repeat), "--size", str(size), "--device", args.device]
    cmd += [flag for flag, on in (("--amp", args.amp), ("--channels-last", args.channels_last),
                                  ("--inference-only", args.inference_only)) if on]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its stderr (warnings, errors) shows as is
    if proc.returncode:
        return error_row(spec, mode, RuntimeError(f"its process ended with exit code {proc.returncode}"))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5, help="timed steps per model (median reported)")
    ap.add_argument("--models", nargs="+", default=None, help="labels or timm names to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="batch 2, inputs at 1/3 size, 1 repeat")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast for training and inference")
    ap.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    ap.add_argument("--size", type=int, default=None, help="input resolution of every model (default: its own)")
    ap.add_argument("--compile", nargs="*", default=None, choices=COMPILE_MODES, metavar="MODE",
                    help="each model also under torch.compile (inductor) in each MODE (default: 'default'; "
                         f"choices: {', '.join(COMPILE_MODES)}), its ratio taken to the eager row")
    ap.add_argument("--memory", action="store_true",
                    help="also the peak memory of a training step; each model runs in a fresh process")
    ap.add_argument("--inference-only", action="store_true", help="no training step (e.g. at batch 1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole set of models this many times in turn; each figure is the median over "
                         "rounds and each ratio's per-round values are listed (a slow drift of the machine then "
                         "hits every model alike)")
    ap.add_argument("--paired", action="store_true",
                    help="only the training step (with --inference-only: inference on each of --engines): every "
                         "model built in this process and run in turns for --repeat rounds; ratios are medians of "
                         "per-round ratios with a 95%% interval")
    ap.add_argument("--engines", nargs="+", choices=tuple(ENGINES), default=["eager"],
                    help="--paired --inference-only: the engines each model runs on (default: eager)")
    ap.add_argument("--baseline-engine", choices=tuple(ENGINES),
                    help="--paired --inference-only: also each engine's models in turns with the baseline models on "
                         "this engine, and their ratios to it (e.g. --engines aoti --baseline-engine ort: each "
                         "AOTInductor package against ResNet-50 in ONNX Runtime)")
    ap.add_argument("--profile", action="store_true",
                    help="--paired: after the table, each model's time by op (training: one profiled step; with "
                         "--inference-only, on each engine: eager, torch.profiler; ort, ONNX Runtime's profiler)")
    ap.add_argument("--profile-rows", type=int, default=12, metavar="N",
                    help="--profile: the N ops with the most time in any model, the rest summed as 'other'")
    ap.add_argument("--threads", type=int, help="intra-op threads for torch and ONNX Runtime (default: torch's)")
    ap.add_argument("--worker", choices=("eager", *COMPILE_MODES), help=argparse.SUPPRESS)  # in_fresh_process
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, repeat, scale = (2, 1, 1 / 3) if args.quick else (args.batch, args.repeat, 1.0)
    modes = [] if args.compile is None else (args.compile or ["default"])
    bench_ops.DEVICE = torch.device(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch")

    import timm
    import models  # noqa: F401  (registers the project's backbones with timm)

    specs = [s for s in SPECS if (s.label in args.models or s.name in args.models if args.models else s.default)]
    if args.worker:
        mode = None if args.worker == "eager" else args.worker
        try:
            row = bench(specs[0], batch, repeat, args.size, args.amp, args.channels_last, mode, args.memory,
                        not args.inference_only)
        except Exception as err:
            row = error_row(specs[0], mode, err)
        print(json.dumps(row))
        return
    known = set(timm.list_models())
    missing = sorted({s.name for s in specs if s.name not in known})
    print(header() + f"; float32{' + bfloat16 autocast' if args.amp else ''}"
          f"{', channels_last' if args.channels_last else ''}", flush=True)
    if missing:
        print(f"missing models (not registered with timm yet): {', '.join(missing)}")
    if args.paired:
        sizes = {args.size or max(32, int(s.size * scale) // 32 * 32) for s in specs}
        if len(sizes) != 1:
            ap.error("--paired needs one input size for all models: pass --size or models of one resolution")
        specs, size = [s for s in specs if s.name not in missing], sizes.pop()
        if not args.inference_only:
            print(paired_train(specs, batch, repeat, size))
            if args.profile:  # one profiled step per model after a warm-up: a step is seconds long
                print("\n" + op_breakdown(specs, batch, 1, size, "train", args.profile_rows))
            return
        print(paired_infer(specs, batch, repeat, size, args.engines, args.baseline_engine))
        for engine in args.engines if args.profile else ():
            if engine in ("eager", "ort"):  # inductor's kernels have no per-op breakdown to compare
                print("\n" + op_breakdown(specs, batch, repeat, size, engine, args.profile_rows))
        return
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    rounds = []
    for r in range(args.rounds):
        rows = []
        for spec in specs:
            if spec.name in missing:
                continue
            for mode in [None] + modes:
                size = args.size or max(32, int(spec.size * scale) // 32 * 32)
                print(f"{compiled_label(spec.label, mode) if mode else spec.label} at {size}² "
                      f"(round {r + 1} of {args.rounds}) ...", file=sys.stderr, flush=True)
                if args.memory:
                    rows.append(in_fresh_process(spec, mode, args, batch, repeat, size))
                else:
                    try:
                        rows.append(bench(spec, batch, repeat, size, args.amp, args.channels_last, mode,
                                          train=not args.inference_only))
                    except Exception as err:  # report and go on: one broken model must not hide the others
                        rows.append(error_row(spec, mode, err))
                print(rows[-1], file=sys.stderr, flush=True)
        rounds.append(rows)
    rows = merge_rounds(rounds)
    print(markdown(rows, batch))
    if args.rounds > 1:
        print(spread(rounds))


FIGURES = ("first", "memory", "train", "infer")


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per model: each figure the median over the rounds (rows in the first round's order;
    a model that failed in any round keeps its error)."""
    merged = []
    for i, first in enumerate(rounds[0]):
        rows = [r[i] for r in rounds]
        failed = next((r for r in rows if "error" in r), None)
        if failed is not None:
            merged.append(failed)
            continue
        row = dict(first)
        for key in FIGURES:
            if key in first:
                row[key] = statistics.median(r[key] for r in rows)
        merged.append(row)
    return merged


def spread(rounds: list[list[dict]]) -> str:
    """Each model's ratio to its baseline in every round (train, inference, memory), min and max."""
    lines = [f"Ratios to the baseline in each of the {len(rounds)} rounds (min–max):"]
    for i, first in enumerate(rounds[0]):
        if "error" in first or first["baseline"] == first["label"]:
            continue
        parts = []
        for key, name in (("train", "train"), ("infer", "inference"), ("memory", "memory")):
            ratios = []
            for rows in rounds:
                by_label = {r["label"]: r for r in rows if "error" not in r}
                row, base = rows[i], by_label.get(first["baseline"], {})
                if key in row and key in base and base[key] > 0:
                    ratios.append(row[key] / base[key])
            if ratios:
                parts.append(f"{name} {', '.join(f'{v:.2f}' for v in ratios)} ({min(ratios):.2f}–{max(ratios):.2f})")
        lines.append(f"- {first['label']}: " + "; ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
