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
    out = _script("dev/profile_pixel_filter.py", "--shapes", "2x16x8x8", "--steps", "1", "--rows", "5").stdout
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


def _load(name, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _cells(line):
    return [cell.strip() for cell in line.split("|")[1:-1]]


def _main_on_tiny_models(monkeypatch, argv, classify=False):
    """bench_models.main(argv) with ResNet-50 as one conv and RedNet-26 as a conv and an involution (with a pooled
    classifier head when `classify`, for training steps); torch's thread count restored afterwards."""
    import dynconv

    bench_models = _load("bench_models", monkeypatch)
    head = (torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()) if classify else ()
    tiny = {"ResNet-50": lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), *head),
            "RedNet-26": lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1),
                                                     dynconv.create_op("involution", 16, 16, 3), *head)}
    monkeypatch.setattr(bench_models, "build_model",
                        lambda spec, size, fmt=None: tiny[spec.label]().train(classify))
    threads = torch.get_num_threads()
    try:
        bench_models.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_peak_memory_counts_a_step_once_and_resets_between_steps(monkeypatch):
    """The CPU memory figure is the resident growth of one call: a 64 MiB tensor written and freed reads
    64 MiB, and again on a second call, whose baseline is not the first's peak (the interpreter's own
    allocations and frees meanwhile move it by well under 4 MiB)."""
    bench_models = _load("bench_models", monkeypatch)
    monkeypatch.setattr(bench_models.bench_ops, "DEVICE", torch.device("cpu"))  # main() of another test sets it
    mib = 64
    readings = [bench_models.peak_memory_mib(lambda: torch.ones(mib * 2**18)) for _ in range(2)]
    assert all(abs(peak - mib) < 4 for peak in readings), readings


@pytest.mark.slow
def test_bench_models_memory_column_from_a_fresh_process_per_model():
    out = _script("bench_models.py", "--quick", "--memory", "--size", "32", "--models", "ResNet-50",
                  "DDF-ResNet-50 (mul)").stdout
    table = [_cells(line) for line in out.splitlines() if line.startswith("| ")]
    assert table[0][-2:] == ["training peak MiB", "× baseline"]
    rows = {cells[0]: cells for cells in table[1:]}
    assert set(rows) == {"ResNet-50", "DDF-ResNet-50 (mul)"}
    for cells in rows.values():
        assert float(cells[-2]) > 0 and float(cells[-1]) > 0  # a step holds at least its gradients
    assert rows["ResNet-50"][-1] == "1.00"  # its own baseline


def test_bench_ops_module_rows_against_the_depthwise_conv_of_their_kernel_size(monkeypatch, capsys):
    """--modules-only --backends fast: the involution module (fused and unfused) is compared with a depthwise
    7x7, dk_local with a depthwise 3x3; each row is announced on stderr before it is measured."""
    bench_ops = _load("bench_ops", monkeypatch)
    threads = torch.get_num_threads()
    try:
        bench_ops.main(["--quick", "--modules-only", "--backends", "fast", "--ops", "involution", "dk_local"])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    table = [_cells(line) for line in out.splitlines() if line.startswith("| 2x16x8x8")]
    assert [(c[1], c[2]) for c in table] == [
        ("nn.Conv2d 3x3", "-"), ("depthwise 3x3", "-"), ("depthwise 7x7", "-"), ("involution", "fast"),
        ("involution", "fast unfused"), ("dk_local", "fast")]
    rows = {(c[1], c[2]): c for c in table}
    for key in (("involution", "fast"), ("involution", "fast unfused"), ("dk_local", "fast")):
        float(rows[key][6])  # fwd+bwd / depthwise KxK: a number
    assert rows[("depthwise 7x7", "-")][6] == rows[("depthwise 3x3", "-")][6] == "1.00"
    assert "[1/6, " in err and "[6/6, " in err


def test_median_interval_is_the_order_statistics_of_the_binomial(monkeypatch):
    """The distribution-free 95% interval of a median: (v_(k), v_(n+1-k)) with the largest k such that
    P(Binomial(n, 1/2) < k) <= 2.5% (textbook values: n=10 → 2nd and 9th, n=21 → 6th and 16th, n=41 →
    14th and 28th); too few values give the whole range."""
    bench_ops = _load("bench_ops", monkeypatch)
    for n, (lo, hi) in {10: (2, 9), 21: (6, 16), 41: (14, 28), 5: (1, 5), 1: (1, 1)}.items():
        values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
        assert bench_ops.median_ci(values) == (lo, hi), n


