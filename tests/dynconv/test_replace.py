"""Replacement policies on our backbones, a timm model and a torchvision model."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import dynconv
import models
from dynconv.replace import Policy, Slot, format_report, select, trace, _candidates

SIZE = (32, 32)


def ours_resnet50():
    return models.create("dynconv_resnet50", num_classes=10, width=0.125, small_input=True)


def ours_mobilenetv2():
    return models.create("mobilenetv2", num_classes=10, width=0.25, small_input=True)


def timm_resnet10t():
    return timm.create_model("resnet10t", num_classes=10)  # deep stem: conv1 is a Sequential of three 3×3


def tv_mobilenet_v2():
    return torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)


MODELS = {"resnet50": ours_resnet50, "mobilenetv2": ours_mobilenetv2, "timm_resnet10t": timm_resnet10t,
          "tv_mobilenet_v2": tv_mobilenet_v2}


def convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def expected(model, policy):
    """What the policy should pick, from the module names and conv geometry alone."""
    found = convs(model)
    first = next(iter(found))  # the first conv of each of these models is the one that reads the image
    stem = {n for n in found if n.split(".")[0] in ("conv1", "stem", "conv_stem") or n == first}
    if policy == "all_3x3":
        return {n for n, m in found.items() if max(m.kernel_size) > 1 and n not in stem}
    return {n for n, m in found.items() if m.groups == m.in_channels == m.out_channels > 1 and n not in stem}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("policy,op", [("all_3x3", "ddf"), ("dw_only", "dwconv")])
def test_policy_picks_and_model_still_runs(name, policy, op):
    model = MODELS[name]()
    want = expected(model, policy)
    report = dynconv.replace(model, op, policy, input_size=SIZE)
    assert {r["layer"] for r in report} == want
    if name.endswith("mobilenet_v2") or name == "mobilenetv2" or policy == "all_3x3":
        assert want  # every model here has something to replace
    assert all(getattr(type(model.get_submodule(n)), "op_name", None) in (op, None) for n in want)
    assert model(torch.randn(2, 3, *SIZE)).shape == (2, 10)
    for r in report:  # the report tells the geometry and the parameter change
        assert r["params_before"] > 0 and r["input_size"] is not None


@pytest.mark.parametrize("name", ["resnet50", "timm_resnet10t"])
def test_deep_only_takes_the_last_stages(name):
    for policy in ({"name": "deep_only", "stages": [3, 4]}, {"name": "deep_only", "from_stage": 3},
                   {"name": "deep_only"}):
        model = MODELS[name]()
        want = {n for n in expected(model, "all_3x3") if n.startswith(("layer3", "layer4"))}
        report = dynconv.replace(model, "ddf", policy, input_size=SIZE)
        assert {r["layer"] for r in report} == want and want


def test_deep_only_stages_follow_resolution_on_mobilenet():
    model = tv_mobilenet_v2()
    candidates = _candidates(model)
    seen = trace(model, (64, 64), modules=candidates)
    picked = select(Policy("deep_only", stages=[5]), candidates, seen)
    assert picked and all(seen[n]["out_hw"] == (2, 2) for n in picked)  # 64 px / 32: the last stage


def test_none_policy_and_conv_op_replace_nothing():
    model = ours_resnet50()
    before = {k: v.shape for k, v in model.state_dict().items()}
    assert dynconv.replace(model, "ddf", "none", input_size=SIZE) == []
    assert dynconv.replace(model, "conv", "all_3x3", input_size=SIZE) == []
    assert {k: v.shape for k, v in model.state_dict().items()} == before


def test_include_and_exclude_patterns():
    model = ours_resnet50()
    report = dynconv.replace(model, "ddf", {"name": "all_3x3", "exclude": ["layer1", "layer2.*"]}, input_size=SIZE)
    assert report and all(r["layer"].startswith(("layer3", "layer4")) for r in report)
    model = ours_resnet50()
    report = dynconv.replace(model, "ddf", {"name": "none", "include": ["layer4.*.conv2", "stem"]}, input_size=SIZE)
    assert [r["layer"] for r in report] == ["stem.conv", "layer4.0.conv2", "layer4.1.conv2", "layer4.2.conv2"]
    assert model(torch.randn(1, 3, *SIZE)).shape == (1, 10)


def test_channel_changing_conv_gets_a_projection():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Conv2d(32, 32, 3, padding=1))
    report = dynconv.replace(model, "ddf", "all_3x3", input_size=(17, 17))
    assert [(r["layer"], r["projection"]) for r in report] == [("1", True), ("2", False)]
    proj = model[1]
    assert isinstance(proj.proj, nn.Conv2d) and (proj.proj.in_channels, proj.proj.out_channels) == (16, 32)
    assert proj.proj.kernel_size == (1, 1) and proj.op.stride == 2
    assert model(torch.randn(2, 3, 17, 17)).shape == (2, 32, 8, 8)
    with pytest.raises(ValueError, match="filters each channel separately"):  # the same error without a policy
        dynconv.create_op("ddf", 16, 32, 3)


def test_tvconv_gets_its_input_size_from_the_dry_pass():
    model = ours_mobilenetv2()
    size = (40, 36)
    report = dynconv.replace(model, "tvconv", "dw_only", input_size=size, hidden_channels=4, hidden_layers=1)
    seen = {}
    hooks = [model.get_submodule(r["layer"]).register_forward_pre_hook(
        lambda m, a, n=r["layer"]: seen.__setitem__(n, list(a[0].shape[-2:]))) for r in report]
    assert model(torch.randn(2, 3, *size)).shape == (2, 10)
    for h in hooks:
        h.remove()
    assert seen == {r["layer"]: r["input_size"] for r in report}
    assert {tuple(r["input_size"]) for r in report} >= {(40, 36), (20, 18), (10, 9)}


def test_slots_are_filled_whatever_the_policy_and_hints_apply():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1),
                          Slot(16, 16, 3, op_hints={"dcd": {"context": "pool2"}}), nn.Conv2d(16, 16, 3))
    report = dynconv.replace(model, "dcd", "none", input_size=(8, 8))
    assert [(r["layer"], r["kind"]) for r in report] == [("1", "slot")]
    assert model[1].fc[0].in_features == 4 * 16  # the 2×2 pooled context of conv_basic_dy
    assert isinstance(model[2], nn.Conv2d)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 16, 6, 6)


def test_report_format_and_policy_errors():
    model = ours_resnet50()
    report = dynconv.replace(model, {"name": "ddf", "kernel_combine": "add"}, "deep_only", input_size=SIZE)
    text = format_report(report)
    assert text.splitlines()[0].split()[:3] == ["layer", "kind", "op"] and "layer4.2.conv2" in text
    assert text.splitlines()[-1].startswith("total")
    with pytest.raises(ValueError, match="unknown policy 'all'"):
        Policy.parse("all")
    with pytest.raises(ValueError, match=r"unknown policy key\(s\) \['stage'\]"):
        Policy.parse({"name": "deep_only", "stage": 3})
    with pytest.raises(ValueError, match="not both"):
        Policy(name="deep_only", stages=[3], from_stage=3)


def _slot_layers(report, op):
    return {r["layer"]: tuple(r["input_size"]) for r in report if r["kind"] == "slot" and r["op"] == op}


def test_placement_policies_choose_the_slots_that_get_the_operator():
    """TVConv's placement ablation: deep stages only / shallow stages only; the other slots keep the
    depthwise conv they stand for (same geometry, groups = channels)."""
    build = lambda policy: models.build({"name": "face_mobilenetv2", "width": 0.1}, {"name": "tvconv"},  # noqa: E731
                                        policy, num_classes=512, input_size=(96, 96))
    _, every = build({"name": "dw_only"})
    out_h = {r["layer"]: r["input_size"][0] // r["stride"][0] for r in every}
    sizes = sorted(set(out_h.values()))
    assert len(sizes) == 5 and len(_slot_layers(every, "tvconv")) == len(every)
    for policy, wanted in ((Policy("deep_only"), set(sizes[:2])), (Policy("shallow_only"), set(sizes[-2:])),
                           (Policy("deep_only", from_stage=5), {sizes[0]}),
                           (Policy("shallow_only", stages=[1]), {sizes[-1]})):
        model, report = build(policy)
        tv = _slot_layers(report, "tvconv")
        assert tv and set(tv) == {n for n, h in out_h.items() if h in wanted}
        for name in set(out_h) - set(tv):
            conv = model.get_submodule(name)
            assert type(conv) is dynconv.get_op("conv") and conv.groups == conv.in_channels == conv.out_channels
            assert conv.stride == tuple(next(r for r in every if r["layer"] == name)["stride"])
        x = torch.randn(2, 3, 96, 96)
        assert model(x).shape == (2, 512)


def test_exclude_pattern_leaves_a_slot_to_its_plain_conv():
    model = models.create("rednet26", num_classes=10, op="involution", policy={"name": "none", "exclude": ["layer1"]})
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("conv2") and n.count(".") == 2}
    assert kinds and all((k == "Conv") == n.startswith("layer1") for n, k in kinds.items())


def test_from_stage_is_only_for_deep_only():
    with pytest.raises(ValueError, match="from_stage applies to deep_only only"):
        Policy("shallow_only", from_stage=2)


def test_report_header_counts_replaced_and_kept_layers(caplog):
    """Under on_incompatible=skip the header counts only the layers that got the operator and says how many kept
    their conv (involution needs channels divisible by group_channels=16: the 8-channel conv stays)."""
    import torch.nn as nn

    from dynconv.replace import Policy

    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1),
                          nn.Conv2d(8, 8, 3, padding=1))
    with caplog.at_level("INFO", logger="dynconv.replace"):
        report = dynconv.replace(model, "involution", Policy.parse({"name": "all_3x3", "on_incompatible": "skip"}),
                                 input_size=(8, 8), in_chans=3)
    assert [r["skipped"] for r in report] == [False, True]
    assert "replaced 1 layer(s) by involution (1 kept their conv)" in caplog.text
