"""`train.py trainer.compile=true` end to end: the model with its dynamic operator compiled (inductor,
fullgraph-capable custom ops) trains, evaluates and logs like the eager run. A narrow ResNet-18 with
involution in every 3x3 place keeps inductor's build short (about 100 s of CPU time)."""
import math

from tests.engine.conftest import read_scalars, run_train


def test_compiled_involution_net_trains_and_logs(tmp_path):
    run = tmp_path / "run"
    run_train(["model=resnet18", "model.width=0.125", "model.small_input=true", "op=involution", "policy=all_3x3",
               "data=mnist5k", "data.batch_size=16", "data.workers=0", "debug=fdr", "trainer.compile=true",
               "trainer.log_interval=1", "trainer.count_flops=false", "trainer.progress=false"], run,
              tiny=False, timeout=1200)
    s = read_scalars(run)
    for tag in ("train/loss", "val/loss", "val/acc1"):
        assert tag in s, f"missing TensorBoard scalar {tag}; have {sorted(s)}"
    assert s["train/loss"] and all(math.isfinite(v) for _, v in s["train/loss"])
    assert math.isfinite(s["val/loss"][-1][1])


def test_compile_warning_names_the_expert_convs_on_cpu_only():
    """trainer.compile says where inductor itself makes a paper model slower than eager: CondConv and DY-Conv
    layers on CPU at batch 1 (docs/BENCHMARKS.md); not ODConv (faster compiled), not other operators, not CUDA."""
    import torch

    import models
    from engine.trainer import compile_warning

    def net(op):
        return models.build({"name": "dynconv_resnet18", "width": 0.125}, {"name": op}, {"name": "all_3x3"},
                            num_classes=10)[0]

    cpu = torch.device("cpu")
    for op, name in (("condconv", "CondConv"), ("dyconv", "DYConv")):
        text = compile_warning(net(op), cpu)
        assert text is not None and name in text and "trainer.compile=false" in text
        assert compile_warning(net(op), torch.device("cuda")) is None
    for op in ("odconv", "involution", "conv"):
        assert compile_warning(net(op), cpu) is None
