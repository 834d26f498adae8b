"""Ablation results as data: the cells of a sweep (its runs, one per seed) read from the `runs.csv`, `epochs.csv` and
`findings.csv` that scripts/ablation_table.py writes, each cell's reference, and the statistics that compare them:
Welch's t-test of two cells' mean accuracies with its 95 % confidence interval, Holm's (or Benjamini–Hochberg's)
correction over the comparisons of one suite, and the verdict words against a paper's finding.

A verdict is "consistent with" or "contradicts" the finding only where the Holm-adjusted p-value is below
`ALPHA`; otherwise it is "inconclusive". A finding that expects no change is never confirmed by a difference that
is not significant (absence of evidence is not agreement): that is "inconclusive" too.
"""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from scipy import stats

FIXED = ["steps", "params", "macs", "img_per_s", "wall_time_s", "commit"]  # runs.csv columns after the metric

ALPHA = 0.05
EXPECTED = {"+": 1, "-": -1, "0": 0}  # the finding says: the cell is above / below / level with its reference


@dataclass(frozen=True)
class Comparison:
    diff: float       # mean(cell) - mean(reference)
    low: float        # 95 % confidence interval of the difference (Welch–Satterthwaite degrees of freedom)
    high: float
    p: float          # two-sided Welch t-test; nan where a cell has fewer than 2 seeds or no spread


def welch(mean: float, sd: float, n: int, ref_mean: float, ref_sd: float, ref_n: int,
          level: float = 0.95) -> Comparison:
    """Welch's t-test from summary statistics (sample standard deviations), as scipy's ttest_ind_from_stats."""
    diff = mean - ref_mean
    var = sd * sd / n + ref_sd * ref_sd / ref_n if n > 1 and ref_n > 1 else 0.0
    if var == 0.0:
        return Comparison(diff, math.nan, math.nan, math.nan)
    p = stats.ttest_ind_from_stats(mean, sd, n, ref_mean, ref_sd, ref_n, equal_var=False).pvalue
    dof = var * var / ((sd * sd / n) ** 2 / (n - 1) + (ref_sd * ref_sd / ref_n) ** 2 / (ref_n - 1))
    half = stats.t.ppf(0.5 + level / 2, dof) * math.sqrt(var)
    return Comparison(diff, diff - half, diff + half, float(p))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate); nan entries stay nan and are not counted."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    out, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        out[i] = running
    return out


def benjamini_hochberg(pvalues: list[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (false discovery rate); nan entries stay nan and are not counted."""
    order = sorted(((p, i) for i, p in enumerate(pvalues) if not math.isnan(p)), reverse=True)
    out, running = [math.nan] * len(pvalues), 1.0
    for rank, (p, i) in enumerate(order):
        running = min(running, p * len(order) / (len(order) - rank))
        out[i] = running
    return out


def verdict(diff: float, p: float, expected: str) -> str:
    """`consistent with` / `contradicts` / `inconclusive` for a finding that expects `+`, `-` or `0`."""
    if expected not in EXPECTED:
        raise ValueError(f"expected={expected!r}: write + (cell above its reference), - (below) or 0 (level)")
    if math.isnan(p) or p >= ALPHA:
        return "inconclusive"
    sign = EXPECTED[expected]
    return "consistent with" if sign != 0 and sign * diff > 0 else "contradicts"


def old_rule(diff: float, se: float, expected: str) -> str:
    """The first tables' rule, kept to count what the correction changed: a difference "agrees" or "disagrees" when
    |Δ| > 2·SE (no test, no correction), and a finding of no change "agrees" whenever |Δ| ≤ 2·SE. In today's words."""
    if expected not in EXPECTED:
        raise ValueError(f"expected={expected!r}: write + (cell above its reference), - (below) or 0 (level)")
    sign, beyond = EXPECTED[expected], abs(diff) > 2 * se
    if sign == 0:
        return "contradicts" if beyond else "consistent with"
    return "inconclusive" if not beyond else "consistent with" if sign * diff > 0 else "contradicts"


@dataclass
class Run:
    values: tuple  # the cell keys' values, as written
    acc: float
    fixed: dict    # FIXED columns (floats; commit as text)
    history: list[dict] = field(default_factory=list)


@dataclass
class Cell:
    values: tuple
    runs: list[Run]

    @property
    def accs(self) -> list[float]:
        return [r.acc for r in self.runs]

    @property
    def acc(self) -> tuple[float, float | None]:
        return statistics.fmean(self.accs), statistics.stdev(self.accs) if len(self.runs) > 1 else None

    def mean(self, column: str) -> float | None:
        vals = [r.fixed[column] for r in self.runs if r.fixed.get(column) is not None]
        return statistics.fmean(vals) if vals else None

    def ci95(self) -> float:
        """Half-width of the 95 % confidence interval of the mean accuracy (0 with one seed)."""
        n, (_, sd) = len(self.runs), self.acc
        return 0.0 if sd is None else float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))

    def curve(self, column: str) -> list[tuple[float, float]]:
        """(epoch, value averaged over the seeds that logged it)."""
        by_epoch: dict[float, list[float]] = {}
        for r in self.runs:
            for row in r.history:
                if column in row:
                    by_epoch.setdefault(row.get("epoch", len(by_epoch)), []).append(row[column])
        return [(e, statistics.fmean(v)) for e, v in sorted(by_epoch.items())]


