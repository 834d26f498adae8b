"""Margin heads: logits against their formulas, exact autograd through the margin, configs."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from models.face_heads import ArcFace, CosFace, build_head

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "margin"


def _cos(emb, weight):
    """cos(theta) from the definition: <e, w> / (|e| |w|)."""
    return (emb @ weight.T) / (emb.norm(dim=1, keepdim=True) * weight.norm(dim=1)[None])


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 8, generator=g, dtype=torch.float64), torch.tensor([0, 3, 4, 4, 1, 2])


@pytest.mark.parametrize("head_cls, target", [
    (CosFace, lambda c, m: c - m),                           # AM-Softmax: cos(theta) - m
    (ArcFace, lambda c, m: torch.cos(torch.acos(c) + m)),    # ArcFace: cos(theta + m)
])
def test_logits_match_formula(batch, head_cls, target):
    emb, labels = batch
    head = head_cls(8, 5).double()
    cos = _cos(emb, head.weight.detach())
    expected = head.s * cos
    rows = torch.arange(len(labels))
    expected[rows, labels] = head.s * target(cos[rows, labels], head.m)
    logits = head(emb, labels)
    assert torch.allclose(logits, expected, atol=1e-10)
    assert torch.allclose(head(emb), head.s * cos, atol=1e-10)  # no labels: no margin anywhere


def test_default_margins_and_scales():
    assert (CosFace(4, 3).s, CosFace(4, 3).m) == (32.0, 0.35)  # TVConv
    assert (ArcFace(4, 3).s, ArcFace(4, 3).m) == (64.0, 0.5)   # insightface


@pytest.mark.parametrize("head_cls", [CosFace, ArcFace])
def test_gradcheck_float64(batch, head_cls):
    emb, labels = batch
    head = head_cls(8, 5, s=4.0).double()

    def logits(e, w):
        return torch.func.functional_call(head, {"weight": w}, (e, labels))

    inputs = (emb.clone().requires_grad_(), head.weight.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(logits, inputs)
    assert torch.autograd.gradcheck(lambda e, w: F.cross_entropy(logits(e, w), labels), inputs)


def test_arcface_gradient_runs_through_the_margin():
    """d cos(theta + m) / d cos(theta) = cos m + sin m cos(theta) / sin(theta), not the straight-through 1."""
    head = ArcFace(2, 1)
    c = torch.tensor([-0.7, 0.1, 0.6, 0.95], dtype=torch.float64, requires_grad=True)
    head.margin(c).sum().backward()
    m = head.m
    assert torch.allclose(c.grad, math.cos(m) + math.sin(m) * c.detach() / torch.sqrt(1 - c.detach() ** 2))
    assert not torch.allclose(c.grad, torch.ones_like(c.grad))  # insightface's in-place margin gives 1
    edge = torch.tensor([1.0], requires_grad=True)
    head.margin(edge).sum().backward()
    assert torch.isfinite(edge.grad).all()


def test_init_and_factory():
    torch.manual_seed(0)
    uniform = build_head("cosface", 16, 100)
    assert torch.allclose(uniform.weight.norm(dim=1), torch.ones(100))
    normal = build_head("arcface", 64, 200, init="normal")
    assert abs(normal.weight.std().item() - 0.01) < 1e-3 and isinstance(normal, ArcFace)
    assert build_head("cosface", 8, 3, s=10, m=0.2).s == 10.0
    with pytest.raises(ValueError, match="choose one of"):
        build_head("sphereface", 8, 3)
    with pytest.raises(ValueError, match="init="):
        CosFace(8, 3, init="xavier")


def test_logits_stay_float32_under_autocast():
    head = CosFace(8, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(torch.randn(3, 8).bfloat16(), torch.tensor([0, 1, 2]))
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("name, cls", [("cosface", CosFace), ("arcface", ArcFace)])
def test_head_configs_build(name, cls):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    head = build_head(**cfg, embedding_size=512, num_classes=10)
    assert isinstance(head, cls) and head.s == cfg["s"] and head.m == cfg["m"]
