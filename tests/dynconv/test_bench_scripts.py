"""The model benchmark and the profiler script run end to end (tiny settings) and print their tables."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _script(name, *args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_bench_models_quick_with_autocast_and_channels_last():
    out = _script("bench_models.py", "--quick", "--amp", "--channels-last", "--models", "ResNet-50", "RedNet-50",
                  "face MobileNetV2 + TVConv (frozen)").stdout
    assert "bfloat16 autocast, channels_last" in out.splitlines()[0]
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"ResNet-50", "RedNet-50", "face MobileNetV2 + TVConv (frozen)"}
    assert "error" not in out
    assert rows["ResNet-50"].split("|")[4].strip() == "1.00"  # its own baseline
    assert "(inference only)" in rows["face MobileNetV2 + TVConv (frozen)"]


def test_bench_models_cuda_flag_needs_a_gpu(monkeypatch, capsys):
    """Where torch sees no GPU, --device cuda stops with a message that says so."""
    import importlib.util

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("bench_models", ROOT / "scripts" / "bench_models.py")
    bench_models = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_models", bench_models)  # dataclasses look their module up
    spec.loader.exec_module(bench_models)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench_models.main(["--quick", "--device", "cuda"])
    assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_pixel_filter_lists_the_kernels_of_each_form():
    out = _script("profile_pixel_filter.py", "--shapes", "2x16x8x8", "--steps", "1", "--rows", "5").stdout
    for form in ("involution", "DDF", "TVConv"):
        assert f"## 2x16x8x8 pixel_filter {form}" in out
    assert out.count("Self CPU time total") == 3
    assert "dynconv::pixel_filter_backward" in out  # the custom op's backward (the compiled CPU kernel) is profiled


def test_bench_ops_labels_operators_without_a_backend_switch_same_path(monkeypatch):
    """Both backend rows of an operator that calls no primitive time the same code: no speed-up is claimed."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("bench_ops", ROOT / "scripts" / "bench_ops.py")
    bench_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_ops)
    x = torch.randn(1, 16, 8, 8)
    assert bench_ops.consults_backend(bench_ops.make_op("involution", 16, 8, 8), x)
    assert not bench_ops.consults_backend(bench_ops.make_op("dcn", 16, 8, 8), x)
    timing = lambda *args: dict(fwd=1.0, fb=2.0, mem=1.0)  # noqa: E731  (the labels, not the timings, are tested)
    monkeypatch.setattr(bench_ops, "measure_module", timing)
    monkeypatch.setattr(bench_ops, "measure_fn", timing)
    rows = bench_ops.run([(1, 16, 8, 8)], ["conv", "involution"], repeat=1, log=lambda *a, **k: None)
    speed = {(r.split("|")[2].strip(), r.split("|")[3].strip()): r.split("|")[8].strip()
             for r in bench_ops.markdown(rows).splitlines()[2:]}
    assert speed[("conv", "fast")] == "same path" and speed[("involution", "fast")] == "1.0x"


def test_cuda_report_fails_where_torch_sees_no_gpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "cuda_report.sh"), str(tmp_path / "report")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable})
    assert proc.returncode == 1 and "torch sees no CUDA device" in proc.stderr
    assert not list((tmp_path / "report").glob("*.log"))  # no step ran
