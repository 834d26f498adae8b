"""The verdicts of every rerun suite together: `python scripts/verdict_summary.py [docs/results]`.

Reads each suite's per-run data and findings (docs/results/<suite>/runs.csv, findings.csv) as
scripts/ablation_table.py tabulates them, and writes `verdicts.md` beside them:
- the counts of verdicts ("consistent with" / "contradicts" / "inconclusive") per suite under the first tables' rule
  (|Δ| > 2·SE, no test, no correction), under Welch's test without correction, with Benjamini–Hochberg's correction
  and with Holm's (the verdicts of the tables);
- the comparisons whose verdict the correction changed (the first rule → Holm);
- the comparisons whose Holm verdict differs from the first published tables'. Their per-run data were not kept:
  docs/results/published holds what they printed (`cells.csv`: each cell's mean, standard deviation and seeds;
  `comparisons.csv`: the comparisons with the finding and the verdict under the first rule; `suites.csv`: the commit
  that recorded each table), and their Welch statistics are recomputed from those summaries. A rerun comparison is
  matched to its published one by findings.csv's `cell` column.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.ablation import benjamini_hochberg, compare, holm, old_rule, read_table, verdict, welch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("consistent with", "contradicts", "inconclusive")
# each rerun suite and its `ablation_table.py docs/results/<suite>` arguments (the budget curve is not a paper suite)
SUITES = {"involution": [], "ddf": [], "dcd": [], "dk": [], "tvconv": [], "grid": ["--ref", "op.name=conv"]}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def published_word(text: str) -> str:
    """A first-rule verdict in today's words: 'agrees' (also 'no measurable change, agrees') → consistent with."""
    return "contradicts" if "disagree" in text else "consistent with" if "agree" in text else "inconclusive"


def published_comparisons(folder: Path) -> list[dict]:
    """The published tables' comparisons, Welch-tested from their summaries, Holm over each suite's comparisons."""
    cells = {(r["suite"], r["cell"]): r for r in _rows(folder / "cells.csv")}
    out = []
    for suite in dict.fromkeys(r["suite"] for r in _rows(folder / "suites.csv")):
        comps = [c for c in _rows(folder / "comparisons.csv") if c["suite"] == suite]
        for c in comps:
            a, b = cells[(suite, c["cell"])], cells[(suite, c["ref"])]
            c["cmp"] = welch(float(a["mean"]), float(a["sd"]), int(a["n"]), float(b["mean"]), float(b["sd"]),
                             int(b["n"]))
            c["old"] = published_word(c["published"])
        for c, p_holm in zip(comps, holm([c["cmp"].p for c in comps])):
            c["p_holm"] = p_holm
            c["now"] = verdict(c["cmp"].diff, p_holm, c["expected"])
        out += comps
    return out


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def counts_table(comps: list[dict], suites: list[str]) -> str:
    head = ["suite", "comparisons", "first rule (2·SE): consistent / contradicts / inconclusive",
            "Welch, uncorrected", "Welch + Benjamini–Hochberg", "Welch + Holm (the verdicts)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for suite in [*suites, "all"]:
        sel = [c for c in comps if suite in ("all", c["suite"])]
        cols = [" / ".join(str(Counter(c[k] for c in sel)[w]) for w in WORDS) for k in ("old", "raw", "bh", "now")]
        lines.append("| " + " | ".join([suite, str(len(sel)), *cols]) + " |")
    return "\n".join(lines)


def suite_comparisons(folder: Path, args: list[str]) -> list[dict]:
    """One dict per comparison with a finding: its label, the table's Welch comparison and Holm p, the four verdicts."""
    t = read_table(folder, args[args.index("--ref") + 1] if "--ref" in args else None)
    compared = compare(t.cells, t.refs)  # the table's own statistics (Holm over the table's comparisons)
    p_bh = dict(zip(compared, benjamini_hochberg([cmp.p for cmp, _ in compared.values()])))
    comps = []
    for i, (cmp, p_holm) in compared.items():
        c, ref, f = t.cells[i], t.refs[i], t.findings.get(t.cells[i].values)
        if f is None or not f.expected:
            continue
        (_, s), (_, s0) = c.acc, ref.acc
        se = math.sqrt((s or 0.0) ** 2 / len(c.runs) + (s0 or 0.0) ** 2 / len(ref.runs))
        comps.append({"cell": f.cell or ", ".join(c.values), "finding": f.text, "expected": f.expected, "cmp": cmp,
                      "p_holm": p_holm, "old": old_rule(cmp.diff, se, f.expected),
                      "raw": verdict(cmp.diff, cmp.p, f.expected), "bh": verdict(cmp.diff, p_bh[i], f.expected),
                      "now": verdict(cmp.diff, p_holm, f.expected)})
    return comps


def render(results: Path) -> str:
    comps = []
    for suite, args in SUITES.items():
        comps += [{**c, "suite": suite} for c in suite_comparisons(results / suite, args)]
    parts = ["### Verdict counts (consistent with / contradicts / inconclusive)\n\n"
             + counts_table(comps, list(SUITES))]
    changed = [c for c in comps if c["now"] != c["old"]]
    parts.append(f"### Verdicts the correction changed ({len(changed)} of {len(comps)})\n\n" + "\n".join(
        f"- {c['suite']}: {c['cell']} ({c['finding']}): {c['old']} → {c['now']} "
        f"(Δ {c['cmp'].diff:+.2f}, Holm p {_p(c['p_holm'])})" for c in changed))
    published = {(c["suite"], c["cell"]): c for c in published_comparisons(results / "published")}
    matched = [(published[(c["suite"], c["cell"])], c) for c in comps if (c["suite"], c["cell"]) in published]
    moved = [(old, new) for old, new in matched if old["now"] != new["now"]]
    parts.append(f"### Verdicts that differ between the published run and the rerun ({len(moved)} of {len(matched)})"
                 "\n\n" + "\n".join(
                     f"- {new['suite']}: {new['cell']} ({new['finding']}): {old['now']} (Δ {old['cmp'].diff:+.2f}, "
                     f"Holm p {_p(old['p_holm'])}) → {new['now']} (Δ {new['cmp'].diff:+.2f}, Holm p "
                     f"{_p(new['p_holm'])})" for old, new in moved))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, nargs="?", default=ROOT / "docs" / "results")
    args = ap.parse_args(argv)
    text = render(args.results)
    (args.results / "verdicts.md").write_text(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
