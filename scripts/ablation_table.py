"""Ablation table and plots of one Hydra sweep: `python scripts/ablation_table.py <sweep folder> [--out DIR]`.

Reads every run's `summary.json` (and `metrics.csv`) below the folder, groups the runs by the config keys that
differ between them except `seed` (the swept cells), and prints a Markdown table laid out like the papers' ablation
tables: one row per cell in sweep order, accuracy as mean ± std over the seeds with its difference to the first row,
then params, MACs per image and training images/s. A sweep over exactly two keys that forms a full product is also
printed as a two-way table (rows × columns, as an operators × policies grid). Written to `<out>` (default
`<sweep>/ablation`): `table.md`, `acc_vs_macs.png`, `acc_vs_params.png` and `curves.png` (per-cell training loss and
accuracy by epoch, averaged over seeds). Plots are drawn with PIL (no matplotlib dependency).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IGNORED = {"seed"}  # varies across the runs of one cell by design
MISSING = "–"


@dataclass
class Run:
    folder: Path
    config: dict  # flattened: "op.name" -> value
    acc: float
    params: int | None
    macs: int | None
    img_per_s: float | None
    history: list[dict] = field(default_factory=list)


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


def load_runs(sweep: Path, metric: str | None = None) -> tuple[list[Run], str]:
    paths = sorted((p.parent for p in sweep.rglob("summary.json")), key=lambda f: _job_order(f, sweep))
    if not paths:
        raise SystemExit(f"no summary.json below {sweep}: pass the folder of a finished `train.py -m` sweep")
    runs, metric_name = [], None
    for folder in paths:
        s = json.loads((folder / "summary.json").read_text())
        key = metric or s["config"]["trainer"].get("eval_metric", "acc1")
        metric_name = metric_name or key
        value = s.get("final", {}).get(f"val_{key}")
        if value is None and s.get("best", {}).get("key") == f"val_{key}":
            value = s["best"]["metric"]
        if value is None:
            raise SystemExit(f"{folder}/summary.json has no val_{key}; choose the metric with --metric")
        history = []
        if (folder / "metrics.csv").exists():
            with open(folder / "metrics.csv", newline="") as f:
                history = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
        runs.append(Run(folder, flatten(s["config"]), float(value), s.get("params"), s.get("macs_per_image"),
                        s.get("img_per_s"), history))
    return runs, metric_name


def fill_op_defaults(runs: list[Run]) -> None:
    """A cell that leaves an operator option out runs with the operator's default: show that value (e.g. DDF's
    `branches: both`) wherever another cell of the sweep sets the option, instead of a blank."""
    import dynconv  # the registry knows every operator's defaults

    given = {k for r in runs for k in r.config}
    for r in runs:
        name = r.config.get("op.name")
        if name not in dynconv.list_ops():
            continue
        for key, param in dynconv.op_options(name).items():
            if f"op.{key}" in given and f"op.{key}" not in r.config and param.default is not param.empty:
                r.config[f"op.{key}"] = param.default


def swept_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (a key a cell leaves out counts as a value)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.config))
    return [k for k in keys if k not in IGNORED and len({repr(r.config.get(k, MISSING)) for r in runs}) > 1]


@dataclass
class Cell:
    values: tuple
    runs: list[Run]

    def _stat(self, attr: str) -> list[float]:
        return [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]

    @property
    def acc(self) -> tuple[float, float | None]:
        accs = self._stat("acc")
        return statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else None

    def mean(self, attr: str) -> float | None:
        vals = self._stat(attr)
        return statistics.fmean(vals) if vals else None

    def curve(self, column: str) -> list[tuple[float, float]]:
        """(epoch, value averaged over the seeds that logged it)."""
        by_epoch: dict[float, list[float]] = {}
        for r in self.runs:
            for row in r.history:
                if column in row:
                    by_epoch.setdefault(row.get("epoch", len(by_epoch)), []).append(row[column])
        return [(e, statistics.fmean(v)) for e, v in sorted(by_epoch.items())]


def group(runs: list[Run], keys: list[str]) -> list[Cell]:
    cells: dict[tuple, Cell] = {}
    for r in runs:
        values = tuple(r.config.get(k, MISSING) for k in keys)
        cells.setdefault(values, Cell(values, [])).runs.append(r)
    return list(cells.values())


def short_names(keys: list[str]) -> list[str]:
    """The last part of each dotted key, or the whole key where the last part alone is ambiguous."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return [s if last.count(s) == 1 else k for s, k in zip(last, keys)]


