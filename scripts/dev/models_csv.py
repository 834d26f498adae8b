"""The model table as data: reads the Markdown tables that `bench_models.py --memory` prints (one log per
precision), appends their rows to a CSV, and prints that run's rows from the CSV as a Markdown table.

CSV columns: date, commit, device, torch, triton, model, dtype (fp32|bf16), batch, train_step_ms,
train_ratio, infer_ms, infer_ratio, peak_mem_mb (MiB, a training step's peak), mem_ratio (ratios to each
row's baseline, as bench_models prints them).

    python scripts/bench_models.py --device cuda --batch 64 --memory > fp32.log
    python scripts/bench_models.py --device cuda --batch 64 --memory --amp --channels-last > bf16.log
    python scripts/dev/models_csv.py docs/benchmarks/cuda_models.csv fp32=fp32.log bf16=bf16.log
    python scripts/dev/models_csv.py docs/benchmarks/cuda_models.csv          # the newest run's table only
"""
from __future__ import annotations

import argparse
import csv
import datetime
import re
import subprocess
from pathlib import Path

COLUMNS = ["date", "commit", "device", "torch", "triton", "model", "dtype", "batch", "train_step_ms", "train_ratio",
           "infer_ms", "infer_ratio", "peak_mem_mb", "mem_ratio"]
DTYPES = ("fp32", "bf16")
# bench_models' header line on CUDA: "torch <version>, <device>; triton <version>; ..."
_HEADER = re.compile(r"^torch (\S+), (.+?); triton ([^\s;]+)")


def parse_log(text: str) -> tuple[dict, list[dict]]:
    """(run facts from the header line, one dict per table row) of a bench_models log."""
    lines = text.splitlines()
    facts = {}
    for line in lines:
        if m := _HEADER.match(line):
            facts = dict(torch=m.group(1), device=m.group(2), triton=m.group(3))
    start = next((n for n, line in enumerate(lines) if line.startswith("| model | input |")), None)
    if start is None:
        raise ValueError("no bench_models table (a line starting '| model | input |') in the log")
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    if "training peak MiB" not in head:
        raise ValueError("the table has no memory column: run bench_models.py with --memory")
    batch = re.search(r"batch (\d+)", lines[start]).group(1)
    # each "× baseline" column belongs to the measure before it
    names = []
    for h in head:
        names.append(names[-1] + " ratio" if h == "× baseline" else h)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(names, (c.strip() for c in line.strip().strip("|").split("|"))))
        train = cells[f"train step ms (batch {batch})"]
        rows.append(dict(model=cells["model"], batch=batch, train_step_ms="" if train.startswith("(") else train,
                         train_ratio=cells[f"train step ms (batch {batch}) ratio"],
                         infer_ms=cells["inference ms"], infer_ratio=cells["inference ms ratio"],
                         peak_mem_mb=cells["training peak MiB"], mem_ratio=cells["training peak MiB ratio"]))
    return facts, rows


def git_commit() -> str:
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    return run.stdout.strip() or "unknown"


def markdown(rows: list[dict]) -> str:
    lines = ["| model | dtype | train step ms | × baseline | inference ms | × baseline | peak train MiB "
             "| × baseline |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['train_step_ms']} | {r['train_ratio']} | {r['infer_ms']} "
                     f"| {r['infer_ratio']} | {r['peak_mem_mb']} | {r['mem_ratio']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", type=Path, help="the CSV to append to (created with its header when absent)")
    ap.add_argument("logs", nargs="*", metavar="DTYPE=LOG", help=f"a bench_models log per dtype ({'|'.join(DTYPES)})")
    args = ap.parse_args(argv)
    new = []
    date, commit = datetime.date.today().isoformat(), git_commit()
    for item in args.logs:
        dtype, _, path = item.partition("=")
        if dtype not in DTYPES or not path:
            ap.error(f"expected DTYPE=LOG with DTYPE one of {DTYPES}, got {item!r}")
        facts, rows = parse_log(Path(path).read_text())
        if not facts:
            ap.error(f"{path}: no 'torch ..., <device>; triton ...' header line: a bench_models --device cuda log?")
        new += [dict(date=date, commit=commit, dtype=dtype, **facts, **r) for r in rows]
    if new:
        fresh = not args.csv.exists()
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            if fresh:
                writer.writeheader()
            writer.writerows(new)
    if not args.csv.exists():
        ap.error(f"{args.csv} does not exist: give DTYPE=LOG arguments to create it")
    with args.csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows:
        last = (rows[-1]["date"], rows[-1]["commit"], rows[-1]["device"])
        run = [r for r in rows if (r["date"], r["commit"], r["device"]) == last]
        print(f"{last[2]}, torch {run[0]['torch']}, triton {run[0]['triton']}; commit {last[1]}, {last[0]}; "
              f"batch {run[0]['batch']}; bf16 = bfloat16 autocast + channels_last\n")
        print(markdown(run))


if __name__ == "__main__":
    main()
