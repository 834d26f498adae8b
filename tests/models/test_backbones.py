"""Our models as timm models and as detection/segmentation backbones: what timm's own model tests hold its models
to (forward, pretrained config, classifier reset, features and intermediates, grad checkpointing, FX), the
mmdet/mmseg options `frozen_stages` and `norm_eval`, and a feature pyramid on `features_only` RedNet-26."""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from timm.data import create_transform, resolve_data_config
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import dynconv
import models
from models.export import batch_statistics

NAMES = models.list_models()


def pixels(name: str) -> int:
    """Every level keeps a pixel (total stride 32); DCD's low-rank path overflows in eval mode on 1×1 maps."""
    return 64 if "dcd" in name else 32


def small(name: str) -> dict:
    """The narrowest variant the name allows (fixed widths stay), built for its test input size."""
    spec = models._factory._MODELS[name]
    kw = {"input_size": (pixels(name), pixels(name))}
    if "width" not in spec.fixed:
        kw["width"] = {"face_shufflenetv2": 0.5, "face_mobilenetv2": 0.1}.get(name, 0.25 if "mobilenet" in name else 0.125)
    return kw


def build(name: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **small(name), **kw)


def evaluated(model: nn.Module, size: int) -> nn.Module:
    """In eval mode with one batch's BatchNorm statistics (a fresh DCD net overflows with the initial ones)."""
    return batch_statistics(model, image(size, 4))


def image(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", NAMES)
def test_timm_model_contract(name):
    size = pixels(name)
    model = evaluated(build(name), size)
    cfg, state = model.pretrained_cfg, model.state_dict()
    assert model.default_cfg is cfg and cfg["architecture"] == name
    assert {"mean", "std", "input_size", "crop_pct", "interpolation", "num_classes"} <= cfg.keys()
    classifier = (cfg["classifier"],) if isinstance(cfg["classifier"], str) else cfg["classifier"]
    assert all(name + ".weight" in state for name in (cfg["first_conv"], *classifier))
    assert cfg["num_classes"] == model.num_classes
    assert model.get_submodule(model.get_classifier(name_only=True)) is model.get_classifier()
    x, side = image(size), lambda reduction: math.ceil(size / reduction)
    with torch.no_grad():
        features = model.forward_features(x)
        last = model.feature_info[-1]
        assert features.shape == (2, model.num_features, side(last["reduction"]), side(last["reduction"]))
        assert torch.equal(model.forward_head(features), model(x))
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (2, model.head_hidden_size)

        final, levels = model.forward_intermediates(x)
        assert torch.equal(final, features) and len(levels) == len(model.feature_info) >= 4
        for info, level in zip(model.feature_info, levels):
            assert level.shape == (2, info["num_chs"], side(info["reduction"]), side(info["reduction"]))
        taken = model.forward_intermediates(x, indices=[1, -2], stop_early=True, intermediates_only=True)
        assert [torch.equal(a, levels[i]) for a, i in zip(taken, (1, -2))] == [True, True]

        model.reset_classifier(0)
        assert model.num_classes == 0 and torch.equal(model(x), pre_logits)
        model.reset_classifier(0, "")
        assert torch.equal(model(x), features)
    unpooled = evaluated(build(name, num_classes=0, global_pool=""), size)
    with torch.no_grad():
        assert unpooled(x).shape == features.shape


@pytest.mark.parametrize("name", NAMES)
def test_features_only_gives_the_levels_of_feature_info(name):
    size = pixels(name)
    full = evaluated(build(name), size)
    with torch.no_grad():
        _, levels = full.forward_intermediates(image(size))
    for out_indices in ((1, 2, 3), None):
        kw = {} if out_indices is None else {"out_indices": out_indices}
        net = build(name, features_only=True, **kw)
        net.model.load_state_dict(full.state_dict(), strict=False)  # the statistics; the pruned stages stay out
        net.eval()
        picked = list(out_indices or range(len(full.feature_info)))
        assert net.feature_info.channels() == [full.feature_info[i]["num_chs"] for i in picked]
        assert net.feature_info.reduction() == [full.feature_info[i]["reduction"] for i in picked]
        assert net.feature_info.module_name() == [full.feature_info[i]["module"] for i in picked]
        with torch.no_grad():
            maps = net(image(size))
        assert len(maps) == len(picked)
        for i, m, c, r in zip(picked, maps, net.feature_info.channels(), net.feature_info.reduction()):
            assert m.shape == (2, c, math.ceil(size / r), math.ceil(size / r)) and torch.equal(m, levels[i])
    # the unused stages are dropped: no parameter a detector's loss would leave without a gradient
    head_free = build(name, features_only=True, out_indices=(1, 2))
    head_free(image(size))[-1].sum().backward()
    assert all(p.grad is not None for p in head_free.parameters())


def _train_step(model, x):
    torch.manual_seed(3)
    out = model(x)
    grads = torch.autograd.grad(out.square().mean(), [p for p in model.parameters() if p.requires_grad])
    return [out, *grads, *model.buffers()]


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_trains_identically(name):
    plain = build(name).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = image(pixels(name))
    for a, b in zip(_train_step(plain, x), _train_step(checkpointed, x)):
        assert torch.equal(a, b)  # outputs, every gradient and the BatchNorm statistics (updated once)


def _timm_tracer():
    return {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}


@pytest.mark.parametrize("name", NAMES)
def test_fx_traces_every_model(name):
    model = evaluated(build(name), pixels(name))
    x = image(pixels(name))
    graph = torch.fx.symbolic_trace(model)
    operators = {n for n, m in model.named_modules() if isinstance(m, dynconv.Operator)}
    assert operators <= {n.target for n in graph.graph.nodes if n.op == "call_module"}  # each one node
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))
        _, levels = model.forward_intermediates(x)
    nodes = {info["module"]: f"level{i}" for i, info in enumerate(model.feature_info)}
    extractor = create_feature_extractor(model, nodes)  # traces train and eval mode
    with torch.no_grad():
        maps = extractor(x)
    assert all(torch.equal(maps[f"level{i}"], level) for i, level in enumerate(levels))
    # timm's own FX path (its test suite's tracer arguments), in train mode with a backward
    train_nodes, _ = get_graph_node_names(model, tracer_kwargs=_timm_tracer())
    fx_train = create_feature_extractor(model.train(), {train_nodes[-1]: "out"}, tracer_kwargs=_timm_tracer())
    fx_train(x)["out"].mean().backward()
    assert all(p.grad is not None for p in fx_train.parameters())


