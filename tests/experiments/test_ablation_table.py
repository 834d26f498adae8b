"""scripts/ablation_table.py on a generated sweep folder whose numbers are known."""
import json
import statistics

from PIL import Image

from scripts import ablation_table

# 2 operators x 2 policies x 3 seeds; acc = base + seed, so each cell's std over seeds 0, 1, 2 is 1.0
BASE = {("conv", "dw_only"): 80.0, ("conv", "deep_only"): 81.0, ("ddf", "dw_only"): 84.0, ("ddf", "deep_only"): 83.0}


def make_sweep(root):
    job = 0
    for seed in range(3):
        for (op, policy), base in BASE.items():
            run = root / str(job)
            run.mkdir(parents=True)
            acc = base + seed
            config = {"seed": seed, "name": "grid", "op": {"name": op, **({"se_ratio": 0.2} if op == "ddf" else {})},
                      "policy": {"name": policy, "stages": None}, "trainer": {"eval_metric": "acc1"}}
            (run / "summary.json").write_text(json.dumps({
                "config": config, "final": {"val_acc1": acc}, "best": {"metric": acc, "key": "val_acc1"},
                "params": 1_000_000 if op == "conv" else 1_500_000, "macs_per_image": 20_000_000,
                "img_per_s": 100.0 + seed}))
            (run / "metrics.csv").write_text("epoch,train_loss,train_acc1\n0,2.0,50\n1,1.0,70\n")
            job += 1


def test_table_groups_by_the_swept_keys_and_averages_the_seeds(tmp_path, capsys):
    make_sweep(tmp_path / "sweep")
    text = ablation_table.main([str(tmp_path / "sweep")])
    assert text == capsys.readouterr().out
    assert "swept: op.name, policy.name, op.se_ratio" in text  # seed is not a cell key
    rows = [line for line in text.splitlines() if line.startswith("| conv") or line.startswith("| ddf")]
    assert len(rows) == 4  # one per cell, in sweep order
    std = statistics.stdev([0.0, 1.0, 2.0])
    assert rows[0].split(" | ")[:7] == ["| conv", "dw_only", "–", f"81.00 ± {std:.2f}", "ref", "", "3"]
    se2 = 2 * (2 * std ** 2 / 3) ** 0.5  # two standard errors of a difference of two 3-seed means
    assert rows[2].split(" | ")[:6] == ["| ddf", "dw_only", "0.2", f"85.00 ± {std:.2f}", "+4.00*", f"{se2:.2f}"]
    assert rows[1].split(" | ")[4:6] == ["+1.00", f"{se2:.2f}"]  # within 2·SE: no star
    assert rows[2].split(" | ")[7:10] == ["1.500", "20.0", "101 |"]  # params (M), MACs (M), mean img/s


def test_an_option_a_cell_leaves_out_shows_the_operators_default(tmp_path):
    """{name: ddf} runs with DDF's se_ratio 0.2: the table says so where another cell sets se_ratio."""
    make_sweep(tmp_path / "sweep")
    for summary in (tmp_path / "sweep").rglob("summary.json"):
        s = json.loads(summary.read_text())
        if s["config"]["policy"]["name"] == "deep_only" and s["config"]["op"]["name"] == "ddf":
            s["config"]["op"]["se_ratio"] = 0.1
        else:
            s["config"]["op"].pop("se_ratio", None)
        summary.write_text(json.dumps(s))
    text = ablation_table.main([str(tmp_path / "sweep")])
    rows = {tuple(line.split(" | ")[:3]) for line in text.splitlines() if line.startswith("| ")}
    assert {("| ddf", "dw_only", "0.2"), ("| ddf", "deep_only", "0.1"), ("| conv", "dw_only", "–")} <= rows


def test_a_two_key_product_also_prints_as_a_grid(tmp_path):
    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    for summary in sweep.rglob("summary.json"):  # drop the key only one operator has: two swept keys remain
        s = json.loads(summary.read_text())
        s["config"]["op"].pop("se_ratio", None)
        summary.write_text(json.dumps(s))
    text = ablation_table.main([str(sweep), "--out", str(tmp_path / "out")])
    assert "| name \\ name | dw_only | deep_only |" not in text  # ambiguous short names keep their full keys
    assert "| op.name \\ policy.name | dw_only | deep_only |" in text
    assert "| ddf | 85.00 ± 1.00 | 84.00 ± 1.00 |" in text
    assert (tmp_path / "out" / "table.md").read_text() == text
    for png in ("acc_vs_macs.png", "acc_vs_params.png", "curves.png"):
        with Image.open(tmp_path / "out" / png) as img:
            assert img.size[0] > 500 and len(img.getcolors(1 << 16)) > 3  # drawn, not blank
