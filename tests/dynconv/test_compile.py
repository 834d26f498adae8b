"""`torch.compile(fullgraph=True)` through the paper models: no graph break, and three training steps (loss at
every step, final weights and BatchNorm statistics) equal eager.

Breadth runs on `backend="aot_eager"`: it traces forward and backward through the custom ops' fake
kernels exactly as inductor receives them, without inductor's C++ build. Inductor itself compiles one
operator per primitive and one paper model, on CPU and, where torch sees a GPU, on CUDA too (the Triton
kernels as `torch.library.triton_op`s; TF32 off so that eager and compiled round alike). Every operator under
inductor, on CPU, is in the conformance suite (tests/dynconv/test_conformance.py).
"""
import copy

import pytest
import timm
import torch
from torch._dynamo.utils import counters

import dynconv
import models  # noqa: F401  (registers the paper models with timm)
from models import export

from .conformance import sgd_steps

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


def assert_trains_as_eager(model: torch.nn.Module, x: torch.Tensor, backend: str, steps: int = 3) -> None:
    """`steps` SGD steps (momentum, from one seed) of the compiled model and of an eager copy: the loss at every step,
    the final weights and the BatchNorm statistics agree to float32 round-off over the depth and the steps."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = model, copy.deepcopy(model)
    runs = []
    for net, fn in ((eager, eager), (compiled, torch.compile(compiled, backend=backend, fullgraph=True))):
        torch.manual_seed(1)
        runs.append(sgd_steps(net, fn, x, steps))
    assert not counters["graph_break"], dict(counters["graph_break"])
    (loss_e, state_e), (loss_c, state_c) = runs
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_c, loss_e, **tol)
    for key, value in state_e.items():
        torch.testing.assert_close(state_c[key], value, **tol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("key", list(PAPER_MODELS))
def test_paper_model_trains_compiled_as_eager(key):
    """Every paper model, 3 training steps: through AOTAutograd's graphs of the custom ops (`aot_eager`); inductor's
    code for the paper models runs in `test_inductor_paper_model`, and per operator in the conformance suite."""
    assert_trains_as_eager(_model(key).train(), torch.randn(2, 3, IMG, IMG), "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("name", INDUCTOR_OPS)
def test_inductor_operator(name, device):
    assert_compiled_equals_eager(_op(name).to(device), torch.randn(2, 16, 7, 7, device=device), "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_inductor_paper_model(device):
    model = _model(INDUCTOR_MODEL).train().to(device)
    assert_trains_as_eager(model, torch.randn(2, 3, IMG, IMG, device=device), "inductor")
