"""The recipes dry-run at full resolution on generated data; every ablation suite runs as a multirun for one step
with its sweep cut to two cells; the table script reads that sweep."""
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from scripts import ablation_table
from tests.engine.conftest import run_train, summary
from tests.experiments.conftest import ABLATIONS, CONFIGS, RECIPES, choices, compose_cfg, sweep_params, train_py


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dry_runs_at_full_resolution(recipe, tmp_path):
    model = compose_cfg([f"experiment={recipe}"]).model.name  # named again: run_train's tiny model must not win
    run = tmp_path / "run"
    run_train([f"experiment={recipe}", f"model={model}", "data=synthetic", "data.img_size=224", "data.batch_size=2",
               "data.train_size=4", "data.val_size=2", "data.workers=0", "trainer.dry_run=true",
               "trainer.amp=false"], run)  # CPU float16 autocast (DDF's recipe) is minutes slow; AMP is tested in engine
    s = summary(run)
    assert s["num_updates"] == 2 and s["config"]["name"] == recipe and s["config"]["model"]["name"] == model
    assert s["config"]["data"]["img_size"] == 224 and s["replacement"] > 0  # the paper's operator is in place
    # the evaluation scored exactly the 2 validation images (the loss may diverge: the paper's lr at batch 2)
    acc1, acc5 = s["final"]["val_acc1"], s["final"]["val_acc5"]
    assert acc1 in (0.0, 50.0, 100.0) and acc5 in (0.0, 50.0, 100.0) and acc1 <= acc5


@pytest.mark.parametrize("experiment", ABLATIONS)
def test_suite_runs_one_step_per_cell(experiment, tmp_path):
    params = {k: choices(k, v) for k, v in sweep_params(experiment).items() if k != "seed"}
    # two cells: the first two choices of the last parameter, the first choice of the others
    *first, (last_key, last) = params.items()
    cut = [opts[0] for _, opts in first] + [f"{last_key}={','.join(o.split('=', 1)[1] for o in last[:2])}"]
    sweep = tmp_path / "sweep"
    train_py(["-m", f"experiment={experiment}", "seed=0", *cut, "trainer.epochs=1", "trainer.limit_train_batches=1",
              "trainer.limit_val_batches=1", f"hydra.sweep.dir={sweep}"])
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    key = last_key.lstrip("+")
    for job, want in zip(jobs, last[:2]):
        s = summary(job)
        assert s["num_updates"] == 1 and s["config"]["name"] == experiment and s["macs_per_image"] > 0
        cell = OverridesParser.create().parse_override(want).value()  # the cell's dict is in the run's config
        if key == "cell":  # a configs/cell/ file: every value it sets is in the run's config
            values = yaml.safe_load((CONFIGS / "cell" / f"{cell}.yaml").read_text())
            assert all(s["config"][g][k] == v for g, group in values.items() for k, v in group.items()), values
        else:
            assert {k: s["config"][key].get(k) for k in cell} == cell
    text = ablation_table.main([str(sweep), "--out", str(tmp_path / "table")])
    assert text.count("\n| ") == 3  # header + 2 cells
    assert all((tmp_path / "table" / f).stat().st_size > 0 for f in ("acc_vs_macs.png", "acc_vs_params.png", "curves.png"))