def read_results(folder: Path) -> tuple[list[str], str, list[Cell]]:
    """(cell keys, metric name, cells in first-appearance order) from `runs.csv` and `epochs.csv`."""
    if not (folder / "runs.csv").exists():
        raise SystemExit(f"{folder} has neither summary.json files nor runs.csv")
    with open(folder / "runs.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    seed = header.index("seed")
    keys, metric = header[1:seed], header[seed + 1].removeprefix("val_")
    history: dict[str, list[dict]] = {}
    if (folder / "epochs.csv").exists():
        with open(folder / "epochs.csv", newline="") as f:
            for row in csv.DictReader(f):
                history.setdefault(row.pop("run"), []).append({k: float(v) for k, v in row.items() if v != ""})
    cells: dict[tuple, Cell] = {}
    for row in rows:
        fixed = {k: (v if k == "commit" else float(v) if v else None)
                 for k, v in zip(FIXED, row[seed + 2:seed + 2 + len(FIXED)])}
        values = tuple(row[1:seed])
        run = Run(values, float(row[seed + 1]), fixed, history.get(row[0], []))
        cells.setdefault(values, Cell(values, [])).runs.append(run)
    return keys, metric, list(cells.values())


def short_names(keys: list[str]) -> list[str]:
    """The last part of each dotted key, or the whole key where the last part alone is ambiguous."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return [s if last.count(s) == 1 else k for s, k in zip(last, keys)]


def cell_label(cell: Cell, keys: list[str], skip: str | None = None) -> str:
    return ", ".join(f"{n}={v}" for k, n, v in zip(keys, short_names(keys), cell.values) if k != skip) or "all runs"


def _match(cell: Cell, keys: list[str], spec: dict[str, str]) -> bool:
    return all(cell.values[keys.index(k)] == v for k, v in spec.items())


def references(cells: list[Cell], keys: list[str], ref: str | None, budget: str | None) -> dict[int, Cell]:
    """Each cell's reference (by index): the first cell, or the cell matching `--ref key=value[,key=value]`; with a
    budget key, the matching cell at the same budget."""
    spec = dict(part.split("=", 1) for part in ref.split(",")) if ref else {}
    for k in [*spec, *([budget] if budget else [])]:
        if k not in keys:
            raise SystemExit(f"--ref/--budget key {k!r} is not a swept key; the swept keys are {keys}")
    out = {}
    for i, c in enumerate(cells):
        same = {budget: c.values[keys.index(budget)]} if budget else {}
        found = [r for r in cells if _match(r, keys, {**spec, **same})] if spec or same else cells[:1]
        if not found:
            raise SystemExit(f"no reference cell matches {ref!r} for {cell_label(c, keys)}")
        out[i] = found[0]
    return out


def compare(cells: list[Cell], refs: dict[int, Cell]) -> dict[int, tuple[Comparison, float]]:
    """Welch comparison of every non-reference cell with its reference, with Holm-adjusted p over all of them."""
    raw = {}
    for i, c in enumerate(cells):
        ref = refs[i]
        if ref is not c:
            (m, s), (m0, s0) = c.acc, ref.acc
            raw[i] = welch(m, s or 0.0, len(c.runs), m0, s0 or 0.0, len(ref.runs))
    adjusted = holm([cmp.p for cmp in raw.values()])
    return {i: (cmp, p) for (i, cmp), p in zip(raw.items(), adjusted)}


@dataclass(frozen=True)
class Finding:
    expected: str  # + / - / 0: the cell above / below / level with its reference
    text: str      # the paper's finding
    vs: str = ""   # the reference cell as key=value[,key=value]; empty: the table's reference
    cell: str = ""  # the cell's name in the published tables (scripts/verdict_summary.py matches on it)


def read_findings(folder: Path, keys: list[str]) -> dict[tuple, Finding]:
    """`findings.csv`: cell values (columns named by the cell keys) → the paper's finding (and its reference)."""
    path = folder / "findings.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [k for k in keys if rows and k not in rows[0]]
    if missing:
        raise SystemExit(f"{path} lacks the cell key columns {missing}")
    return {tuple(r[k] for k in keys): Finding(r["expected"], r["finding"], r.get("vs") or "", r.get("cell") or "")
            for r in rows}


def finding_references(cells: list[Cell], keys: list[str], findings: dict[tuple, Finding]) -> dict[int, Cell] | None:
    """With findings against their own reference (`vs`): each finding's cell → that reference, every other cell →
    itself (not compared). None when no finding names a reference."""
    if not any(f.vs for f in findings.values()):
        return None
    known = {c.values for c in cells}
    for values in findings:
        if values not in known:
            raise SystemExit(f"findings.csv names a cell the data lack: {dict(zip(keys, values))}")
    out = {}
    for i, c in enumerate(cells):
        f = findings.get(c.values)
        if f is None or not f.vs:
            out[i] = c
            continue
        out[i] = _find(cells, keys, f.vs)
    return out


def _find(cells: list[Cell], keys: list[str], spec_text: str) -> Cell:
    spec = dict(part.split("=", 1) for part in spec_text.split(","))
    for k in spec:
        if k not in keys:
            raise SystemExit(f"findings.csv vs={spec_text!r}: {k!r} is not a swept key; the swept keys are {keys}")
    found = [c for c in cells if _match(c, keys, spec)]
    if len(found) != 1:
        raise SystemExit(f"findings.csv vs={spec_text!r} matches {len(found)} cells; name one cell")
    return found[0]


def _budget_order(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:  # a non-numeric budget sorts after the numbers, by name
        return (1, 0.0, value)


@dataclass
class Table:
    keys: list[str]
    metric: str
    cells: list[Cell]
    refs: dict[int, Cell]          # each cell's reference (itself: not compared)
    findings: dict[tuple, Finding]
    own_refs: bool                 # the references come from findings.csv's vs column


def read_table(data: Path, ref: str | None = None, budget: str | None = None) -> Table:
    """The cells of `data`'s runs.csv / epochs.csv, their references and findings, in table order."""
    keys, metric, cells = read_results(data)
    if budget in keys:  # a curve reads by budget: rows and plot points in increasing budget, stable within one
        cells.sort(key=lambda c: _budget_order(c.values[keys.index(budget)]))
    findings = read_findings(data, keys)
    own = finding_references(cells, keys, findings)
    return Table(keys, metric, cells, own or references(cells, keys, ref, budget), findings, own is not None)
