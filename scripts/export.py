"""Export a model with dynamic operators to ONNX, a `torch.export` program (.pt2) or an AOTInductor package
(.pt2, `--format aoti`), the batch dimension symbolic.

    python scripts/export.py --arch rednet50 out/rednet50.onnx
    python scripts/export.py --arch resnet50 --op odconv --policy all_3x3 --format pt2 out/r50_odconv.pt2
    python scripts/export.py --arch face_mobilenetv2_x1_0 --op tvconv --img-size 96 --check out/face_tv.onnx
    python scripts/export.py --all --check out/          # every paper model, at its paper resolution
    python scripts/export.py --arch rednet50 --format aoti --check out/rednet50_aoti.pt2   # fused CPU kernels inside

The dynamic operators are traced as their plain-PyTorch decomposition (standard ONNX operators);
TVConv is frozen first. `--checkpoint` loads a trainer checkpoint (`model` entry) or a state_dict
(official keys are converted). Without one, the weights are random and the BatchNorm statistics are
those of one random batch. `--check` runs ONNX Runtime (CPU) at batch 1 and 3 against PyTorch and flags a
difference above max(1e-4, 4x PyTorch's own float32-vs-float64 error) (`dynconv.export.ort_tolerance`).
`--format aoti` keeps the fused kernels instead (`dynconv.export.export_aoti`: inductor with freezing, the
dynamic operators called as dynconv's custom ops; load with `torch._inductor.aoti_load_package` after
`import dynconv`); `--check` then compares the package with PyTorch the same way.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = ROOT / "configs" / "model"
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from dynconv.checkpoint import load  # noqa: E402
from dynconv.export import (DEFAULT_OPSET, ExportError, aoti_max_rel_diff, export_aoti, export_onnx,  # noqa: E402
                             export_program, ort_max_rel_diff, ort_tolerance)
from models.export import PAPER_MODELS, PaperModel, batch_statistics, build  # noqa: E402


def load_weights(model: torch.nn.Module, path: str) -> None:
    state = load(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a trainer checkpoint
        model.load_state_dict(state["model"])
    else:
        models.load_official(model, state)


def resolve_arch(arch: str) -> tuple[str, dict]:
    """Registered model name and builder options of `--arch`: a registered name (`dynconv_resnet50`) or a
    `model=` config name of configs/model/ (`resnet50`, `resnet50_small`), whose other keys are builder options."""
    if arch in models.list_models():
        return arch, {}
    path = MODEL_CONFIGS / f"{arch}.yaml"
    cfg = yaml.safe_load(path.read_text()) if path.is_file() else None
    if cfg and cfg.get("name") in models.list_models():
        return cfg.pop("name"), cfg
    configs = sorted(p.stem for p in MODEL_CONFIGS.glob("*.yaml") if p.stem not in models.list_models()
                     and yaml.safe_load(p.read_text()).get("name") in models.list_models())
    raise ValueError(f"unknown --arch {arch!r}: give a registered model ({', '.join(models.list_models())}) "
                     f"or a model config naming one ({', '.join(configs)})")


def export_one(spec: PaperModel, args, out: Path) -> None:
    size = args.img_size or spec.img_size
    model = build(spec, size, num_classes=args.num_classes)
    example = torch.randn(2, 3, size, size)
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    else:
        batch_statistics(model, torch.randn(8, 3, size, size))
    t0 = time.perf_counter()
    if args.format == "pt2":
        torch.export.save(export_program(model, example), str(out))
    elif args.format == "aoti":
        export_aoti(model, example, out)
    else:
        export_onnx(model, example, out, opset=args.opset)
    line = f"{spec.label}: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s)"
    if args.check and args.format in ("onnx", "aoti"):
        inputs = [torch.randn(b, 3, size, size) for b in (1, 3)]
        engine = "ONNX Runtime" if args.format == "onnx" else "the AOTInductor package"
        diff = ort_max_rel_diff(out, model, inputs) if args.format == "onnx" else aoti_max_rel_diff(out, model, inputs)
        bound = ort_tolerance(model, inputs)
        line += (f"; {engine} vs PyTorch at batch 1 and 3: max relative diff {diff:.2e} (bound {bound:.2e}: "
                 "max(1e-4, 4x PyTorch's own float32-vs-float64 error))")
        if diff > bound:
            line += f"  ** above {bound:.2e} **"
    print(line, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="output file (a folder with --all)")
    p.add_argument("--arch", help="registered model name (models.list_models()) or model config name (configs/model/)")
    p.add_argument("--op", help="operator that fills the model's slots (dynconv.list_ops())")
    p.add_argument("--policy", help="replacement policy (none, all_3x3, dw_only, deep_only, shallow_only)")
    p.add_argument("--all", action="store_true", help="every paper model, each at its paper resolution")
    p.add_argument("--format", choices=("onnx", "pt2", "aoti"), default="onnx",
                   help="onnx; pt2: a torch.export program; aoti: an AOTInductor package (.pt2) with the fused kernels")
    p.add_argument("--img-size", type=int, help="input resolution (default: 224, or the paper's with --all)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--checkpoint", help="weights: a trainer checkpoint or a (converted or official) state_dict")
    p.add_argument("--check", action="store_true", help="compare ONNX Runtime (onnx) or the package (aoti) with PyTorch")
    args = p.parse_args(argv)
    if args.all == bool(args.arch):
        p.error("give either --arch NAME or --all")
    if args.all:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        suffix = "_aoti.pt2" if args.format == "aoti" else f".{args.format}"
        jobs = [(s, out_dir / f"{re.sub(r'[^a-z0-9]+', '_', s.label.lower()).strip('_')}{suffix}")
                for s in PAPER_MODELS]
    else:
        try:
            name, kwargs = resolve_arch(args.arch)
        except ValueError as err:
            p.error(str(err))
        kwargs.update({k: v for k, v in (("op", args.op), ("policy", args.policy)) if v})
        args.img_size = args.img_size or 224
        jobs = [(PaperModel(args.arch, name, args.img_size, kwargs), Path(args.out))]
    for spec, out in jobs:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            export_one(spec, args, out)
        except ExportError as err:
            print(f"{spec.label}: not exported: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
