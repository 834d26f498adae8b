"""The statistics of the ablation tables (scripts/ablation_stats.py) and the verdicts of the published tables
recomputed from their committed summaries (scripts/recompute_verdicts.py), byte for byte."""
import math
import shutil

import numpy as np
import pytest
from scipy import stats

from scripts import recompute_verdicts
from scripts.ablation_stats import benjamini_hochberg, holm, verdict, welch

ROOT = recompute_verdicts.ROOT
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


def test_a_bad_expectation_names_the_fix():
    with pytest.raises(ValueError, match=r"write \+ .* - .* or 0"):
        verdict(1.0, 0.01, "up")


def test_published_verdicts_regenerate_byte_for_byte_and_are_in_results(tmp_path):
    data = tmp_path / "published"
    shutil.copytree(PUBLISHED, data)
    (data / "verdicts.md").unlink()
    text = recompute_verdicts.main([str(data), "--img", str(tmp_path / "img")])
    assert text == (PUBLISHED / "verdicts.md").read_text()
    for png in (ROOT / "docs" / "img").glob("ablation_*_acc_vs_macs.png"):
        assert (tmp_path / "img" / png.name).read_bytes() == png.read_bytes(), png.name
    results = (ROOT / "docs" / "RESULTS.md").read_text()
    for section in ("\n" + text).split("\n### ")[1:]:  # every suite's table, the counts and the changed verdicts
        assert section.strip() in results, section.splitlines()[0]
