"""Backbones: exact parameter counts of the paper models, forward shapes, the build/timm paths."""
import copy

import pytest
import timm
import torch

import models
from dynconv.replace import Slot


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name, **kw):
    """Built on the meta device: the structure (and so the count) without allocating weights."""
    with torch.device("meta"):
        return timm.create_model(name, **kw)


# the issue's numbers: official counts with the 1000-class head (face nets: with the 512-d embedding)
PAPER_PARAMS = {
    ("rednet26", None): 9_233_166, ("rednet38", None): 12_386_986, ("rednet50", None): 15_540_806,
    ("rednet101", None): 25_652_950, ("rednet152", None): 33_984_582,
    ("ddf_mul_resnet50", None): 16_843_748, ("ddf_add_resnet50", None): 16_843_748,
    ("ddf_mul_resnet101", None): 28_146_912, ("ddf_add_resnet101", None): 28_146_912,
    ("resnet18_dcd", None): 14_703_332, ("resnet50_dcd", None): 29_835_056, ("mobilenetv2_dcd", None): 5_720_028,
    ("face_mobilenetv2_x0_1", None): 324_672, ("face_mobilenetv2_x0_1", "tvconv"): 16_369_368,
    ("face_mobilenetv2_x0_5", None): 827_968, ("face_mobilenetv2_x0_5", "tvconv"): 30_079_264,
    ("face_mobilenetv2_x1_0", None): 2_241_280, ("face_mobilenetv2_x1_0", "tvconv"): 49_708_576,
    ("face_shufflenetv2_x0_5", None): 869_664, ("face_shufflenetv2_x0_5", "tvconv"): 10_602_984,
    ("face_shufflenetv2_x1_0", None): 1_781_476, ("face_shufflenetv2_x1_0", "tvconv"): 18_904_696,
    # torchvision's counts of the plain backbones
    ("dynconv_resnet18", None): 11_689_512, ("dynconv_resnet50", None): 25_557_032,
    ("dynconv_resnet101", None): 44_549_160,
    ("mobilenetv2", None): 3_504_872,
}


@pytest.mark.parametrize("name,op", list(PAPER_PARAMS), ids=lambda v: str(v))
def test_paper_parameter_counts(name, op):
    kw = {"op": op} if op else {}
    model = meta_model(name, input_size=(96, 96) if name.startswith("face") else (64, 64), **kw)
    assert n_params(model) == PAPER_PARAMS[(name, op)]
    assert not any(isinstance(m, Slot) for m in model.modules())


def test_plain_backbones_match_torchvision_structure():
    import torchvision

    for ours, theirs in (("dynconv_resnet50", torchvision.models.resnet50), ("mobilenetv2", torchvision.models.mobilenet_v2)):
        with torch.device("meta"):
            a, b = timm.create_model(ours), theirs()
        assert sorted(p.numel() for p in a.parameters()) == sorted(p.numel() for p in b.parameters())


SMALL = [  # (model cfg, op cfg, input size)
    ({"name": "dynconv_resnet", "depth": 18, "width": 0.125, "small_input": True}, None, 28),
    ({"name": "dynconv_resnet50", "width": 0.125, "small_input": True}, None, 28),
    ({"name": "mobilenetv2", "width": 0.25, "small_input": True}, None, 28),
    ({"name": "rednet", "depth": 26, "width": 0.125, "small_input": True}, {"name": "involution"}, 28),
    ({"name": "rednet", "width": 0.125, "small_input": True}, {"name": "ddf"}, 28),
    ({"name": "ddf_resnet", "width": 0.125, "small_input": True}, {"name": "ddf", "kernel_combine": "add"}, 28),
    ({"name": "resnet_dcd", "depth": 18, "width": 0.125, "small_input": True}, {"name": "dcd", "context": "pool2"}, 28),
    ({"name": "mobilenetv2_dcd", "width": 0.25, "small_input": True}, {"name": "dcd_mbv2"}, 28),
]


@pytest.mark.parametrize("model_cfg,op_cfg,size", SMALL, ids=lambda v: str(v))
def test_small_forward_and_backward(model_cfg, op_cfg, size):
    model, report = models.build(model_cfg, op_cfg, {"name": "none"}, num_classes=7, in_chans=1, input_size=(size, size))
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert bool(report) == (op_cfg is not None)  # slot families report their filled slots


@pytest.mark.parametrize("family,op", [("face_mobilenetv2", "tvconv"), ("face_shufflenetv2", "dwconv")])
def test_face_backbones_embed(family, op):
    width = 0.1 if family == "face_mobilenetv2" else 0.5
    model, report = models.build({"name": family, "width": width, "embedding_dim": 32}, {"name": op}, None,
                                 num_classes=32, input_size=(32, 32))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    n_dw = sum(1 for r in report if r["kind"] == "slot")
    # MobileNetV2: one per block (17); ShuffleNetV2: one per unit (16) plus branch1 of the 3 strided ones
    assert n_dw == len(report) == (17 if family == "face_mobilenetv2" else 19)
    assert all(type(m).__name__ != "Conv2d" or m.groups == 1 for m in model.modules())
    with pytest.raises(ValueError, match="embedding"):
        models.build({"name": family, "width": width}, {"name": op}, None, num_classes=10, input_size=(32, 32))


