"""Parameters, MACs, activation memory (and with --bench latency/throughput) of a model, or of every
paper model beside the paper's numbers.

    python scripts/complexity.py model=rednet op=involution policy=none [model.depth=26] [input_size=224] [--bench]
    python scripts/complexity.py --papers [--only rednet26,face_mobilenetv2_x1_0:tvconv]

Counting convention (stated in the table; dynconv/complexity.py, the trainer's too): MACs = multiply-
accumulates of convs, linear layers and matmuls as torch's FlopCounterMode sees them (its FLOPs / 2),
plus the per-pixel aggregation of the dynamic operators that it cannot see (C·K²·H_out·W_out each).
BN, activations, pooling and the filter normalisations are not counted. Activation memory is the
sum of the float32 outputs of all leaf modules for one image. Where the two forms differ (TVConv), both are given:
the training form, which generates the weight maps in every pass, and the inference form, whose per-image MACs leave
out the generators that `freeze()` precomputes, counted once instead; the paper's table is the inference form's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from dynconv.complexity import count_macs  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# (name, build kwargs, input size, official params, paper/README numbers and their source)
PAPERS = [
    *[(f"rednet{d}", {}, 224, p, f) for d, p, f in (
        (26, 9_233_166, "9.23M / 1.73G (README)"), (38, 12_386_986, "12.39M / 2.22G (README)"),
        (50, 15_540_806, "15.54M / 2.71G (README)"), (101, 25_652_950, "25.65M / 4.74G (README)"),
        (152, 33_984_582, "33.99M / 6.79G (README)"))],
    *[(f"ddf_{c}_resnet{d}", {}, 224, p, f"{m} / - (README)") for d, p, m in (
        (50, 16_843_748, "16.8M"), (101, 28_146_912, "28.1M")) for c in ("mul", "add")],
    ("resnet18_dcd", {}, 224, 14_703_332, "- (paper table unverified)"),
    ("resnet50_dcd", {}, 224, 29_835_056, "- (paper table unverified)"),
    ("mobilenetv2_dcd", {}, 224, 5_720_028, "- (paper table unverified)"),
    *[(f"face_mobilenetv2_x{w}", kw, 96, p, "- (paper table unverified)") for w, kw, p in (
        ("0_1", {}, 324_672), ("0_1", {"op": "tvconv"}, 16_369_368), ("0_5", {}, 827_968),
        ("0_5", {"op": "tvconv"}, 30_079_264), ("1_0", {}, 2_241_280), ("1_0", {"op": "tvconv"}, 49_708_576))],
    *[(f"face_shufflenetv2_x{w}", kw, 96, p, "- (paper table unverified)") for w, kw, p in (
        ("0_5", {}, 869_664), ("0_5", {"op": "tvconv"}, 10_602_984), ("1_0", {}, 1_781_476),
        ("1_0", {"op": "tvconv"}, 18_904_696))],
]


@torch.no_grad()
def measure(model: nn.Module, input_size: int, in_chans: int = 3, bench: bool = False) -> dict:
    model.eval()
    x = torch.zeros(1, in_chans, input_size, input_size)
    out = {"params": sum(p.numel() for p in model.parameters()), **count_macs(model, x)}
    if bench:
        out.update(benchmark(model, x))
    return out


def benchmark(model: nn.Module, x: torch.Tensor, batch: int = 32, iters: int = 10) -> dict:
    def timed(inp):
        model(inp)
        t = time.perf_counter()
        for _ in range(iters):
            model(inp)
        return (time.perf_counter() - t) / iters

    xb = x.expand(batch, *x.shape[1:]).contiguous()
    return {"latency_ms": timed(x) * 1e3, "throughput": batch / timed(xb)}


def parse_overrides(args: list[str]) -> tuple[dict, dict, dict, dict]:
    """Hydra-style `group=name` and `group.key=value` arguments, read on top of configs/<group>/<name>.yaml."""
    from omegaconf import OmegaConf

    groups = {"model": "resnet50", "op": "default", "policy": "none"}
    dotted, rest = [], {}
    for a in args:
        key, _, value = a.partition("=")
        if key in groups:
            groups[key] = value
        elif key.split(".")[0] in groups:
            dotted.append(a)
        else:
            rest[key] = value
    cfg = OmegaConf.create({g: OmegaConf.load(CONFIGS / g / f"{n}.yaml") for g, n in groups.items()})
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted))
    return (*(OmegaConf.to_container(cfg[g]) for g in ("model", "op", "policy")), rest)


def fmt(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def inference(r: dict) -> str:
    """The inference form's per-image MACs, and the precomputed generators' once, where the forms differ."""
    return fmt(r["inference_macs"]) + (f" (+ {fmt(r['precomputed_macs'])})" if r["precomputed_macs"] else "")


def papers(only: list[str] | None) -> str:
    head = ("model", "op", "input", "params (ours)", "params (official)", "exact", "MACs training",
            "MACs inference (+ once)", "paper params / FLOPs")
    rows = []
    for name, kw, size, official, paper in PAPERS:
        op = kw.get("op", models._factory._MODELS[name].op)
        if only and name not in only and f"{name}:{op}" not in only:
            continue
        model = models.create(name, input_size=(size, size), **kw)
        r = measure(model, size)
        rows.append((name, op, f"{size}²", f"{r['params']:,}",
                     f"{official:,}", "yes" if r["params"] == official else "NO", fmt(r["macs"]), inference(r), paper))
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    return "\n".join(lines + ["", "MACs: conv + linear + matmul (FlopCounterMode / 2) + dynamic aggregation "
                              "(C·K²·H_out·W_out); BN/act/pool not counted. Training: the generators run per pass; "
                              "inference: per image after freeze(), the precomputed generators counted once (+); "
                              "the papers' FLOPs compare with the inference column."])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="model=<name> op=<name> policy=<name> group.key=value input_size=224")
    ap.add_argument("--papers", action="store_true", help="every paper model beside the paper's numbers")
    ap.add_argument("--only", default="", help="comma-separated paper models (name or name:op) for --papers")
    ap.add_argument("--bench", action="store_true", help="also time latency (batch 1) and throughput (batch 32)")
    a = ap.parse_intermixed_args(argv)
    if a.papers:
        print(papers([n for n in a.only.split(",") if n]))
        return
    model_cfg, op_cfg, policy_cfg, rest = parse_overrides(a.overrides)
    size = int(rest.get("input_size", 224))
    model, _ = models.build(model_cfg, op_cfg, policy_cfg, num_classes=int(rest.get("num_classes", 1000)),
                            input_size=(size, size))
    r = measure(model, size, bench=a.bench)
    print(f"model={model_cfg['name']} op={op_cfg.get('name') or 'default'} policy={policy_cfg['name']} input={size}²")
    forms = (f"; inference form (freeze()): {fmt(r['inference_macs'])} per image + {fmt(r['precomputed_macs'])} once"
             if r["precomputed_macs"] else "")
    print(f"params {r['params']:,}  MACs {fmt(r['macs'])} (dynamic aggregation {fmt(r['agg_macs'])}{forms})  "
          f"activations {fmt(r['act_bytes'], 'B')}")
    if a.bench:
        print(f"latency {r['latency_ms']:.2f} ms (batch 1)  throughput {r['throughput']:.1f} img/s (batch 32), "
              f"{torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
