"""Inference latency of the paper models as deployed: eager PyTorch vs `torch.compile` vs ONNX Runtime.

Side by side in one run, on CPU, float32, batch 1 and 16 at each model's paper resolution (224; the
face models 96). Every engine runs the same eval-mode model with its operators frozen where they can
be (TVConv): eager under `torch.inference_mode()` with the default (fast) backend;
`torch.compile(fullgraph=True, dynamic=True)` (inductor with `freezing`, as for CPU inference; one compilation
per model with a symbolic batch, like the ONNX file, done before timing; a model that cannot be captured in one graph reads
"n/a (graph break)"); ONNX Runtime's CPU provider on the model
exported by `dynconv.export.export_onnx` (batch dimension symbolic), with as many intra-op threads as
torch. Medians over `--repeat` runs after one warm-up; eager and compiled run in turns, and "compile /
eager" is the median of the paired ratios with its distribution-free 95% interval. Weights are random,
the BatchNorm statistics those of one random batch; "ORT rel. diff" is max |ORT − eager| / max |eager| over that row's input.

    python scripts/bench_deploy.py                    # the table in docs/BENCHMARKS.md
    python scripts/bench_deploy.py --models RedNet-26 "ResNet-50 + ODConv" --batches 1 --repeat 3
    python scripts/bench_deploy.py --quick            # 32 px, batch 1 and 2, one repeat: a smoke test
    python scripts/bench_deploy.py --engines compile --img-size 112 --repeat 41   # eager vs compiled only
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

import bench_ops  # also puts the repository on sys.path
from bench_ops import header, median_ci, median_ms, paired_ms
from dynconv.export import deploy_copy, export_onnx
from models.export import PAPER_MODELS, PaperModel, batch_statistics, build


ENGINES = ("eager", "compile", "ort")


def compile_model(model: torch.nn.Module, x: torch.Tensor):
    """The model compiled (batch symbolic, inductor's `freezing` on) and run once on `x`, or why it cannot be
    (a graph break, an error)."""
    import torch._dynamo

    import torch._inductor.config

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    try:  # freezing, as for CPU inference: BatchNorm folded into the convolutions, weights pre-packed for oneDNN
        with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
            compiled(x)
    except torch._dynamo.exc.Unsupported:
        return "n/a (graph break)"
    except Exception as err:  # inductor or lowering failures: report, keep benchmarking the rest
        return f"n/a ({type(err).__name__})"
    return compiled


def bench(spec: PaperModel, batches, repeat: int, size: int, workdir: Path, engines=ENGINES) -> list[dict]:
    torch.manual_seed(0)
    model = batch_statistics(build(spec, size), torch.randn(8, 3, size, size))
    session = ort_session(model, size, workdir / f"{spec.name}.onnx") if "ort" in engines else None
    model = deploy_copy(model)
    compiled = compile_model(model, torch.randn(2, 3, size, size)) if "compile" in engines else None
    rows = []
    for b in batches:
        x = torch.randn(b, 3, size, size)
        row = dict(label=spec.label, size=size, batch=b, compiled=compiled, ort=None)
        with torch.inference_mode():
            ref = model(x)
            if compiled is None or isinstance(compiled, str):
                row["eager"] = median_ms(lambda: model(x), repeat)
            else:  # in turns, so that the ratio's interval is not a drift of the machine
                eager, comp = paired_ms([lambda: model(x), lambda: compiled(x)], repeat)
                ratios = [c / e for c, e in zip(comp, eager)]
                row.update(eager=statistics.median(eager), compiled=statistics.median(comp),
                           ratio=statistics.median(ratios), ci=median_ci(ratios))
        if session is not None:
            feed = {session.get_inputs()[0].name: x.numpy()}
            diff = (torch.from_numpy(session.run(None, feed)[0]) - ref).abs().max() / ref.abs().max()
            row.update(ort=median_ms(lambda: session.run(None, feed), repeat), diff=diff.item())
        rows.append(row)
    return rows


def ort_session(model, size: int, path: Path, **options):
    """An ONNX Runtime CPU session of `model` exported to `path`, with torch's intra-op threads and any other
    `ort.SessionOptions` attributes in `options` (e.g. enable_profiling=True)."""
    import onnxruntime as ort

    export_onnx(model, torch.randn(2, 3, size, size), path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    for name, value in options.items():
        setattr(opts, name, value)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


HEADER = ("| model | input | batch | eager (ms) | torch.compile (ms) | ONNX Runtime (ms) | compile / eager [95% CI] "
          "| ORT / eager | ORT rel. diff |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")


def markdown_row(r: dict) -> str:
    comp = r["compiled"]
    if comp is None or isinstance(comp, str):
        comp, speed = comp or "–", "–"
    else:
        lo, hi = r["ci"]
        comp, speed = f"{comp:.1f}", f"{r['ratio']:.2f} [{lo:.2f}, {hi:.2f}]"
    ort = ("–", "–", "–") if r["ort"] is None else (f"{r['ort']:.1f}", f"{r['ort'] / r['eager']:.2f}",
                                                     f"{r['diff']:.1e}")
    return f"| {r['label']} | {r['size']} | {r['batch']} | {r['eager']:.1f} | {comp} | {ort[0]} | {speed} | " \
           f"{ort[1]} | {ort[2]} |"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", help="labels to run (default: every paper model)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--img-size", type=int, help="one resolution for every model (default: the paper's)")
    p.add_argument("--threads", type=int, help="intra-op threads for torch and ONNX Runtime (default: torch's)")
    p.add_argument("--quick", action="store_true", help="32 px, batch 1 and 2, one repeat")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                   help="what runs beside eager (default: all): 'compile', 'ort'")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.img_size, args.batches, args.repeat = 32, [1, 2], 1
    labels = [s.label for s in PAPER_MODELS]
    unknown = sorted(set(args.models or []) - set(labels))
    if unknown:
        p.error(f"unknown model label(s) {unknown}; choose from: {', '.join(labels)}")
    specs = [s for s in PAPER_MODELS if not args.models or s.label in args.models]
    print(header() + f"; float32, median of {args.repeat}\n\n{HEADER}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # rows print as they come: a long run shows progress
        for spec in specs:
            for row in bench(spec, args.batches, args.repeat, args.img_size or spec.img_size, Path(tmp),
                             args.engines):
                print(markdown_row(row), flush=True)


if __name__ == "__main__":
    main()
