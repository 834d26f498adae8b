"""Ablation tables and plots: `python scripts/ablation_table.py <sweep or results folder> [--out DIR]`.

Given a finished Hydra sweep (`multirun/<name>/<time>`), first writes its per-run data as CSV to `<out>`:
`runs.csv` (one row per run: the swept keys that define its cell, seed, final validation metric, optimizer steps,
params, MACs per image, training images/s, wall time, commit, and every final metric) and `epochs.csv` (every run's
per-epoch metrics). The table and the plots are then made from those two files alone, so
`python scripts/ablation_table.py docs/results/<suite>` regenerates them, byte for byte, from committed data.

The table has one row per cell in sweep order: accuracy as mean ± std over the seeds, its difference to the
reference cell (the first, or `--ref key=value`) with the 95 % confidence interval, and the Welch t-test's p-value
Holm-corrected over the table's comparisons (engine/ablation.py). A `findings.csv` beside the data (cell keys,
`expected` as + / - / 0, `finding`) adds the paper's finding and the verdict: "consistent with", "contradicts" or
"inconclusive". With a `vs` column (`key=value[,key=value]`, the cell the paper compares it with), each finding's cell
is compared with its own reference, only the cells with a finding are compared, and the table names each reference
by its key values in a `vs` column (suites whose findings are against different cells: DDF's branches vs the conv, its normalisations
vs FilterNorm). A sweep over two keys that forms a full product is also printed as rows × columns.
`--budget KEY` reads the sweep as a training-budget curve: KEY (e.g. data.train_subset) sets the budget, every cell is
compared with the reference at the same budget, and `budget.png` plots accuracy and the gap to the reference against
training steps. Plots (matplotlib, Okabe–Ito colour-blind-safe palette): acc_vs_macs.png, acc_vs_params.png (error
bars: 95 % CI of the mean), curves.png (per-cell training curves, mean over seeds).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.ablation import (FIXED, Cell, Comparison, Finding, cell_label, compare, read_table,  # noqa: E402
                             short_names, verdict)

IGNORED = {"seed"}  # varies across the runs of one cell by design
MISSING = "–"


# ------------------------------------------------------------------------------------------- sweep folder → CSV
def flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


def _job_order(folder: Path, root: Path):
    """Hydra numbers the jobs of a sweep in product order; sort numerically where the names are numbers."""
    return [int(p) if p.isdigit() else math.inf for p in folder.relative_to(root).parts], str(folder)


def _final_metric(s: dict, key: str, folder: Path) -> float:
    value = s.get("final", {}).get(f"val_{key}")
    if value is None and s.get("best", {}).get("key") == f"val_{key}":
        value = s["best"]["metric"]
    if value is None:
        raise SystemExit(f"{folder}/summary.json has no val_{key}; choose the metric with --metric")
    return float(value)


def _commit(folder: Path, s: dict) -> str:
    hp = folder / "hparams.json"
    if hp.exists():
        return json.loads(hp.read_text())["hparams"].get("commit", "unknown")
    return s.get("commit", "unknown")


def load_sweep(sweep: Path, metric: str | None) -> tuple[list[dict], str]:
    """One record per run: flattened config, the metric, the fixed columns, final metrics, per-epoch rows."""
    folders = sorted((p.parent for p in sweep.rglob("summary.json")), key=lambda f: _job_order(f, sweep))
    if not folders:
        raise SystemExit(f"no summary.json below {sweep}: pass the folder of a finished `train.py -m` sweep, "
                         "or a results folder holding runs.csv")
    records, name = [], None
    for folder in folders:
        s = json.loads((folder / "summary.json").read_text())
        if s.get("epochs_done") != s.get("total_epochs"):  # summary.json is rewritten after every epoch
            print(f"skipping {folder}: unfinished ({s.get('epochs_done')} of {s.get('total_epochs')} epochs)",
                  file=sys.stderr)
            continue
        name = name or metric or s["config"]["trainer"].get("eval_metric", "acc1")
        epochs = []
        if (folder / "metrics.csv").exists():
            with open(folder / "metrics.csv", newline="") as f:
                epochs = list(csv.DictReader(f))
        records.append({"run": folder.relative_to(sweep).as_posix(), "config": flatten(s["config"]),
                        "metric": _final_metric(s, name, folder), "steps": s.get("num_updates"),
                        "params": s.get("params"), "macs": s.get("macs_per_image"), "img_per_s": s.get("img_per_s"),
                        "wall_time_s": s.get("wall_time_s"), "commit": _commit(folder, s),
                        "final": {k: v for k, v in s.get("final", {}).items() if k != "epoch"}, "epochs": epochs})
    if not records:
        raise SystemExit(f"no finished run below {sweep}: every summary.json there is of an unfinished run")
    return records, name


def fill_op_defaults(records: list[dict]) -> None:
    """A cell that leaves an operator option out runs with the operator's default: show that value (e.g. DDF's
    `branches: both`) wherever another cell of the sweep sets the option, instead of a blank."""
    import dynconv  # the registry knows every operator's defaults

    given = {k for r in records for k in r["config"]}
    for r in records:
        name = r["config"].get("op.name")
        if name not in dynconv.list_ops():
            continue
        for key, param in dynconv.op_options(name).items():
            if f"op.{key}" in given and f"op.{key}" not in r["config"] and param.default is not param.empty:
                r["config"][f"op.{key}"] = param.default


def swept_keys(records: list[dict]) -> list[str]:
    """Config keys whose value is not the same in every run (a key a cell leaves out counts as a value)."""
    keys = list(dict.fromkeys(k for r in records for k in r["config"]))
    return [k for k in keys if k not in IGNORED and len({repr(r["config"].get(k, MISSING)) for r in records}) > 1]


def _fmt(v) -> str:
    if v is None or v == MISSING:
        return MISSING
    return f"{v:g}" if isinstance(v, float) else str(v)


def _num(v) -> str:
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def export(sweep: Path, out: Path, metric: str | None) -> None:
    """Write `runs.csv` and `epochs.csv` of a sweep folder to `out`."""
    records, name = load_sweep(sweep, metric)
    fill_op_defaults(records)
    keys = swept_keys(records)
    finals = list(dict.fromkeys(k for r in records for k in r["final"]))
    header = ["run", *keys, "seed", f"val_{name}", *FIXED, *(f"final_{k}" for k in finals)]
    rows = [[r["run"], *(_fmt(r["config"].get(k, MISSING)) for k in keys), _fmt(r["config"].get("seed")),
             _num(r["metric"]), *(_num(r[k]) for k in FIXED), *(_num(r["final"].get(k)) for k in finals)]
            for r in records]
    cols = list(dict.fromkeys(k for r in records for row in r["epochs"] for k in row))
    epoch_rows = [[r["run"], *(row.get(k) or "" for k in cols)] for r in records for row in r["epochs"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.csv").write_text(_csv_text(header, rows))
    (out / "epochs.csv").write_text(_csv_text(["run", *cols], epoch_rows))


# ------------------------------------------------------------------------------------------- tables
def _p_text(p: float) -> str:
    return MISSING if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def _delta_text(cmp: Comparison) -> str:
    ci = "" if math.isnan(cmp.low) else f" [{cmp.low:+.2f}, {cmp.high:+.2f}]"
    return f"{cmp.diff:+.2f}{ci}"


def _acc_text(cell: Cell) -> str:
    mean, std = cell.acc
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _scaled(v, scale: float, digits: int) -> str:
    return MISSING if v is None else f"{v / scale:.{digits}f}"


def markdown_table(cells: list[Cell], keys: list[str], metric: str, refs: dict[int, Cell],
                   findings: dict[tuple, Finding]) -> str:
    comparisons = compare(cells, refs)
    with_vs = any(f.vs for f in findings.values())
    is_ref = {id(r) for i, r in refs.items() if r is not cells[i]}
    head = short_names(keys) + [f"{metric} (mean ± std)", *(["vs"] if with_vs else []), "Δ [95 % CI]", "p (Holm)",
                                "seeds", "steps", "params (M)", "MACs (M)", "train img/s"] + \
        (["paper", "verdict"] if findings else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, c in enumerate(cells):
        cmp, p = comparisons.get(i, (None, math.nan))
        f = findings.get(c.values, Finding("", ""))
        delta = _delta_text(cmp) if cmp else "ref" if not with_vs or id(c) in is_ref else MISSING
        vs = ", ".join(v for v in refs[i].values if v != MISSING) if cmp else ""  # the reference's key values
        row = [*c.values, _acc_text(c), *([vs] if with_vs else []), delta, _p_text(p),
               str(len(c.runs)), _scaled(c.mean("steps"), 1, 0), _scaled(c.mean("params"), 1e6, 3),
               _scaled(c.mean("macs"), 1e6, 1), _scaled(c.mean("img_per_s"), 1, 0)]
        if findings:
            row += [f.text, "" if cmp is None or not f.expected else verdict(cmp.diff, p, f.expected)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def pivot_table(cells: list[Cell], keys: list[str], metric: str) -> str | None:
    """Rows × columns of the two swept keys when the cells are their full product; else None."""
    if len(keys) != 2:
        return None
    rows = list(dict.fromkeys(c.values[0] for c in cells))
    cols = list(dict.fromkeys(c.values[1] for c in cells))
    at = {c.values: c for c in cells}
    if len(at) != len(rows) * len(cols):
        return None
    names = short_names(keys)
    lines = [f"| {names[0]} \\ {names[1]} | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    lines += ["| " + " | ".join([r] + [_acc_text(at[(r, c)]) for c in cols]) + " |" for r in rows]
    return f"{metric} (mean ± std over seeds)\n\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------------- plots (matplotlib)
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#000000", "#F0E442"]
MARKERS = "osD^vP*Xh<>p"  # with 8 colours, (colour, marker) pairs stay distinct for 24 cells


def _style(i: int) -> dict:
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)]}


def _figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.2), squeeze=False)
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
    return plt, fig, list(axes[0])


def _save(plt, fig, ax, path: Path) -> None:
    """Legend (naming the cells) below the panels; no version metadata, so equal data give equal bytes."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize="small",
               frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def errorbar_png(points: list[tuple[str, float, float, float]], xlabel: str, ylabel: str, title: str,
                 path: Path) -> None:
    """One marker per (label, x, mean, 95 % CI half-width), the labels in the legend."""
    plt, fig, (ax,) = _figure(1)
    for i, (label, x, mean, half) in enumerate(points):
        ax.errorbar(x, mean, yerr=half, capsize=3, linestyle="none", label=label, **_style(i))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    _save(plt, fig, ax, path)


