"""docs/results/<suite>/: every committed suite's (and the budget curve's) table and plots come from its CSVs alone,
byte for byte, and docs/RESULTS.md shows that table."""
import shutil

import pytest

from scripts import ablation_table, verdict_summary
from tests.experiments.conftest import CONFIGS

RESULTS = CONFIGS.parent / "docs" / "results"
# how each suite's table is made: `python scripts/ablation_table.py docs/results/<suite> <args>`
ARGS = {**verdict_summary.SUITES, "budget_curve": ["--ref", "op.name=conv", "--budget", "data.train_subset"]}


def test_every_committed_suite_is_checked():
    with_data = {p.parent.name for p in RESULTS.glob("*/runs.csv")}
    assert with_data == set(ARGS), "add the suite's ablation_table arguments to ARGS"


@pytest.mark.parametrize("suite", sorted(ARGS))
def test_suite_regenerates_byte_for_byte(suite, tmp_path):
    committed = RESULTS / suite
    data = tmp_path / suite
    shutil.copytree(committed, data)
    for made in ("table.md", *(p.name for p in committed.glob("*.png"))):
        (data / made).unlink()
    text = ablation_table.main([str(data), *ARGS[suite]])
    assert text == (committed / "table.md").read_text()
    for png in committed.glob("*.png"):
        assert (data / png.name).read_bytes() == png.read_bytes(), png.name
    results_md = (CONFIGS.parent / "docs" / "RESULTS.md").read_text()
    assert text.split("\n\n")[1] in results_md  # the markdown table itself


def test_verdict_summary_regenerates_byte_for_byte_and_is_in_results(tmp_path):
    """The verdict counts (first rule / Welch / BH / Holm), the verdicts the correction changed, and the verdicts
    that differ from the published run: from the committed CSVs alone, and shown in RESULTS.md."""
    data = tmp_path / "results"
    shutil.copytree(RESULTS, data)
    (data / "verdicts.md").unlink()
    text = verdict_summary.main([str(data)])
    assert text == (RESULTS / "verdicts.md").read_text()
    results_md = (CONFIGS.parent / "docs" / "RESULTS.md").read_text()
    for section in ("\n" + text).split("\n### ")[1:]:
        assert section.strip() in results_md, section.splitlines()[0]
