"""Statistics of the ablation tables: Welch's t-test of two cells' mean accuracies, its 95 % confidence interval,
Holm's correction over the comparisons of one suite, and the verdict words against a paper's finding.

A verdict is "consistent with" or "contradicts" the finding only where the Holm-adjusted p-value is below
`ALPHA`; otherwise it is "inconclusive". A finding that expects no change is never confirmed by a difference that
is not significant (absence of evidence is not agreement): that is "inconclusive" too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

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