def scatter_png(cells: list[Cell], keys: list[str], column: str, scale: float, xlabel: str, metric: str,
                path: Path) -> bool:
    points = [(cell_label(c, keys), c.mean(column) / scale, c.acc[0], c.ci95()) for c in cells
              if c.mean(column) is not None]
    if points:
        errorbar_png(points, xlabel, f"val {metric} (%), mean and 95 % CI", f"{metric} vs {xlabel}", path)
    return bool(points)


def curves_png(cells: list[Cell], keys: list[str], path: Path) -> bool:
    panels = [(col, title) for col, title in (("train_loss", "training loss"), ("train_acc1", "training acc1 (%)"),
                                               ("val_acc1", "val acc1 (%)"))
              if any(c.curve(col) for c in cells)]
    if not panels:
        return False
    plt, fig, axes = _figure(len(panels))
    for ax, (col, title) in zip(axes, panels):
        for i, c in enumerate(cells):
            pts = c.curve(col)
            ax.plot([e for e, _ in pts], [v for _, v in pts], label=cell_label(c, keys), **_style(i))
        ax.set(xlabel="epoch", ylabel=title, title=f"{title} per cell (mean over seeds)")
    _save(plt, fig, axes[0], path)
    return True


def budget_png(cells: list[Cell], keys: list[str], refs: dict[int, Cell], budget: str, path: Path) -> None:
    """Accuracy vs training steps (log axis, 95 % bands) per line, and the gap to the reference with its 95 % CI."""
    lines: dict[str, list[int]] = {}
    for i, c in enumerate(cells):
        lines.setdefault(cell_label(c, keys, skip=budget), []).append(i)
    plt, fig, (acc_ax, gap_ax) = _figure(2)
    comparisons = compare(cells, refs)
    for j, (label, idx) in enumerate(lines.items()):
        idx = sorted(idx, key=lambda i: cells[i].mean("steps"))
        steps = [cells[i].mean("steps") for i in idx]
        mean = [cells[i].acc[0] for i in idx]
        half = [cells[i].ci95() for i in idx]
        acc_ax.plot(steps, mean, label=label, **_style(j))
        acc_ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                            color=_style(j)["color"], alpha=0.2)
        gaps = [(cells[i].mean("steps"), comparisons[i][0]) for i in idx if i in comparisons]
        if gaps:
            gap_ax.plot([s for s, _ in gaps], [g.diff for _, g in gaps], label=label, **_style(j))
            gap_ax.fill_between([s for s, _ in gaps], [g.low for _, g in gaps], [g.high for _, g in gaps],
                                color=_style(j)["color"], alpha=0.2)
    for ax in (acc_ax, gap_ax):
        ax.set_xscale("log")
    gap_ax.axhline(0.0, color="black", linewidth=0.8)
    acc_ax.set(xlabel="training steps (log)", ylabel="val acc (%), mean and 95 % band", title="accuracy vs budget")
    gap_ax.set(xlabel="training steps (log)", ylabel="Δ to the reference (points), 95 % CI",
               title="gap to the reference vs budget")
    _save(plt, fig, acc_ax, path)