def test_ddf_resnet50_equals_resnet50_with_ddf_policy():
    a = meta_model("ddf_mul_resnet50", input_size=(64, 64))
    b = meta_model("dynconv_resnet50", op="ddf", policy="all_3x3", input_size=(64, 64))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert n_params(a) == n_params(b) == 16_843_748
    assert [r["layer"] for r in a.replacement_report] == [r["layer"] for r in b.replacement_report]


def test_family_names_choose_the_variant_and_unknown_keys_are_named():
    with torch.device("meta"):
        a, _ = models.build({"name": "rednet", "depth": 26}, {"name": "involution"}, None, num_classes=1000,
                            input_size=(64, 64))
    assert n_params(a) == 9_233_166
    with pytest.raises(TypeError, match=r"unknown option 'colour'.*model options: .*width"):
        models.build({"name": "dynconv_resnet50", "colour": 1}, None, None, num_classes=10)
    with pytest.raises(TypeError, match="rednet50 fixes depth=50"):
        models.build({"name": "rednet50", "depth": 26}, None, None, num_classes=10)
    with pytest.raises(ValueError, match="op=ddf has no effect"):
        models.build({"name": "dynconv_resnet18", "width": 0.125, "small_input": True}, {"name": "ddf"}, {"name": "none"},
                     num_classes=10, input_size=(28, 28))


def test_timm_kwargs_path_and_default_op():
    model = timm.create_model("dynconv_resnet18", num_classes=5, width=0.125, small_input=True, op="ddf", input_size=(28, 28))
    assert {r["kind"] for r in model.replacement_report} == {"all_3x3"}  # op given, no policy: the family default
    assert all(r["layer"].startswith("layer") for r in model.replacement_report)
    red = timm.create_model("rednet26", num_classes=5, width=0.125, small_input=True, input_size=(28, 28))
    assert {r["op"] for r in red.replacement_report} == {"involution"}
    assert red(torch.randn(1, 3, 28, 28)).shape == (1, 5)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("rednet26", pretrained=True)


def test_rednet_last_bn_zero_and_head_init():
    model = timm.create_model("rednet26", num_classes=10, width=0.125, small_input=True, input_size=(28, 28))
    assert all(torch.all(b.bn3.weight == 0) for b in model.blocks())
    assert model.fc.bias.abs().max() == 0 and model.fc.weight.std() < 0.02


def test_build_any_timm_model_with_a_policy():
    model, report = models.build({"name": "mobilenetv3_small_050"}, {"name": "ddf"}, {"name": "dw_only"},
                                 num_classes=4, in_chans=1, input_size=(32, 32))
    assert report and all(r["in_channels"] == r["out_channels"] for r in report)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    with torch.device("meta"):
        red, _ = models.build({"name": "rednet26"}, {"name": None}, None, num_classes=1000, input_size=(64, 64))
    assert n_params(red) == 9_233_166  # an op config without a name: the model's own operator


def test_build_lists_the_operator_options_for_a_misspelt_op_key():
    with pytest.raises(TypeError, match=r"operator 'dyconv' got unknown option\(s\) \['tempp'\]; its options are: "
                                        r".*temperature"):
        models.build({"name": "resnet18"}, {"name": "dyconv", "tempp": 3.0}, {"name": "all_3x3"}, num_classes=10,
                     input_size=(32, 32))


def _rednet_step(model, x):
    out = model(x)
    torch.manual_seed(1)
    grads = torch.autograd.grad(out, list(model.parameters()), torch.randn_like(out))
    return out, grads, [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("small_input", [False, True])
def test_rednet_stem_recompute_equals_kept(small_input):
    """The recomputed stem (the default) gives the plain stem's output, every gradient and BatchNorm buffers
    updated once (batch counts 1), bit for bit, and keeps none of its activations: only the image."""
    torch.manual_seed(0)
    model = timm.create_model("rednet26", num_classes=10, width=0.25, small_input=small_input).double().train()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    in_stem, stem_kept = [False], []

    def pack(t):
        if in_stem[0]:
            stem_kept.append(tuple(t.shape))
        return t

    model.stem.register_forward_pre_hook(lambda *args: in_stem.__setitem__(0, True))
    model.stem.register_forward_hook(lambda *args: in_stem.__setitem__(0, False))
    results = []
    for recompute in (True, False):
        model.load_state_dict(state)
        model.stem.recompute = recompute
        stem_kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            results.append(_rednet_step(model, x))
        activations = [s for s in stem_kept if len(s) == 4 and s[0] == x.shape[0]]
        if recompute:
            assert activations == [tuple(x.shape)]
        else:
            assert len(activations) >= 7
    assert all(int(b) == 1 for name, b in model.named_buffers() if name.endswith("num_batches_tracked"))
    (out, grads, bufs), (ref, ref_grads, ref_bufs) = results
    assert torch.equal(out, ref)
    for got, want in zip((*grads, *bufs), (*ref_grads, *ref_bufs)):
        assert torch.equal(got, want)
