"""experiment=budget_curve and its one-command table and plot, on a tiny generated sweep."""
import json
import shutil

import pytest
from PIL import Image

from scripts import ablation_table
from tests.experiments.conftest import CONFIGS, choices, compose_cfg, sweep_params
from tests.experiments.test_ablation_table import make_sweep, rows_of

RESULTS = CONFIGS.parent / "docs" / "results" / "budget_curve"


def test_budget_curve_is_the_grid_recipe_at_three_budgets():
    grid, curve = compose_cfg(["experiment=ablation_grid"]), compose_cfg(["experiment=budget_curve"])
    for group in ("model", "data", "optim", "sched", "trainer"):  # nothing but the number of images changes
        assert grid[group] == curve[group], group
    params = sweep_params("budget_curve")
    assert [c.split("=", 1)[1] for c in choices("data.train_subset", params["data.train_subset"])] == \
        ["2000", "8000", "16000"]
    ops = [c.split("=", 1)[1] for c in choices("++op", params["++op"])]
    assert ops == ["{name:conv}", "{name:involution}", "{name:ddf}", "{name:odconv}", "{name:dcd}",
                   "{name:condconv}"]  # local DK (4x slower) runs at 1x and 4x by a second command
    assert params["policy"] == "deep_only" and params["seed"] == "0,1,2"


def test_local_dk_runs_the_same_curve_at_1x_and_4x():
    curve, dk = (compose_cfg([f"experiment={e}"], hydra_cfg=True) for e in ("budget_curve", "budget_curve_dk_local"))
    for group in ("model", "data", "optim", "sched", "trainer", "policy"):
        assert curve[group] == dk[group], group
    params = dk.hydra.sweeper.params  # merged with budget_curve's: seeds and policy come from there
    assert [c.split("=", 1)[1] for c in choices("data.train_subset", params["data.train_subset"])] == ["2000", "8000"]
    assert params["++op"] == "{name:dk_local}"
    assert params["seed"] == "0,1,2" and params["policy"] == "deep_only"


def test_table_and_plot_from_a_generated_curve_with_the_committed_findings(tmp_path):
    cells = {("conv", "deep_only", 8000): 80.0, ("ddf", "deep_only", 8000): 79.5,  # swept larger budget first
             ("conv", "deep_only", 2000): 70.0, ("ddf", "deep_only", 2000): 50.0}
    make_sweep(tmp_path / "sweep", cells, steps=lambda cell: cell[2] // 64 * 2)
    out = tmp_path / "budget_curve"
    out.mkdir()
    shutil.copy(RESULTS / "findings.csv", out)
    for summary in (tmp_path / "sweep").rglob("summary.json"):  # the curve's cells set the operator's name only
        s = json.loads(summary.read_text())
        s["config"]["op"].pop("se_ratio", None)
        summary.write_text(json.dumps(s))
    text = ablation_table.main([str(tmp_path / "sweep"), "--out", str(out), "--ref", "op.name=conv",
                                "--budget", "data.train_subset"])
    assert [tuple(r[:2]) for r in rows_of(text)] == [("| conv", "2000"), ("| ddf", "2000"), ("| conv", "8000"),
                                                      ("| ddf", "8000")]  # read by budget, whatever the sweep order
    rows = {tuple(r[:2]): r for r in rows_of(text)}
    assert rows[("| ddf", "2000")][3].startswith("-20.00 [") and rows[("| ddf", "8000")][3].startswith("-0.50 [")
    assert rows[("| conv", "8000")][3] == "ref" and rows[("| ddf", "8000")][6] == "250"  # steps column
    assert rows[("| ddf", "2000")][-1] == "contradicts |" and rows[("| ddf", "8000")][-1] == "inconclusive |"
    with Image.open(out / "budget.png") as img:
        assert img.size[0] > 800 and len(img.getcolors(1 << 20)) > 10
    first = (out / "budget.png").read_bytes()
    assert ablation_table.main([str(out), "--ref", "op.name=conv", "--budget", "data.train_subset"]) == text
    assert (out / "budget.png").read_bytes() == first  # regenerated from the CSVs alone, byte for byte
    with pytest.raises(SystemExit, match="not a swept key"):
        ablation_table.main([str(out), "--budget", "data.nonsense"])

