"""Which timm model families take which operator: build each (family, operator) cell through the replacement policy,
train it one step, and print the matrix as a Markdown table.

    python scripts/timm_compat.py                       # 9 families x every operator, 64 px, batch 2
    python scripts/timm_compat.py --models resnet18 convnext_nano --ops ddf involution --size 96

A cell is tried with `policy.on_incompatible=error`, then `adapt`, then `skip` (the first that builds wins), and then
trains one SGD step on random data. It reads `ok N` (N layers replaced as configured), `adapt A/N` (A of the N
layers took the nearest valid option), `skip S/N` (S layers kept their conv, even after adapting) or `fail: <error>`
(the build or the training step failed). The policy is the one that reaches each family's spatial convs: `dw_only`
for the depthwise families, `all_3x3` for the others.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynconv  # noqa: E402
import models  # noqa: E402

# family → (timm model, policy, extra timm kwargs)
FAMILIES = {
    "ResNet": ("resnet18", "all_3x3", {}),
    "EfficientNet": ("efficientnet_b0", "dw_only", {}),
    "ConvNeXt": ("convnext_nano", "dw_only", {}),
    "RegNet": ("regnetx_002", "all_3x3", {}),
    "MobileNetV3": ("mobilenetv3_large_100", "dw_only", {}),
    "GhostNet": ("ghostnet_100", "dw_only", {}),
    "RepVGG": ("repvgg_a0", "all_3x3", {}),
    "DenseNet": ("densenet121", "all_3x3", {}),
    "ViT hybrid (R26+ViT-S)": ("vit_small_r26_s32_224", "all_3x3", {"img_size": "size"}),
}
MODES = ("error", "adapt", "skip")


def build(name: str, op: str, policy: str, mode: str, size: int, kwargs: dict):
    kw = {k: size if v == "size" else v for k, v in kwargs.items()}
    return models.build({"name": name, **kw}, {"name": op}, {"name": policy, "on_incompatible": mode},
                        num_classes=10, input_size=(size, size))


def first_mode(name: str, op: str, policy: str, size: int, kwargs: dict) -> str:
    """The first `on_incompatible` mode under which the cell builds (on the meta device: no weights)."""
    for mode in MODES:
        try:
            with torch.device("meta"):
                build(name, op, policy, mode, size, kwargs)
            return mode
        except (ValueError, TypeError):
            continue
    return "skip"  # skip raises only for errors that are no incompatibility: let the real build report it


def cell(name: str, op: str, policy: str, size: int, kwargs: dict) -> str:
    mode = first_mode(name, op, policy, size, kwargs)
    try:
        torch.manual_seed(0)
        model, report = build(name, op, policy, mode, size, kwargs)
        loss = F.cross_entropy(model(torch.randn(2, 3, size, size)), torch.tensor([0, 1]))
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.01).step()
        if not torch.isfinite(loss):
            return "fail: non-finite loss"
    except Exception as e:  # noqa: BLE001  (the matrix records every failure)
        return f"fail: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    n = len(report)
    if mode == "error":
        return f"ok {n}"
    if mode == "adapt":
        return f"adapt {sum(r['note'].startswith('adapted') for r in report)}/{n}"
    return f"skip {sum(r['skipped'] for r in report)}/{n}"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", help="timm model names (default: one per family)")
    ap.add_argument("--ops", nargs="*", help="operators (default: every registered one but conv)")
    ap.add_argument("--size", type=int, default=64, help="input resolution (the dry pass runs at it too)")
    args = ap.parse_args(argv)
    logging.getLogger("models").setLevel(logging.ERROR)  # small-input warnings: expected at this size
    logging.getLogger("dynconv").setLevel(logging.ERROR)
    fams = {f: v for f, v in FAMILIES.items() if not args.models or v[0] in args.models}
    fams.update({m: (m, "all_3x3", {}) for m in args.models or () if m not in {v[0] for v in fams.values()}})
    ops = args.ops or [o for o in dynconv.list_ops() if o != "conv"]
    lines = [f"| family (timm model, policy) | {' | '.join(ops)} |", "|---" * (len(ops) + 1) + "|"]
    t0 = time.perf_counter()
    for fam, (name, policy, kwargs) in fams.items():
        cells = [cell(name, op, policy, args.size, kwargs) for op in ops]
        lines.append(f"| {fam} (`{name}`, {policy}) | {' | '.join(cells)} |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + (f"\n\n{args.size} px, batch 2, one SGD step per cell; torch {torch.__version__}, "
                               f"timm {__import__('timm').__version__}; {time.perf_counter() - t0:.0f} s.")
    print(text)
    return text


if __name__ == "__main__":
    main()