def test_paired_times_alternate_the_functions(monkeypatch):
    bench_ops = _load("bench_ops", monkeypatch)
    calls = []
    times = bench_ops.paired_ms([lambda: calls.append("a"), lambda: calls.append("b")], repeat=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert [len(t) for t in times] == [3, 3] and all(v >= 0 for t in times for v in t)


def test_bench_models_rounds_take_medians_and_list_each_rounds_ratio(monkeypatch):
    bench_models = _load("bench_models", monkeypatch)
    rounds = [[dict(label="A", baseline="A", size=32, train=10.0, infer=4.0, memory=100.0),
               dict(label="B", baseline="A", size=32, train=t, infer=2.0, memory=m)]
              for t, m in ((5.0, 50.0), (9.0, 80.0), (6.0, 60.0))]
    rows = bench_models.merge_rounds(rounds)
    assert [(r["label"], r["train"], r["memory"]) for r in rows] == [("A", 10.0, 100.0), ("B", 6.0, 60.0)]
    text = bench_models.spread(rounds)
    assert "- B: train 0.50, 0.90, 0.60 (0.50–0.90)" in text and "memory 0.50, 0.80, 0.60 (0.50–0.80)" in text
    assert "- A:" not in text


def test_bench_deploy_rows_show_the_paired_ratio_and_its_interval(monkeypatch):
    bench_deploy = _load("bench_deploy", monkeypatch)
    row = dict(label="M", size=112, batch=1, eager=20.0, compiled=18.0, ratio=0.91, ci=(0.88, 0.95), ort=None)
    assert _cells(bench_deploy.markdown_row(row)) == ["M", "112", "1", "20.0", "18.0", "–", "0.91 [0.88, 0.95]",
                                                      "–", "–"]
    row.update(compiled="n/a (graph break)", ort=10.0, diff=1e-6)
    assert _cells(bench_deploy.markdown_row(row))[4:] == ["n/a (graph break)", "10.0", "–", "0.50", "1.0e-06"]


def test_bench_models_paired_steps_models_in_turns(monkeypatch, capsys):
    """--paired: one process, the models stepped in turns; the baseline has no ratio, the other a median
    ratio with its interval; models of two resolutions without --size are refused."""
    bench_models = _load("bench_models", monkeypatch)
    threads = torch.get_num_threads()
    try:
        bench_models.main(["--quick", "--paired", "--models", "ResNet-50", "RedNet-26"])
        with pytest.raises(SystemExit):
            bench_models.main(["--quick", "--paired", "--models", "ResNet-50", "face MobileNetV2 + TVConv"])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    rows = {cells[0]: cells for cells in map(_cells, out.splitlines()) if cells and cells[0] in ("ResNet-50",
                                                                                               "RedNet-26")}
    assert rows["ResNet-50"][3] == "" and float(rows["ResNet-50"][2]) > 0
    ratio, interval = rows["RedNet-26"][3].split(" ", 1)
    lo, hi = map(float, interval.strip("[]").split(", "))
    assert lo <= float(ratio) <= hi
    assert "needs one input size" in err


def test_bench_models_paired_inference_on_each_engine_with_its_op_breakdown(monkeypatch, capsys):
    """--paired --inference-only: every model on every engine in turns, each ratio to the baseline model on the
    same engine; --profile adds the time per op of each model side by side (eager: aten ops; ONNX Runtime: node
    op types, where the exported involution is slices, multiplies and adds)."""
    _main_on_tiny_models(monkeypatch, ["--paired", "--inference-only", "--engines", "eager", "ort", "--profile",
                                       "--size", "16", "--batch", "2", "--repeat", "5", "--models", "ResNet-50",
                                       "RedNet-26", "--profile-rows", "40"])  # near-0 op times: every op shown
    out = capsys.readouterr().out
    rows = {cells[0]: cells for cells in map(_cells, out.splitlines()) if cells}
    for engine in ("eager", "ONNX Runtime"):
        assert rows[f"ResNet-50, {engine}"][3] == "" and float(rows[f"ResNet-50, {engine}"][2]) >= 0
        ratio, interval = rows[f"RedNet-26, {engine}"][3].split(" ", 1)
        lo, hi = map(float, interval.strip("[]").split(", "))
        assert lo <= float(ratio) <= hi
    assert "ONNX Runtime, batch 2, 16², ms per run by op (mean of 5):" in out
    assert rows["op"] == ["op", "ResNet-50", "RedNet-26"] and float(rows["total"][2]) > 0
    assert {"Slice", "Mul", "Add"} <= set(rows) and "aten::convolution" in out


def test_bench_models_against_the_baseline_on_another_engine(monkeypatch, capsys):
    """--baseline-engine ort: each eager model also runs in turns with ResNet-50 in ONNX Runtime (each timed run
    after an untimed one), and its ratio is to that; the first table keeps the same-engine ratios."""
    _main_on_tiny_models(monkeypatch, ["--paired", "--inference-only", "--engines", "eager", "--baseline-engine",
                                       "ort", "--size", "16", "--batch", "2", "--repeat", "3", "--models",
                                       "ResNet-50", "RedNet-26"])
    out = capsys.readouterr().out
    first, cross = out.split("eager against the baseline on ONNX Runtime, in turns (each timed run after 1 untimed):")
    assert "RedNet-26, eager" in first and "ONNX Runtime |" not in first
    rows = {cells[0]: cells for cells in map(_cells, cross.splitlines()) if cells}
    assert set(rows) >= {"ResNet-50, eager", "RedNet-26, eager", "ResNet-50, ONNX Runtime"}
    assert rows["ResNet-50, ONNX Runtime"][3] == ""
    for label in ("ResNet-50, eager", "RedNet-26, eager"):  # both against ResNet-50 on ONNX Runtime
        ratio, interval = rows[label][3].split(" ", 1)
        lo, hi = map(float, interval.strip("[]").split(", "))
        assert lo <= float(ratio) <= hi


def test_bench_models_paired_training_with_its_op_breakdown(monkeypatch, capsys):
    """--paired --profile (training): after the paired table, one profiled training step per model, by op, side by
    side: the involution's fused forward and backward appear only in RedNet's column."""
    _main_on_tiny_models(monkeypatch, ["--paired", "--profile", "--size", "16", "--batch", "2", "--repeat", "3",
                                       "--models", "ResNet-50", "RedNet-26", "--profile-rows", "60"], classify=True)
    out = capsys.readouterr().out
    table, profile = out.split("training step, batch 2, 16², ms per run by op (mean of 1):")
    assert "| RedNet-26 | 16² |" in table
    rows = {cells[0]: cells for cells in map(_cells, profile.splitlines()) if cells}
    assert rows["op"] == ["op", "ResNet-50", "RedNet-26"]
    for op in ("dynconv::involution", "dynconv::involution_backward"):
        assert float(rows[op][1]) == 0 and float(rows[op][2]) > 0, rows[op]
    assert float(rows["aten::convolution_backward"][1]) > 0 and float(rows["total"][2]) > 0
