"""scripts/ablation_table.py on generated sweep folders whose numbers are known: the CSV export, the table and its
statistics, regeneration from the CSVs alone (byte for byte), the plots, and the budget-curve mode."""
import csv
import json
import math

import pytest
from PIL import Image
from scipy import stats

from scripts import ablation_table

# 2 operators x 2 policies x 3 seeds; acc = base + seed, so each cell's std over seeds 0, 1, 2 is 1.0
BASE = {("conv", "dw_only"): 80.0, ("conv", "deep_only"): 81.0, ("ddf", "dw_only"): 84.0, ("ddf", "deep_only"): 83.0}


def make_sweep(root, cells=BASE, steps=lambda cell: 62):
    job = 0
    for seed in range(3):
        for cell, base in cells.items():
            op, policy = cell[:2]
            run = root / str(job)
            run.mkdir(parents=True)
            acc = base + seed
            config = {"seed": seed, "name": "grid", "op": {"name": op, **({"se_ratio": 0.2} if op == "ddf" else {})},
                      "policy": {"name": policy, "stages": None}, "trainer": {"eval_metric": "acc1"},
                      "data": {"train_subset": cell[2] if len(cell) > 2 else 2000}}
            (run / "summary.json").write_text(json.dumps({
                "config": config, "epochs_done": 2, "total_epochs": 2,
                "final": {"epoch": 1, "val_acc1": acc, "val_loss": 1.0 / acc},
                "best": {"metric": acc, "key": "val_acc1"}, "num_updates": steps(cell),
                "params": 1_000_000 if op == "conv" else 1_500_000, "macs_per_image": 20_000_000,
                "img_per_s": 100.0 + seed, "wall_time_s": 30.0 + job}))
            (run / "hparams.json").write_text(json.dumps({"hparams": {"commit": "abc123"}, "metrics": {}}))
            (run / "metrics.csv").write_text(f"epoch,train_loss,train_acc1\n0,2.0,{50 + seed}\n1,1.0,{acc - 10}\n")
            job += 1


def rows_of(text):
    return [line.split(" | ") for line in text.splitlines() if line.startswith("| conv") or line.startswith("| ddf")]


def welch_by_hand(diff, sd, n):
    """Two cells with the same std and seeds: Welch's t, p and 95 % CI half-width with 2(n-1) degrees of freedom."""
    se = math.sqrt(2 * sd * sd / n)
    dof = 2 * (n - 1)
    return 2 * stats.t.sf(abs(diff) / se, dof), stats.t.ppf(0.975, dof) * se


def test_table_statistics_are_welch_with_holm_over_the_comparisons(tmp_path, capsys):
    make_sweep(tmp_path / "sweep")
    text = ablation_table.main([str(tmp_path / "sweep")])
    assert text == capsys.readouterr().out
    assert "swept: op.name, policy.name, op.se_ratio" in text  # seed is not a cell key
    rows = rows_of(text)
    assert len(rows) == 4  # one per cell, in sweep order
    assert rows[0][:7] == ["| conv", "dw_only", "–", "81.00 ± 1.00", "ref", "–", "3"]
    p = {d: welch_by_hand(d, 1.0, 3)[0] for d in (1.0, 4.0, 3.0)}  # the three comparisons with the first row
    holm = {4.0: 3 * p[4.0]}
    holm[3.0] = max(holm[4.0], 2 * p[3.0])
    holm[1.0] = max(holm[3.0], p[1.0])
    for row, d in zip(rows[1:], (1.0, 4.0, 3.0)):
        half = welch_by_hand(d, 1.0, 3)[1]
        assert row[4] == f"{d:+.2f} [{d - half:+.2f}, {d + half:+.2f}]"
        assert row[5] == f"{holm[d]:.3f}"
    assert rows[2][7:11] == ["62", "1.500", "20.0", "101 |"]  # steps, params (M), MACs (M), mean img/s


def test_runs_csv_holds_the_cell_keys_seed_metrics_and_commit(tmp_path):
    make_sweep(tmp_path / "sweep")
    ablation_table.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "data")])
    runs = list(csv.DictReader(open(tmp_path / "data" / "runs.csv")))
    assert list(runs[0])[:5] == ["run", "op.name", "policy.name", "op.se_ratio", "seed"]
    assert len(runs) == 12 and runs[2]["op.name"] == "ddf" and runs[2]["op.se_ratio"] == "0.2"
    assert [float(r["val_acc1"]) for r in runs[:4]] == list(BASE.values())
    assert runs[5]["seed"] == "1" and runs[5]["commit"] == "abc123" and runs[5]["wall_time_s"] == "35.0"
    assert float(runs[0]["final_val_loss"]) == 1.0 / 80.0 and runs[0]["steps"] == "62"
    epochs = list(csv.DictReader(open(tmp_path / "data" / "epochs.csv")))
    assert len(epochs) == 24 and epochs[3] == {"run": "1", "epoch": "1", "train_loss": "1.0", "train_acc1": "71.0"}


