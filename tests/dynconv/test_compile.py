"""`torch.compile(fullgraph=True)` through every operator and the paper models: no graph break, and the
forward and the gradients equal eager.

Breadth runs on `backend="aot_eager"`: it traces forward and backward through the custom ops' fake
kernels exactly as inductor receives them, without inductor's C++ build. Inductor itself compiles one
operator per primitive and one paper model, on CPU and, where torch sees a GPU, on CUDA too (the Triton
kernels as `torch.library.triton_op`s; TF32 off so that eager and compiled round alike).
"""
import pytest
import timm
import torch
from torch._dynamo.utils import counters

import dynconv
import models  # noqa: F401  (registers the paper models with timm)
from models import export

# each paper model of models.export.PAPER_MODELS at a tiny width and input (TVConv takes its input size from the
# dry pass); MobileNetV2-DCD without dropout, which draws other numbers when compiled
IMG = 16
PAPER_MODELS = {spec.label: spec for spec in export.PAPER_MODELS}
FACE_WIDTH = {"face_mobilenetv2": 0.1, "face_shufflenetv2": 0.5}
INDUCTOR_OPS = ["involution", "condconv", "dk_local"]  # pixel_filter, sample_conv, the DK sampling op
INDUCTOR_MODEL = "RedNet-26"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the CUDA cases exist only on a GPU machine


@pytest.fixture
def device(request, monkeypatch):
    if request.param == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    return torch.device(request.param)


def _model(key: str) -> torch.nn.Module:
    spec = PAPER_MODELS[key]
    if spec.name.startswith("face_"):  # the x1_0 paper model at the smallest width of its family
        name = spec.name.removesuffix("_x1_0")
        kw = dict(width=FACE_WIDTH[name], embedding_dim=8)
    else:
        name, kw = spec.name, dict(num_classes=5, width=0.125, small_input=True)
        if name == "mobilenetv2_dcd":
            kw["dropout"] = 0.0
    torch.manual_seed(0)
    return timm.create_model(name, input_size=(IMG, IMG), **spec.kwargs, **kw)


def assert_compiled_equals_eager(module: torch.nn.Module, x: torch.Tensor, backend: str) -> None:
    """One fullgraph compile with no graph break; outputs and every gradient (input and parameters)
    equal eager to float32 round-off over the model's depth."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    results = []
    for fn in (module, compiled):
        xi = x.detach().clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        out = fn(xi)
        out.square().mean().backward()
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()}))
    assert not counters["graph_break"], dict(counters["graph_break"])
    (out_e, gx_e, gp_e), (out_c, gx_c, gp_c) = results
    # compiled graphs may reorder float32 sums: a few ulps per layer, relative to the tensor's scale
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_c, out_e, **tol)
    torch.testing.assert_close(gx_c, gx_e, **tol)
    for n, g in gp_e.items():
        if g is not None:
            torch.testing.assert_close(gp_c[n], g, **tol, msg=lambda m: f"{n}: {m}")


def _op(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    size = {"input_size": (7, 7)} if "input_size" in dynconv.op_options(name) else {}
    return dynconv.create_op(name, 16, 16, 3, **size).train()


@pytest.mark.parametrize("name", dynconv.list_ops())
def test_every_operator_compiles_fullgraph(name):
    assert_compiled_equals_eager(_op(name), torch.randn(2, 16, 7, 7), "aot_eager")


@pytest.mark.parametrize("key", list(PAPER_MODELS))
def test_paper_model_compiles_fullgraph(key):
    assert_compiled_equals_eager(_model(key).train(), torch.randn(2, 3, IMG, IMG), "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("name", INDUCTOR_OPS)
def test_inductor_operator(name, device):
    assert_compiled_equals_eager(_op(name).to(device), torch.randn(2, 16, 7, 7, device=device), "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_inductor_paper_model(device):
    model = _model(INDUCTOR_MODEL).train().to(device)
    assert_compiled_equals_eager(model, torch.randn(2, 3, IMG, IMG, device=device), "inductor")
