"""timm interoperability: our names never shadow timm's, pretrained timm backbones with an operator (weights from
a file, warm start, lr multipliers), `policy.on_incompatible`, and the small-input warning."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import dynconv
import models
from engine.trainer import param_groups
from tests.engine.conftest import run_train, summary

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32

# the 9 timm models of issue 19, each with an operator and the policy that reaches its spatial convs; the last
# three cannot take the operator everywhere as configured (24-channel layers, 5x5 kernels above DK's scope of 4)
TIMM_CASES = [
    ("efficientnet_b0", "ddf", "dw_only"), ("convnext_nano", "involution", "dw_only"),
    ("resnet18", "odconv", "all_3x3"), ("ghostnet_100", "ddf", "dw_only"), ("repvgg_a0", "ddf", "all_3x3"),
    ("densenet121", "involution", "all_3x3"), ("efficientnet_b0", "tvconv", "dw_only"),
    ("regnetx_002", "involution", "all_3x3"), ("mobilenetv3_large_100", "dk_local", "dw_only"),
]
INCOMPATIBLE = {"regnetx_002", "mobilenetv3_large_100"}


def build(name, op, policy, on_incompatible, **model_kw):
    return models.build({"name": name, **model_kw}, {"name": op}, {"name": policy, "on_incompatible": on_incompatible},
                        num_classes=5, input_size=(SIZE, SIZE))


def test_import_models_leaves_timm_models_alone():
    with torch.device("meta"):
        model = timm.create_model("resnet50")
    assert type(model) is timm.models.resnet.ResNet
    assert models.build({"name": "resnet50"}, None, None, num_classes=10)[0].__class__ is timm.models.resnet.ResNet


def test_no_registered_name_was_timms():
    code = ("import timm; before = set(timm.list_models()); import models; "
            "print([n for n in models.list_models() if n in before]); "
            "print([n for n in models.list_models() if n not in timm.list_models()])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "[]"], out  # none was timm's; all are timm's now
    assert len(models.list_models()) > 20
    with pytest.raises(ValueError, match="one of timm's models"):
        models._factory.register("resnet50", models.resnet.resnet)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A timm ResNet-18's ImageNet-shaped weights (random: the tests check where they go, not what they learnt)."""
    path = tmp_path_factory.mktemp("pretrained") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18").state_dict(), path)
    return path


@pytest.mark.parametrize("op", ["dyconv", "ddf"])
def test_pretrained_file_loads_before_replacement(weights_file, op):
    saved = torch.load(weights_file)
    model, report = models.build({"name": "resnet18", "pretrained": True, "pretrained_file": str(weights_file)},
                                 {"name": op}, {"name": "deep_only", "on_incompatible": "error"}, num_classes=1000,
                                 input_size=(SIZE, SIZE))  # 1000 classes: timm keeps the file's classifier too
    replaced = {r["layer"] for r in report}
    assert replaced and all(r["layer"].startswith(("layer3.", "layer4.")) for r in report)
    state = model.state_dict()
    kept = [k for k in saved if not any(k.startswith(n + ".") for n in replaced)]
    assert "fc.weight" in kept and len(kept) > len(saved) // 2 and all(torch.equal(state[k], saved[k]) for k in kept)
    for r in report:  # DY-Conv's experts start as copies of the conv; DDF (no conv-shaped kernel) starts fresh
        conv_w = saved[r["layer"] + ".weight"]
        if op == "dyconv" and not r["projection"]:
            assert r["init"] == "conv"
            assert all(torch.equal(w, conv_w) for w in model.get_submodule(r["layer"]).weight)
        else:
            assert r["init"] == "fresh"


def test_warm_start_takes_the_static_kernel_of_each_operator():
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=True)
    for op, kernel in (("dcd", "conv.weight"), ("dwconv", "weight"), ("condconv", "weight"), ("odconv", "weight")):
        src = conv if op != "dwconv" else nn.Conv2d(16, 16, 3, padding=1, groups=16)
        model = nn.Sequential(nn.Conv2d(3, 16, 1), src)
        report = dynconv.replace(model, op, {"name": "all_3x3"}, input_size=(8, 8), warm_start=True)
        assert [r["init"] for r in report] == ["conv"], op
        weight = dict(model[1].named_parameters())[kernel]
        assert torch.equal(weight, src.weight.expand_as(weight)), op
    cold = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1))
    dynconv.replace(cold, "dyconv", {"name": "all_3x3"}, input_size=(8, 8))
    assert not torch.equal(cold[1].weight[0], cold[1].weight[1])  # no warm start: the experts' own init


def test_lr_mult_globs_split_new_and_pretrained_layers(weights_file):
    model, report = models.build({"name": "resnet18", "pretrained": True, "pretrained_file": str(weights_file)},
                                 {"name": "ddf"}, {"name": "deep_only"}, num_classes=5, input_size=(SIZE, SIZE))
    new = {r["layer"] for r in report}
    globs = {**{f"{n}.*": 1.0 for n in new}, "*": 0.1}  # the report's layer names are the globs
    groups = param_groups(model, 0.0, False, globs)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert scale[id(p)] == (1.0 if any(name.startswith(n + ".") for n in new) else 0.1), name