def test_an_unfinished_run_is_left_out(tmp_path, capsys):
    """summary.json is rewritten after every epoch: a run stopped after its first epoch must not count."""
    make_sweep(tmp_path / "sweep")
    summary = tmp_path / "sweep" / "5" / "summary.json"
    s = json.loads(summary.read_text())
    summary.write_text(json.dumps({**s, "epochs_done": 1}))
    ablation_table.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "data")])
    runs = list(csv.DictReader(open(tmp_path / "data" / "runs.csv")))
    assert len(runs) == 11 and "5" not in {r["run"] for r in runs}
    assert "sweep/5: unfinished (1 of 2 epochs)" in capsys.readouterr().err


def test_regeneration_from_the_csvs_alone_is_byte_for_byte(tmp_path):
    make_sweep(tmp_path / "sweep")
    first = ablation_table.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "data")])
    (tmp_path / "copy").mkdir()
    for name in ("runs.csv", "epochs.csv"):  # the committed data, without the sweep
        (tmp_path / "copy" / name).write_bytes((tmp_path / "data" / name).read_bytes())
    again = ablation_table.main([str(tmp_path / "copy")])
    assert again == first
    for name in ("table.md", "acc_vs_macs.png", "acc_vs_params.png", "curves.png"):
        assert (tmp_path / "copy" / name).read_bytes() == (tmp_path / "data" / name).read_bytes(), name
    for png in ("acc_vs_macs.png", "acc_vs_params.png", "curves.png"):
        with Image.open(tmp_path / "copy" / png) as img:
            assert img.size[0] > 400 and len(img.getcolors(1 << 20)) > 10  # drawn, not blank


def data_with_findings(tmp_path, findings: str):
    """The generated sweep's CSVs with `findings` as findings.csv beside them."""
    make_sweep(tmp_path / "sweep")
    data = tmp_path / "data"
    ablation_table.main([str(tmp_path / "sweep"), "--out", str(data)])
    (data / "findings.csv").write_text(findings)
    return data


def test_findings_give_verdict_words(tmp_path):
    data = data_with_findings(tmp_path, "op.name,policy.name,op.se_ratio,expected,finding\n"
                                        "ddf,dw_only,0.2,+,DDF beats conv\n"
                                        "ddf,deep_only,0.2,-,DDF loses\n"
                                        "conv,deep_only,–,0,policy changes nothing\n")
    rows = {tuple(r[:2]): r for r in rows_of(ablation_table.main([str(data)]))}
    assert rows[("| ddf", "dw_only")][-2:] == ["DDF beats conv", "consistent with |"]  # Holm p < 0.05
    p3 = float(rows[("| ddf", "deep_only")][5])
    assert rows[("| ddf", "deep_only")][-1] == ("contradicts |" if p3 < 0.05 else "inconclusive |")
    assert rows[("| conv", "deep_only")][-1] == "inconclusive |"  # no detected change is not agreement


def test_findings_with_their_own_reference_compare_only_those_cells(tmp_path):
    """findings.csv's `vs` column: each finding against its own cell, Holm over those comparisons alone."""
    data = data_with_findings(tmp_path, "op.name,policy.name,op.se_ratio,vs,expected,finding\n"
                                        "ddf,dw_only,0.2,\"op.name=conv,policy.name=dw_only\",+,DDF beats conv\n"
                                        "ddf,deep_only,0.2,\"op.name=ddf,policy.name=dw_only\",-,deep loses\n")
    text = ablation_table.main([str(data)])
    assert "Δ against the cell in the vs column" in text and "over the 2 comparisons" in text
    rows = {tuple(r[:2]): r for r in rows_of(text)}
    assert rows[("| conv", "dw_only")][4:6] == ["", "ref"]  # the reference of a finding
    assert rows[("| conv", "deep_only")][4:7] == ["", "–", "–"]  # no finding: not compared
    p_raw, half = welch_by_hand(4.0, 1.0, 3)
    assert rows[("| ddf", "dw_only")][4:6] == ["conv, dw_only", f"+4.00 [{-half + 4:+.2f}, {half + 4:+.2f}]"]
    assert float(rows[("| ddf", "dw_only")][6]) == pytest.approx(2 * p_raw, abs=1e-3)  # the smaller p of 2, Holm x2
    assert rows[("| ddf", "deep_only")][5].startswith("-1.00 [")
    (data / "findings.csv").write_text("op.name,policy.name,op.se_ratio,vs,expected,finding\n"
                                       "ddf,dw_only,0.2,op.name=conv,+,DDF beats conv\n")
    with pytest.raises(SystemExit, match="matches 2 cells; name one cell"):
        ablation_table.main([str(data)])


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
    rows = {tuple(r[:3]) for r in rows_of(text)}
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

