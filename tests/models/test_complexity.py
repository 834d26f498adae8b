"""scripts/complexity.py: the --papers table and one model's figures."""
import re

import pytest

import models
from scripts import complexity


def test_papers_table_runs_on_a_small_model(capsys):
    complexity.main(["--papers", "--only", "face_mobilenetv2_x0_1:dwconv"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("face_mobilenetv2_x0_1")]
    assert [(r[1], r[3], r[4], r[5]) for r in rows] == [("dwconv", "324,672", "324,672", "yes")]
    assert float(rows[0][6].rstrip("M")) == pytest.approx(18.0, abs=0.05)  # official x0.1 at 96 px: 18.0M
    assert "counted" in out  # the counting convention is stated


def test_one_model_params_and_dynamic_macs(capsys):
    args = ["model=resnet18", "model.width=0.125", "model.small_input=true", "op=ddf", "policy=all_3x3", "input_size=28"]
    complexity.main(args)
    out = capsys.readouterr().out
    model, report = models.build({"name": "dynconv_resnet18", "width": 0.125, "small_input": True}, {"name": "ddf"},
                                 {"name": "all_3x3"}, num_classes=1000, input_size=(28, 28))
    params = int(re.search(r"params ([\d,]+)", out).group(1).replace(",", ""))
    assert params == sum(p.numel() for p in model.parameters())
    # DDF aggregation: C·k²·H_out·W_out per replaced layer
    agg = sum(r["out_channels"] * 9 * (-(-r["input_size"][0] // r["stride"][0])) ** 2 for r in report)
    shown = re.search(r"dynamic aggregation ([\d.]+)([KMG]?)", out)
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[shown.group(2)]
    assert abs(float(shown.group(1)) * scale - agg) <= 0.0005 * scale