@pytest.mark.parametrize("name,op,policy", TIMM_CASES, ids=lambda v: str(v))
def test_timm_models_train_a_step_under_adapt(name, op, policy):
    torch.manual_seed(0)
    model, report = build(name, op, policy, "adapt")
    assert report and not any(r["skipped"] for r in report)
    adapted = [r for r in report if r["note"].startswith("adapted")]
    assert bool(adapted) == (name in INCOMPATIBLE)
    for r in adapted:  # the nearest valid option, as the note says
        module = model.get_submodule(r["layer"])
        if op == "involution":
            g = r["out_channels"] // module.kernel_groups
            assert r["out_channels"] % g == 0 and not any(r["out_channels"] % d == 0 for d in range(g + 1, 17))
        else:
            assert min(module.scope_size) == max(r["kernel_size"]) + 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, SIZE, SIZE)), torch.tensor([0, 1]))
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name,op,policy", TIMM_CASES, ids=lambda v: str(v))
def test_timm_models_under_skip_keep_and_explain(name, op, policy):
    with torch.device("meta"):
        model, report = build(name, op, policy, "skip")
    skipped = [r for r in report if r["skipped"]]
    assert bool(skipped) == (name in INCOMPATIBLE) and len(skipped) < len(report)
    for r in skipped:
        assert r["note"].startswith(f"skipped: {op}:") and r["init"] == "kept"
        assert isinstance(model.get_submodule(r["layer"]), nn.Conv2d)  # timm's conv, kept
    if skipped:
        with pytest.raises(ValueError, match="on_incompatible=skip keeps this conv"):
            build(name, op, policy, "error")


def test_small_input_warning_names_the_fix(caplog):
    with torch.device("meta"), caplog.at_level("WARNING", logger="models._factory"):
        _, report = models.build({"name": "rednet26", "width": 0.125}, None, None, num_classes=10,
                                 input_size=(28, 28))
    warned = [r for r in report if r.get("warning")]
    assert warned and all(min(r["input_size"]) < 7 for r in warned)
    assert "model.small_input=true" in caplog.text and "data.img_size=" in caplog.text
    assert "smaller than kernel" in models.format_report(report)
    caplog.clear()
    with torch.device("meta"), caplog.at_level("WARNING", logger="models._factory"):
        _, report = models.build({"name": "rednet26", "width": 0.125, "small_input": True}, None, None,
                                 num_classes=10, input_size=(28, 28))
    assert not any(r.get("warning") for r in report) and "small_input" not in caplog.text


@pytest.mark.parametrize("content, says", [(b"not weights\n", "is damaged or not a checkpoint"),
                                           ({"fc.weight": print}, "is unsafe: it holds a reference to print")])
def test_a_pretrained_file_that_is_not_plain_weights_is_named(tmp_path, content, says):
    from engine.checkpoint import CheckpointError

    path = tmp_path / "resnet18.pth"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(CheckpointError) as err:
        models.build({"name": "resnet18", "pretrained": True, "pretrained_file": str(path)}, None, None,
                     num_classes=10)
    msg = str(err.value)
    assert msg.startswith(f"{path} {says}") and "\n" not in msg and "weights_only" not in msg


def test_train_py_names_an_unsafe_pretrained_file_in_one_line(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save({"fc.weight": print}, path)
    proc = run_train(["model=timm", "model.name=resnet18", "model.pretrained=true", f"model.pretrained_file={path}",
                      "op=conv", "data=synthetic", "data.img_size=32", "data.channels=3", "data.workers=0"],
                     tmp_path / "run", check=False, tiny=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"train.py: error: {path} is unsafe"), proc.stderr[-3000:]


def test_finetune_timm_ddf_experiment_runs_from_a_pretrained_file(weights_file, tmp_path):
    run = tmp_path / "run"
    run_train(["experiment=finetune_timm_ddf", f"model.pretrained_file={weights_file}",
               "data.train_subset=64", "data.batch_size=8", "trainer.epochs=1", "trainer.limit_train_batches=1",
               "trainer.limit_val_batches=1", "trainer.progress=false"], run, tiny=False)
    s = summary(run)
    report = json.loads((run / "replacement.json").read_text())
    assert s["num_updates"] == 1 and s["config"]["model"]["pretrained"] and s["replacement"] == len(report) > 0
    assert {r["op"] for r in report} == {"ddf"} and {r["init"] for r in report} == {"fresh"}


def test_convs_that_pad_in_forward_get_same_padding():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), timm.layers.Conv2dSame(8, 8, 3, stride=2))  # declares padding 0
    x = torch.randn(1, 3, 15, 15)
    size = model(x).shape
    dynconv.replace(model, "ddf", {"name": "all_3x3"}, input_size=(15, 15))
    assert model(x).shape == size


@pytest.mark.parametrize("mode", ["skip", "adapt"])
def test_slots_follow_on_incompatible(mode):
    with torch.device("meta"):
        model, report = models.build({"name": "rednet26", "width": 0.125, "small_input": True},
                                     {"name": "involution", "group_channels": 48}, {"name": "none", "on_incompatible": mode},
                                     num_classes=10, input_size=(28, 28))
    for r in report:
        module = model.get_submodule(r["layer"])
        if mode == "skip":  # a slot is never left empty: the plain conv it stands for, with the reason
            assert r["note"].startswith("skipped (plain conv): involution:") and isinstance(module, nn.Conv2d)
        else:
            g = r["out_channels"] // module.kernel_groups
            assert g == max(d for d in range(1, 49) if r["out_channels"] % d == 0) and str(g) in r["note"]


def test_small_input_warning_never_asks_for_small_input_when_it_is_set(caplog):
    """RedNet-50 with the stride-1 stem at 28 px: stage 4 still sees 4×4 maps under 7×7 kernels; the warning names
    the one fix left (a larger data.img_size), not model.small_input=true."""
    with torch.device("meta"), caplog.at_level("WARNING", logger="models._factory"):
        _, report = models.build({"name": "rednet", "small_input": True}, None, None, num_classes=10, in_chans=1,
                                 input_size=(28, 28))
    assert [r["input_size"] for r in report if r.get("warning")] == [[4, 4]] * 2
    assert "with model.small_input=true already" in caplog.text and "data.img_size=" in caplog.text
    assert "keep the resolution with model.small_input=true" not in caplog.text