# ------------------------------------------------------------------------------------------- command line
def render(data: Path, out: Path, ref: str | None, budget: str | None) -> str:
    """Table and plots from `data`'s runs.csv / epochs.csv (and findings.csv) into `out`; returns the table."""
    t = read_table(data, ref, budget)
    keys, metric, cells, refs, findings, own = t.keys, t.metric, t.cells, t.refs, t.findings, t.own_refs
    against = "the cell in the vs column" if own else f"{ref or 'the first row'}"
    comparisons = sum(refs[i] is not c for i, c in enumerate(cells))
    parts = [f"{sum(len(c.runs) for c in cells)} runs, {len(cells)} cells; swept: {', '.join(keys) or '(nothing)'}; "
             f"accuracy: final val_{metric}. Δ against {against}"
             f"{f' at the same {budget}' if budget else ''}; p: Welch's t-test, Holm-corrected over the "
             f"{comparisons} comparisons of this table.",
             markdown_table(cells, keys, metric, refs, findings)]
    pivot = pivot_table(cells, keys, metric)
    if pivot and not budget:
        parts.append(pivot)
    text = "\n\n".join(parts) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    scatter_png(cells, keys, "macs", 1e6, "MACs per image (M)", metric, out / "acc_vs_macs.png")
    scatter_png(cells, keys, "params", 1e6, "params (M)", metric, out / "acc_vs_params.png")
    curves_png(cells, keys, out / "curves.png")
    if budget:
        budget_png(cells, keys, refs, budget, out / "budget.png")
    return text


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path, help="a sweep folder (multirun/<name>/<time>) or a folder holding runs.csv")
    ap.add_argument("--out", type=Path, default=None,
                    help="where the CSVs, table.md and PNGs go (default: <sweep>/ablation, or the results folder)")
    ap.add_argument("--metric", default=None, help="validation metric (default: each run's trainer.eval_metric)")
    ap.add_argument("--ref", default=None, help="reference cell as key=value[,key=value] (default: the first cell)")
    ap.add_argument("--budget", default=None, help="the swept key that sets the training budget (budget curve)")
    args = ap.parse_args(argv)
    data = args.path
    if next(args.path.rglob("summary.json"), None) is not None:
        data = args.out or args.path / "ablation"
        export(args.path, data, args.metric)
    text = render(data, args.out or data, args.ref, args.budget)
    print(text, end="")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