def _fmt(v) -> str:
    if v is None or v == MISSING:
        return MISSING
    return f"{v:g}" if isinstance(v, float) else str(v)


def _acc_text(cell: Cell) -> str:
    mean, std = cell.acc
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _num(v, scale: float, digits: int) -> str:
    return MISSING if v is None else f"{v / scale:.{digits}f}"


def two_se(cell: Cell, ref: Cell) -> float | None:
    """Two standard errors of the difference of the two cells' mean accuracies (None without seed spread)."""
    (_, s), (_, s0) = cell.acc, ref.acc
    if s is None or s0 is None:
        return None
    return 2 * math.sqrt(s * s / len(cell.runs) + s0 * s0 / len(ref.runs))


def markdown_table(cells: list[Cell], keys: list[str], metric: str) -> str:
    """One row per cell; Δ to the first cell is starred where it exceeds two standard errors (2·SE column)."""
    head = short_names(keys) + [f"{metric} (mean ± std)", "Δ", "2·SE", "seeds", "params (M)", "MACs (M)",
                                "train img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = cells[0]
    for c in cells:
        delta, se2 = c.acc[0] - ref.acc[0], two_se(c, ref)
        star = "*" if se2 is not None and abs(delta) > se2 else ""
        lines.append("| " + " | ".join([_fmt(v) for v in c.values] + [
            _acc_text(c), "ref" if c is ref else f"{delta:+.2f}{star}",
            "" if c is ref or se2 is None else f"{se2:.2f}", str(len(c.runs)),
            _num(c.mean("params"), 1e6, 3), _num(c.mean("macs"), 1e6, 1), _num(c.mean("img_per_s"), 1, 0)]) + " |")
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
    lines = [f"| {names[0]} \\ {names[1]} | " + " | ".join(_fmt(v) for v in cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    lines += ["| " + " | ".join([_fmt(r)] + [_acc_text(at[(r, c)]) for c in cols]) + " |" for r in rows]
    return f"{metric} (mean ± std over seeds)\n\n" + "\n".join(lines)


def cell_label(cell: Cell, keys: list[str]) -> str:
    return ", ".join(f"{n}={_fmt(v)}" for n, v in zip(short_names(keys), cell.values)) or "all runs"


# ---------------------------------------------------------------------------------------------------- plots (PIL)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


class Panel:
    """One pair of linear axes inside a PIL image: data coordinates → pixels, ticks, labels."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xs: list[float], ys: list[float],
                 title: str, xlabel: str, ylabel: str):
        self.d, self.font = draw, ImageFont.load_default()
        x0, y0, x1, y1 = box
        self.px = (x0 + 60, x1 - 10)
        self.py = (y1 - 40, y0 + 25)
        pad = lambda lo, hi: (lo - 0.08 * (hi - lo or 1), hi + 0.08 * (hi - lo or 1))  # noqa: E731
        self.xr, self.yr = pad(min(xs), max(xs)), pad(min(ys), max(ys))
        d = self.d
        d.rectangle([self.px[0], self.py[1], self.px[1], self.py[0]], outline=(0, 0, 0))
        for t in _nice_ticks(*self.xr):
            x = self.x(t)
            d.line([x, self.py[0], x, self.py[0] + 4], fill=(0, 0, 0))
            d.text((x, self.py[0] + 6), f"{t:g}", fill=(0, 0, 0), font=self.font, anchor="mt")
        for t in _nice_ticks(*self.yr):
            y = self.y(t)
            d.line([self.px[0] - 4, y, self.px[0], y], fill=(0, 0, 0))
            d.line([self.px[0], y, self.px[1], y], fill=(225, 225, 225))
            d.text((self.px[0] - 6, y), f"{t:g}", fill=(0, 0, 0), font=self.font, anchor="rm")
        d.text(((self.px[0] + self.px[1]) / 2, y0 + 6), title, fill=(0, 0, 0), font=self.font, anchor="mt")
        d.text(((self.px[0] + self.px[1]) / 2, y1 - 14), xlabel, fill=(0, 0, 0), font=self.font, anchor="mt")
        d.text((x0 + 4, y0 + 6), ylabel, fill=(0, 0, 0), font=self.font)

    def x(self, v: float) -> float:
        return self.px[0] + (v - self.xr[0]) / (self.xr[1] - self.xr[0]) * (self.px[1] - self.px[0])

    def y(self, v: float) -> float:
        return self.py[0] + (v - self.yr[0]) / (self.yr[1] - self.yr[0]) * (self.py[1] - self.py[0])

    def point(self, x: float, y: float, err: float | None, color, label: str | None = None) -> None:
        cx, cy = self.x(x), self.y(y)
        if err:
            self.d.line([cx, self.y(y - err), cx, self.y(y + err)], fill=color, width=2)
        self.d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=color)
        if label:
            self.d.text((cx + 6, cy - 6), label, fill=color, font=self.font)

    def line(self, pts: list[tuple[float, float]], color) -> None:
        xy = [(self.x(a), self.y(b)) for a, b in pts]
        if len(xy) > 1:
            self.d.line(xy, fill=color, width=2)
        for cx, cy in xy:
            self.d.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)


def _legend(draw: ImageDraw.ImageDraw, x: int, y: int, labels: list[str]) -> None:
    font = ImageFont.load_default()
    for i, text in enumerate(labels):
        c = PALETTE[i % len(PALETTE)]
        draw.rectangle([x, y + 14 * i + 2, x + 10, y + 14 * i + 10], fill=c)
        draw.text((x + 14, y + 14 * i), text, fill=(0, 0, 0), font=font)


def scatter_png(cells: list[Cell], keys: list[str], attr: str, scale: float, xlabel: str, metric: str,
                path: Path) -> bool:
    pts = [(c.mean(attr), c) for c in cells if c.mean(attr) is not None]
    if not pts:
        return False
    labels = [cell_label(c, keys) for c in cells]
    img = Image.new("RGB", (760, 460 + 14 * len(cells)), "white")
    d = ImageDraw.Draw(img)
    xs = [v / scale for v, _ in pts]
    ys = [b for _, c in pts for b in (c.acc[0] - (c.acc[1] or 0), c.acc[0] + (c.acc[1] or 0))]
    panel = Panel(d, (0, 0, 760, 450), xs, ys, f"{metric} vs {xlabel}", xlabel, metric)
    for v, c in pts:
        i = cells.index(c)
        panel.point(v / scale, c.acc[0], c.acc[1], PALETTE[i % len(PALETTE)], str(i + 1))
    _legend(d, 70, 452, [f"{i + 1}: {t}" for i, t in enumerate(labels)])
    img.save(path)
    return True


def curves_png(cells: list[Cell], keys: list[str], path: Path) -> bool:
    panels = [(col, title) for col, title in (("train_loss", "training loss"), ("train_acc1", "training acc1 (%)"))
              if any(c.curve(col) for c in cells)]
    if not panels:
        return False
    img = Image.new("RGB", (560 * len(panels), 420 + 14 * len(cells)), "white")
    d = ImageDraw.Draw(img)
    for j, (col, title) in enumerate(panels):
        curves = [c.curve(col) for c in cells]
        xs = [e for cv in curves for e, _ in cv]
        ys = [v for cv in curves for _, v in cv]
        panel = Panel(d, (560 * j, 0, 560 * (j + 1), 410), xs, ys, f"{title} per cell (mean over seeds)", "epoch",
                      col)
        for i, cv in enumerate(curves):
            panel.line(cv, PALETTE[i % len(PALETTE)])
    _legend(d, 70, 412, [cell_label(c, keys) for c in cells])
    img.save(path)
    return True


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="the sweep folder (multirun/<name>/<time>)")
    ap.add_argument("--out", type=Path, default=None, help="where table.md and the PNGs go (default <sweep>/ablation)")
    ap.add_argument("--metric", default=None, help="validation metric (default: each run's trainer.eval_metric)")
    args = ap.parse_args(argv)
    runs, metric = load_runs(args.sweep, args.metric)
    fill_op_defaults(runs)
    keys = swept_keys(runs)
    cells = group(runs, keys)
    parts = [f"Sweep `{args.sweep}`: {len(runs)} runs, {len(cells)} cells; swept: "
             f"{', '.join(keys) or '(nothing)'}; accuracy: final val_{metric}.", markdown_table(cells, keys, metric)]
    pivot = pivot_table(cells, keys, metric)
    if pivot:
        parts.append(pivot)
    text = "\n\n".join(parts) + "\n"
    out = args.out or args.sweep / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    scatter_png(cells, keys, "macs", 1e6, "MACs per image (M)", metric, out / "acc_vs_macs.png")
    scatter_png(cells, keys, "params", 1e6, "params (M)", metric, out / "acc_vs_params.png")
    curves_png(cells, keys, out / "curves.png")
    print(text, end="")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
