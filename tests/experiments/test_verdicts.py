"""The statistics of the ablation tables (engine/ablation.py) and the verdicts of the first published tables
recomputed from their committed summaries (scripts/verdict_summary.py)."""
import math

import numpy as np
import pytest
from scipy import stats

from engine.ablation import benjamini_hochberg, holm, old_rule, verdict, welch
from scripts import verdict_summary

ROOT = verdict_summary.ROOT
PUBLISHED = ROOT / "docs" / "results" / "published"


def test_welch_from_summaries_equals_the_test_on_the_samples():
    rng = np.random.default_rng(0)
    a, b = rng.normal(70, 3, size=5), rng.normal(66, 1, size=3)
    cmp = welch(a.mean(), a.std(ddof=1), 5, b.mean(), b.std(ddof=1), 3)
    assert cmp.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (cmp.low, cmp.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert math.isnan(welch(70.0, 0.0, 1, 60.0, 1.0, 3).p)  # one seed: no test


def test_holm_and_benjamini_hochberg_adjust_as_defined():
    p = [0.01, 0.04, 0.03, float("nan"), 0.5]
    assert holm(p)[:3] == pytest.approx([0.04, 0.09, 0.09]) and holm(p)[4] == pytest.approx(0.5)
    assert benjamini_hochberg(p)[:3] == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3])  # 0.03 * 4/2 > 0.04 * 4/3 and benjamini_hochberg(p)[4] == 0.5
    assert math.isnan(holm(p)[3]) and math.isnan(benjamini_hochberg(p)[3])


@pytest.mark.parametrize("diff, p, expected, word", [
    (+3.0, 0.01, "+", "consistent with"), (-3.0, 0.01, "+", "contradicts"), (+3.0, 0.2, "+", "inconclusive"),
    (-3.0, 0.01, "-", "consistent with"), (+0.1, 0.9, "0", "inconclusive"), (+3.0, 0.01, "0", "contradicts"),
])
def test_verdict_words(diff, p, expected, word):
    assert verdict(diff, p, expected) == word


@pytest.mark.parametrize("diff, se, expected, word", [
    (+2.5, 1.0, "+", "consistent with"), (-2.5, 1.0, "+", "contradicts"), (+1.9, 1.0, "+", "inconclusive"),
    (-2.5, 1.0, "-", "consistent with"), (+0.5, 1.0, "0", "consistent with"), (+2.5, 1.0, "0", "contradicts"),
])
def test_the_first_tables_rule_in_todays_words(diff, se, expected, word):
    """|Δ| > 2·SE decides, with no test: a finding of no change 'agreed' whenever the difference was within 2·SE."""
    assert old_rule(diff, se, expected) == word


def test_a_bad_expectation_names_the_fix():
    with pytest.raises(ValueError, match=r"write \+ .* - .* or 0"):
        verdict(1.0, 0.01, "up")


def test_the_published_tables_recompute_from_their_summaries():
    """The first tables' 52 comparisons, Welch-tested from the printed means, stds and seeds: the first rule's counts
    as they printed them, and Holm's verdicts as the tables of commit 9256cfe showed them."""
    comps = verdict_summary.published_comparisons(PUBLISHED)
    assert len(comps) == 52
    count = lambda key: tuple(sum(c[key] == w for c in comps) for w in verdict_summary.WORDS)  # noqa: E731
    assert count("old") == (13, 14, 25) and count("now") == (0, 2, 50)
    dyconv = next(c for c in comps if c["suite"] == "grid" and c["cell"] == "dyconv, dw_only")
    assert (round(dyconv["cmp"].diff, 2), round(dyconv["p_holm"], 3), dyconv["now"]) == (-16.74, 0.177, "inconclusive")
    involution = [c for c in comps if c["suite"] == "grid" and c["cell"].startswith("involution")]
    assert [c["now"] for c in involution] == ["contradicts", "contradicts"]


def test_old_rule_reproduces_every_verdict_the_first_tables_printed():
    """scripts/verdict_summary.py counts the rerun under the first rule with `old_rule`: on the published summaries
    it gives the 52 verdicts those tables printed."""
    cells = {(r["suite"], r["cell"]): r for r in verdict_summary._rows(PUBLISHED / "cells.csv")}
    for c in verdict_summary.published_comparisons(PUBLISHED):
        a, b = cells[(c["suite"], c["cell"])], cells[(c["suite"], c["ref"])]
        se = math.sqrt(float(a["sd"]) ** 2 / int(a["n"]) + float(b["sd"]) ** 2 / int(b["n"]))
        assert old_rule(c["cmp"].diff, se, c["expected"]) == c["old"], (c["suite"], c["cell"], c["published"])
