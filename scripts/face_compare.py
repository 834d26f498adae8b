"""Depthwise base against TVConv on ORL: `train.py experiment=tvconv_face_orl` over identity splits.

    python scripts/face_compare.py --out outputs/face_compare             # folds 0,1,2 x {dwconv, tvconv}
    python scripts/face_compare.py --out /tmp/fc --seeds 0 1 --folds 0 1 2 3
    python scripts/face_compare.py --out /tmp/fc --quick                  # smoke test: tiny model, 1 step

Each run is a `train.py` subprocess, one after the other, in `<out>/<op>_seed<s>_fold<f>` (a run whose
`summary.json` says it finished is reused, so an interrupted comparison continues). The table gives,
per operator, the mean ± std over the splits of the held-out identities' 10-fold verification accuracy
and ROC AUC at the last epoch (no checkpoint selection: ORL's held-out pairs are the only evaluation
set, so picking the best epoch on them would flatter both models), and the time per run. A first row
scores the raw pixels (cosine similarity of the normalised input images) on the same splits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.face import FACE_DATASETS  # noqa: E402
from engine.verification import evaluate_pairset  # noqa: E402

EXPERIMENT = "tvconv_face_orl"
OPS = {"default": "dwconv", "tvconv": "tvconv"}  # `op=` value -> name in the table
QUICK = ["model=face_mobilenetv2_x0_1", "data.img_size=32", "trainer.epochs=1", "trainer.limit_train_batches=1"]


def run_dir(out: Path, op: str, seed: int, fold: int) -> Path:
    return out / f"{op}_seed{seed}_fold{fold}"


def finished(path: Path) -> dict | None:
    """The run's summary.json if the run completed all its epochs, else None."""
    f = path / "summary.json"
    if not f.is_file():
        return None
    s = json.loads(f.read_text())
    return s if s["epochs_done"] >= s["total_epochs"] else None


def train(path: Path, op: str, seed: int, fold: int, extra: list[str], threads: int) -> dict:
    """Run train.py for one split and operator; returns its summary plus the subprocess wall time."""
    summary = finished(path)
    if summary is not None:
        print(f"[reuse] {path}", flush=True)
        return summary
    cmd = [sys.executable, str(ROOT / "train.py"), f"experiment={EXPERIMENT}", f"op={op}", f"data.seed={seed}",
           f"data.fold={fold}", *extra, f"hydra.run.dir={path}"]
    print("[run]", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed for {path.name} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    summary = finished(path)
    if summary is None:
        raise RuntimeError(f"{path}/summary.json is missing or incomplete after a successful train.py run")
    summary["process_wall_s"] = wall
    (path / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def raw_pixel_result(summary: dict) -> tuple[float, float]:
    """(accuracy %, AUC) of the raw normalised pixels on the run's held-out pairs (same data config)."""
    cfg = SimpleNamespace(**summary["config"]["data"])
    _, val_sets, _ = FACE_DATASETS[cfg.name](cfg)
    r = evaluate_pairset(nn.Flatten(), val_sets[0], device="cpu")
    return 100 * r.acc, r.auc


def mean_std(values: list[float], fmt: str) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} ± {format(std, fmt)}"


def macs_text(summary: dict) -> str:
    """The training form's MACs per image; where the inference form differs (TVConv after freeze()), its per-image
    MACs and the precomputed generators' once."""
    macs, once = summary["macs_per_image"], summary.get("macs_inference_once")
    if macs is None:
        return "n/a"
    return f"{macs / 1e6:.1f}M" + (f"; {summary['macs_inference_per_image'] / 1e6:.1f}M + {once / 1e6:.1f}M" if once else "")


def table(rows: dict[str, list[dict]], raw: list[tuple[float, float]]) -> str:
    """Markdown table: one row per operator, mean ± sample std over the splits."""
    lines = ["| model | op | params | MACs/image (training; inference + once) | held-out acc (%) | AUC | "
             "train time/run (s) | wall/run (s) |",
             "|---|---|---|---|---|---|---|---|"]
    lines.append(f"| raw pixels | — | 0 | 0 | {mean_std([a for a, _ in raw], '.2f')} | "
                 f"{mean_std([u for _, u in raw], '.4f')} | — | — |")
    for op, summaries in rows.items():
        cfg = summaries[0]["config"]
        acc = [s["final"]["val_orl/acc"] for s in summaries]
        auc = [s["final"]["val_orl/auc"] for s in summaries]
        train_s = [s["wall_time_s"] for s in summaries]
        wall = [s["process_wall_s"] for s in summaries if "process_wall_s" in s]
        lines.append(f"| {cfg['model']['name']} | {OPS[op]} | {summaries[0]['params'] / 1e6:.2f}M | "
                     f"{macs_text(summaries[0])} | {mean_std(acc, '.2f')} | "
                     f"{mean_std(auc, '.4f')} | {mean_std(train_s, '.0f')} | "
                     f"{mean_std(wall, '.0f') if wall else 'n/a'} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the runs (one sub-folder per run)")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2], help="data.fold values (10 of 40 ids each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="data.seed values (identity permutation)")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS), help="op= values to compare")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of each run (1: robust on a shared machine, where 2 threads wait on each other)")
    p.add_argument("--quick", action="store_true", help="smoke test: " + " ".join(QUICK))
    p.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. data.img_size=96")
    args = p.parse_args(argv)
    extra = (QUICK if args.quick else []) + args.overrides
    splits = [(s, f) for s in args.seeds for f in args.folds]
    rows = {op: [train(run_dir(args.out, op, s, f), op, s, f, extra, args.threads) for s, f in splits]
            for op in args.ops}
    raw = [raw_pixel_result(summary) for summary in rows[args.ops[0]]]
    md = table(rows, raw)
    print(f"\n{len(splits)} identity splits (data.seed, data.fold) = {splits}; extra overrides: {extra or 'none'}\n")
    print(md)
    (args.out / "table.md").write_text(md + "\n")
    return md


if __name__ == "__main__":
    main()