def _norms(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", NAMES)
def test_frozen_stages_and_norm_eval(name):
    model = build(name, frozen_stages=1, norm_eval=True).train()
    frozen_end = model.trunk.index(model.feature_info[1]["module"]) + 1
    frozen = [model.get_submodule(n) for n in model.trunk[:frozen_end]]
    frozen_params = {id(p) for m in frozen for p in m.parameters()}
    assert frozen_params and all(not m.training for f in frozen for m in f.modules())
    assert all(not m.training for m in _norms(model)) and model.get_submodule(model.trunk[-1]).training
    assert all(p.requires_grad == (id(p) not in frozen_params) for p in model.parameters())
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(image(pixels(name))).square().mean().backward()
    opt.step()
    after = model.state_dict()
    frozen_keys = {k for k in before if any(k.startswith(n + ".") for n in model.trunk[:frozen_end])}
    buffers = {k for k, _ in model.named_buffers()}
    assert all(torch.equal(before[k], after[k]) for k in frozen_keys | buffers)  # BN statistics included
    assert any(not torch.equal(before[k], after[k]) for k in before.keys() - frozen_keys)
    model.train()  # every train() keeps the options
    assert all(not m.training for m in _norms(model))
    with pytest.raises(TypeError, match="frozen_stages=9"):
        build(name, frozen_stages=9)


@pytest.mark.parametrize("op", dynconv.list_ops())
def test_frozen_backbone_gradients_equal_the_reference_backend(op):
    """Frozen stages and BatchNorm in eval mode, on every operator: the fast path's output and gradients equal
    the reference backend's (involution recomputes its generator, BatchNorm included, in backward)."""
    torch.manual_seed(0)
    model, _ = models.build({"name": "dynconv_resnet18", "width": 0.25, "frozen_stages": 1, "norm_eval": True},
                            {"name": op}, {"name": "all_3x3", "on_incompatible": "adapt"}, num_classes=4,
                            input_size=(16, 16))
    model = model.double().train()
    for m in _norms(model):  # statistics unlike the batch's, so that batch statistics would show
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    results = []
    for backend in ("fast", "reference"):
        with dynconv.use_backend(backend):
            results.append(_train_step(model, x))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_backbone_options_from_the_config():
    from tests.engine.conftest import compose_cfg

    cfg = compose_cfg(["model=rednet26", "model.width=0.125", "model.frozen_stages=2", "model.norm_eval=true"])
    with torch.device("meta"):
        model, _ = models.build(dict(cfg.model), None, None, num_classes=10, input_size=(64, 64))
    assert (model.frozen_stages, model.norm_eval) == (2, True)
    assert not any(p.requires_grad for p in model.layer2.parameters())
    assert all(p.requires_grad for p in model.layer3.parameters())
    with pytest.raises(TypeError, match="model options: .*frozen_stages.*norm_eval"):
        models.build({"name": "rednet26", "frozen_stage": 1}, None, None, num_classes=10)


def test_resolve_data_config_gives_the_papers_eval_transform():
    """RedNet-50's official checkpoints were evaluated by mmcls: resize to 256 (bilinear), center crop 224,
    ImageNet mean and std; timm's validate.py builds that transform from the model."""
    with torch.device("meta"):
        model = timm.create_model("rednet50")
    cfg = resolve_data_config({}, model=model)
    assert cfg == {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
                   "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
    resize, crop = create_transform(**cfg).transforms[:2]
    assert (resize.size, resize.interpolation.value, crop.size) == (256, "bilinear", (224, 224))
    assert model.pretrained_cfg["origin_url"] == "https://github.com/d-li14/involution"


class TinyFPNHead(nn.Module):
    """features_only backbone → torchvision's FeaturePyramidNetwork → a 1×1 conv per level (a dense head)."""

    def __init__(self, backbone: nn.Module, channels: int = 16, classes: int = 3):
        super().__init__()
        self.backbone = backbone
        self.fpn = torchvision.ops.FeaturePyramidNetwork(backbone.feature_info.channels(), channels)
        self.head = nn.Conv2d(channels, classes, 1)

    def forward(self, x):
        maps = self.fpn({str(i): f for i, f in enumerate(self.backbone(x))})
        return [self.head(m) for m in maps.values()]


def test_rednet26_under_a_feature_pyramid_trains_with_frozen_parts():
    torch.manual_seed(0)
    backbone = timm.create_model("rednet26", features_only=True, out_indices=(1, 2, 3, 4), width=0.25,
                                 frozen_stages=1, norm_eval=True, input_size=(64, 64))
    net = TinyFPNHead(backbone).train()
    rednet = backbone.model
    frozen = {k: v.clone() for k, v in rednet.state_dict().items() if k.startswith(("stem.", "layer1."))}
    stats = {k: v.clone() for k, v in rednet.named_buffers()}
    later = {k: v.clone() for k, v in rednet.state_dict().items() if k.startswith("layer3.")}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    for _ in range(2):
        loss = sum(nn.functional.cross_entropy(nn.functional.interpolate(out, size=64), target)
                   for out in net(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = rednet.state_dict()
    assert [o.shape[-1] for o in net(x)] == [16, 8, 4, 2]
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # stem and stage 1
    assert all(torch.equal(dict(rednet.named_buffers())[k], v) for k, v in stats.items())  # every BN statistic
    assert any(not torch.equal(state[k], v) for k, v in later.items())  # the rest trains
