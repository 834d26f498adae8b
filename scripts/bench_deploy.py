"""Inference latency of the paper models as deployed: eager PyTorch vs `torch.compile` vs ONNX Runtime.

Side by side in one run, on CPU, float32, batch 1 and 16 at each model's paper resolution (224; the
face models 96). Every engine runs the same eval-mode model with its operators frozen where they can
be (TVConv): eager under `torch.inference_mode()` with the default (fast) backend;
`torch.compile(fullgraph=True, dynamic=True)` (inductor; one compilation per model with a symbolic
batch, like the ONNX file, done before timing; a model that cannot be captured in one graph reads
"n/a (graph break)"); ONNX Runtime's CPU provider on the model
exported by `dynconv.export.export_onnx` (batch dimension symbolic), with as many intra-op threads as
torch. Medians over `--repeat` runs after one warm-up. Weights are random, the BatchNorm statistics
those of one random batch; "ORT rel. diff" is max |ORT − eager| / max |eager| over that row's input.

    python scripts/bench_deploy.py                    # the table in docs/BENCHMARKS.md
    python scripts/bench_deploy.py --models RedNet-26 "ResNet-50 + ODConv" --batches 1 --repeat 3
    python scripts/bench_deploy.py --quick            # 32 px, batch 1 and 2, one repeat: a smoke test
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import bench_ops  # also puts the repository on sys.path
from bench_ops import header, median_ms
from dynconv.export import deploy_copy, export_onnx
from models.export import PAPER_MODELS, PaperModel, batch_statistics, build


def _compiled(model: torch.nn.Module, x: torch.Tensor):
    """The model compiled (batch symbolic) and run once on `x`, or why it cannot be (a graph break, an error)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    try:
        with torch.inference_mode():
            compiled(x)
    except torch._dynamo.exc.Unsupported:
        return "n/a (graph break)"
    except Exception as err:  # inductor or lowering failures: report, keep benchmarking the rest
        return f"n/a ({type(err).__name__})"
    return compiled


def bench(spec: PaperModel, batches, repeat: int, size: int, workdir: Path) -> list[dict]:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = batch_statistics(build(spec, size), torch.randn(8, 3, size, size))
    path = workdir / f"{spec.name}.onnx"
    export_onnx(model, torch.randn(2, 3, size, size), path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    model = deploy_copy(model)
    compiled = _compiled(model, torch.randn(2, 3, size, size))
    rows = []
    for b in batches:
        x = torch.randn(b, 3, size, size)
        with torch.inference_mode():
            ref = model(x)
            eager = median_ms(lambda: model(x), repeat)
            compiled_ms = compiled if isinstance(compiled, str) else median_ms(lambda: compiled(x), repeat)
        feed = {name: x.numpy()}
        diff = (torch.from_numpy(session.run(None, feed)[0]) - ref).abs().max() / ref.abs().max()
        onnx_ms = median_ms(lambda: session.run(None, feed), repeat)
        rows.append(dict(label=spec.label, size=size, batch=b, eager=eager, compiled=compiled_ms, ort=onnx_ms,
                         diff=diff.item()))
    return rows


HEADER = ("| model | input | batch | eager (ms) | torch.compile (ms) | ONNX Runtime (ms) | compile / eager "
          "| ORT / eager | ORT rel. diff |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")


def markdown_row(r: dict) -> str:
    comp = r["compiled"] if isinstance(r["compiled"], str) else f"{r['compiled']:.1f}"
    speed = "–" if isinstance(r["compiled"], str) else f"{r['compiled'] / r['eager']:.2f}"
    return (f"| {r['label']} | {r['size']} | {r['batch']} | {r['eager']:.1f} | {comp} | {r['ort']:.1f} "
            f"| {speed} | {r['ort'] / r['eager']:.2f} | {r['diff']:.1e} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", help="labels to run (default: every paper model)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--img-size", type=int, help="one resolution for every model (default: the paper's)")
    p.add_argument("--threads", type=int, help="intra-op threads for torch and ONNX Runtime (default: torch's)")
    p.add_argument("--quick", action="store_true", help="32 px, batch 1 and 2, one repeat")
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
            for row in bench(spec, args.batches, args.repeat, args.img_size or spec.img_size, Path(tmp)):
                print(markdown_row(row), flush=True)


if __name__ == "__main__":
    main()
