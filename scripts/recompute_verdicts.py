"""Verdicts of the published ablation tables, recomputed from their summary statistics:
`python scripts/recompute_verdicts.py [docs/results/published] [--img docs/img]`.

The per-run data behind docs/RESULTS.md's first tables were not kept; their tables give each cell's mean, standard
deviation and number of seeds (`cells.csv`), and the comparisons they made with the paper's finding and the verdict
they printed under the old rule, |Δ| > 2·SE with no correction (`comparisons.csv`; `suites.csv` names the commit
that recorded each table). From those alone this writes `verdicts.md`: per suite, Welch's t-test of each
comparison (scripts/ablation_stats.py) with its 95 % CI, the p-value before and after Holm's correction over the
suite's comparisons, and the verdicts; then the counts of verdicts under the old rule, under Welch's test without
correction, with Benjamini–Hochberg's and with Holm's (the verdicts), and the list of verdicts that changed. It also draws each suite's accuracy against MACs
(`<img>/ablation_<suite>_acc_vs_macs.png`, error bars: 95 % CI of the mean).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import Counter
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.ablation_stats import benjamini_hochberg, holm, verdict, welch  # noqa: E402
from scripts.ablation_table import errorbar_png  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("consistent with", "contradicts", "inconclusive")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def published_word(text: str) -> str:
    """The old verdict in the new words: 'agrees' (also 'no measurable change, agrees') → consistent with."""
    return "contradicts" if "disagree" in text else "consistent with" if "agree" in text else "inconclusive"


def recompute(folder: Path) -> list[dict]:
    """One dict per comparison, with Welch's statistics, raw and Holm-adjusted p, and the three verdicts."""
    cells = {(r["suite"], r["cell"]): r for r in _rows(folder / "cells.csv")}
    out = []
    for suite in dict.fromkeys(r["suite"] for r in _rows(folder / "suites.csv")):
        comps = [c for c in _rows(folder / "comparisons.csv") if c["suite"] == suite]
        for c in comps:
            a, b = cells[(suite, c["cell"])], cells[(suite, c["ref"])]
            c["a"], c["b"] = a, b
            c["cmp"] = welch(float(a["mean"]), float(a["sd"]), int(a["n"]), float(b["mean"]), float(b["sd"]),
                             int(b["n"]))
        raw = [c["cmp"].p for c in comps]
        for c, p_holm, p_bh in zip(comps, holm(raw), benjamini_hochberg(raw)):
            c["p_holm"] = p_holm
            c["bh"] = verdict(c["cmp"].diff, p_bh, c["expected"])
            c["old"] = published_word(c["published"])
            c["raw"] = verdict(c["cmp"].diff, c["cmp"].p, c["expected"])
            c["now"] = verdict(c["cmp"].diff, p_holm, c["expected"])
        out += comps
    return out


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def suite_table(comps: list[dict]) -> str:
    head = ["cell", "vs", "paper's finding", "Δ [95 % CI]", "p", "p (Holm)", "old rule (2·SE)", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in comps:
        cmp = c["cmp"]
        lines.append("| " + " | ".join([
            c["cell"], c["ref"], f"{c['finding']} ({c['expected']})", f"{cmp.diff:+.2f} [{cmp.low:+.2f}, {cmp.high:+.2f}]", _p(cmp.p), _p(c["p_holm"]), c["published"],
            f"**{c['now']}**" if c["now"] != "inconclusive" else c["now"]]) + " |")
    return "\n".join(lines)


def cells_table(cells: list[dict]) -> str:
    lines = ["| cell | acc (mean ± std) | seeds | params (M) | MACs (M) |", "|---|---|---|---|---|"]
    lines += [f"| {c['cell']} | {float(c['mean']):.2f} ± {float(c['sd']):.2f} | {c['n']} | {c['params_m']} | "
              f"{c['macs_m']} |" for c in cells]
    return "\n".join(lines)


def counts_table(comps: list[dict], suites: list[str]) -> str:
    head = ["suite", "comparisons", "old rule: consistent / contradicts / inconclusive",
            "Welch, uncorrected", "Welch + Benjamini–Hochberg", "Welch + Holm (the verdicts)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for suite in [*suites, "all"]:
        sel = [c for c in comps if suite in ("all", c["suite"])]
        cols = [" / ".join(str(Counter(c[k] for c in sel)[w]) for w in WORDS) for k in ("old", "raw", "bh", "now")]
        lines.append("| " + " | ".join([suite, str(len(sel)), *cols]) + " |")
    return "\n".join(lines)


def render(folder: Path) -> str:
    suites, cells = _rows(folder / "suites.csv"), _rows(folder / "cells.csv")
    comps = recompute(folder)
    parts = []
    for s in suites:
        sel = [c for c in comps if c["suite"] == s["suite"]]
        parts.append(f"### {s['title']}\n\nMeasured by `{s['command']}`, table recorded in commit `{s['commit']}`; "
                     f"plot: docs/img/ablation_{s['suite']}_acc_vs_macs.png.\n\n"
                     f"{cells_table([c for c in cells if c['suite'] == s['suite']])}\n\n"
                     f"{len(sel)} comparisons with the paper's findings; p Holm-corrected over these {len(sel)}:\n\n"
                     f"{suite_table(sel)}")
    names = [s["suite"] for s in suites]
    parts.append("### Verdict counts (consistent with / contradicts / inconclusive)\n\n" + counts_table(comps, names))
    changed = [c for c in comps if c["now"] != c["old"]]
    parts.append(f"### Verdicts that changed from the old rule ({len(changed)} of {len(comps)})\n\n" + "\n".join(
        f"- {c['suite']}: {c['cell']} vs {c['ref']} ({c['finding']}): {c['old']} → {c['now']} "
        f"(Δ {c['cmp'].diff:+.2f}, Holm p {_p(c['p_holm'])})" for c in changed))
    return "\n\n".join(parts) + "\n"


def plots(folder: Path, img: Path) -> None:
    cells = _rows(folder / "cells.csv")
    for suite in dict.fromkeys(c["suite"] for c in cells):
        points = [(c["cell"], float(c["macs_m"]), float(c["mean"]),
                   stats.t.ppf(0.975, int(c["n"]) - 1) * float(c["sd"]) / math.sqrt(int(c["n"])))
                  for c in cells if c["suite"] == suite]
        errorbar_png(points, "MACs per image (M)", "val accuracy (%), mean and 95 % CI",
                     f"{suite}: accuracy vs MACs (published summaries)", img / f"ablation_{suite}_acc_vs_macs.png")


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, nargs="?", default=ROOT / "docs" / "results" / "published")
    ap.add_argument("--img", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    args = ap.parse_args(argv)
    text = render(args.folder)
    (args.folder / "verdicts.md").write_text(text)
    args.img.mkdir(parents=True, exist_ok=True)
    plots(args.folder, args.img)
    print(text, end="")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
