"""scripts/cuda_report.sh's dry run and the CSV of its model table (scripts/dev/models_csv.py), on CPU."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "scripts" / "dev"))

import bench_models  # noqa: E402
import models_csv  # noqa: E402


def _report(tmp_path, **env):
    return subprocess.run(["bash", str(ROOT / "scripts" / "cuda_report.sh"), str(tmp_path / "out")],
                          env=dict(os.environ, PYTHON=sys.executable, **env), capture_output=True, text=True,
                          timeout=240)


def test_dry_run_checks_steps_without_a_gpu(tmp_path):
    """The CSV step and one benchmark step pass their dry run (imports and arguments), writing their logs."""
    run = _report(tmp_path, DRY_RUN="1", STEPS="models_csv dk")
    assert run.returncode == 0, run.stdout + run.stderr
    for step in ("models_csv", "dk"):
        assert "ok: scripts/" in (tmp_path / "out" / f"{step}.log").read_text()


def test_check_command_rejects_bad_arguments():
    check = [sys.executable, str(ROOT / "scripts/dev/check_command.py"), str(ROOT / "scripts/dev/models_csv.py")]
    assert subprocess.run(check + ["x.csv", "fp32=a.log"], capture_output=True).returncode == 0
    bad = subprocess.run(check + ["x.csv", "--no-such-flag"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--no-such-flag" in bad.stderr
    missing = subprocess.run(check[:2] + [str(ROOT / "scripts" / "no_such_script.py")], capture_output=True, text=True)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_models_csv_reads_bench_models_tables(tmp_path, capsys):
    """Rows of bench_models' own Markdown table (with memory) become CSV rows with every column, and the
    run's table is printed from the CSV."""
    rows = [dict(label="ResNet-50", baseline="ResNet-50", size=224, train=30.0, infer=10.0, first=300.0, memory=900.0),
            dict(label="RedNet-50", baseline="ResNet-50", size=224, train=45.0, infer=12.0, first=400.0, memory=1080.0),
            dict(label="TVConv (frozen)", baseline="ResNet-50", size=96, infer=5.0)]
    header = "torch 2.11.0+cu130, NVIDIA H100 80GB HBM3; triton 3.6.0; float32"
    for name in ("fp32", "bf16"):
        (tmp_path / f"{name}.log").write_text(header + "\n\n" + bench_models.markdown(rows, 64) + "\n")
    path = tmp_path / "models.csv"
    models_csv.main([str(path), f"fp32={tmp_path / 'fp32.log'}", f"bf16={tmp_path / 'bf16.log'}"])
    with path.open(newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == models_csv.COLUMNS and len(got) == 6
    red = got[1]
    assert (red["model"], red["dtype"], red["batch"], red["device"], red["torch"], red["triton"]) == \
        ("RedNet-50", "fp32", "64", "NVIDIA H100 80GB HBM3", "2.11.0+cu130", "3.6.0")
    measures = (red["train_step_ms"], red["train_ratio"], red["peak_mem_mb"], red["mem_ratio"])
    assert measures == ("45", "1.50", "1080", "1.20")
    assert got[2]["train_step_ms"] == "" and got[5]["dtype"] == "bf16"
    assert "| RedNet-50 | bf16 | 45 | 1.50 | 12 | 1.20 | 1080 | 1.20 |" in capsys.readouterr().out
