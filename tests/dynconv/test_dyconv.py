"""DY-Conv: softmax(·/T) attention over K kernels; the temperature schedule shared with ODConv."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv import on_epoch_start, use_backend
from dynconv.ops.dyconv import DYConv, temperature_at
from dynconv.ops.odconv import ODConv
from tests.dynconv.op_checks import gradcheck_op, per_sample_conv

BACKENDS = ["fast", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_per_sample_loop(backend):
    torch.manual_seed(0)
    m = DYConv(4, 6, 3, stride=2, groups=2, num_experts=3, temperature=2.0)
    x = torch.randn(3, 4, 8, 7)
    with use_backend(backend):
        out = m(x)
    fc1, _, fc2 = m.attention
    logits = F.relu(x.mean((2, 3)) @ fc1.weight.T) @ fc2.weight.T + fc2.bias
    pi = torch.exp(logits / 2.0)
    pi = pi / pi.sum(1, keepdim=True)
    kernels = [sum(pi[b, k] * m.weight[k] for k in range(3)) for b in range(3)]
    biases = [sum(pi[b, k] * m.bias[k] for k in range(3)) for b in range(3)]
    torch.testing.assert_close(out, per_sample_conv(x, kernels, biases, stride=2, padding=1, groups=2))


def test_defaults():
    m = DYConv(16, 8, 3)
    assert m.num_experts == 4 and m.bias is not None and float(m.temperature) == 30.0
    assert m.attention[0].out_features == int(0.25 * 16) + 1 and m.attention[0].bias is None


def test_high_temperature_gives_the_mean_kernel():
    torch.manual_seed(0)
    m = DYConv(3, 5, 3, temperature=1e9)
    x = torch.randn(2, 3, 6, 6)
    expected = F.conv2d(x, m.weight.mean(0), m.bias.mean(0), padding=1)
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    torch.manual_seed(0)
    with use_backend(backend):
        assert gradcheck_op(DYConv(2, 3, 3, num_experts=2, temperature=3.0), torch.randn(2, 2, 4, 4))


def test_temperature_schedule_values():
    # T(e) = 1 + 29·max(0, 1 − e/10): 30 at the start, 1 from epoch 10 on, linear in between
    assert temperature_at(0) == 30.0
    assert temperature_at(5) == pytest.approx(15.5)
    assert temperature_at(2.5) == pytest.approx(30 - 29 * 0.25)
    assert temperature_at(10) == 1.0 and temperature_at(25) == 1.0
    assert temperature_at(2, start=10, end=2, epochs=4) == pytest.approx(6.0)


def test_on_epoch_start_anneals_every_tempered_module_and_persists():
    model = nn.Sequential(DYConv(4, 4, 3), nn.Sequential(ODConv(4, 4, 3, num_experts=2, temperature=10.0)))
    x = torch.randn(2, 4, 5, 5)
    before = model(x)
    on_epoch_start(model, 4)
    assert float(model[0].temperature) == pytest.approx(temperature_at(4))
    assert float(model[1][0].temperature) == pytest.approx(temperature_at(4, start=10.0))  # from its own start
    assert not torch.allclose(model(x), before)
    on_epoch_start(model, 12)
    reloaded = nn.Sequential(DYConv(4, 4, 3), nn.Sequential(ODConv(4, 4, 3, num_experts=2)))
    reloaded.load_state_dict(model.state_dict())
    assert float(reloaded[0].temperature) == float(reloaded[1][0].temperature) == 1.0
