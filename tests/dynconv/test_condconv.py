"""CondConv: sigmoid routing over experts, mixed per sample, applied with sample_conv."""
import math

import pytest
import torch

from dynconv import use_backend
from dynconv.ops.condconv import CondConv
from tests.dynconv.op_checks import gradcheck_op, per_sample_conv

BACKENDS = ["fast", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_per_sample_loop(backend):
    torch.manual_seed(0)
    m = CondConv(4, 6, 3, stride=2, groups=2, bias=True, num_experts=3)
    x = torch.randn(3, 4, 7, 6)
    with use_backend(backend):
        out = m(x)
    r = torch.sigmoid(x.mean((2, 3)) @ m.routing.weight.T + m.routing.bias)
    kernels = [sum(r[b, e] * m.weight[e] for e in range(3)) for b in range(3)]
    biases = [sum(r[b, e] * m.bias[e] for e in range(3)) for b in range(3)]
    torch.testing.assert_close(out, per_sample_conv(x, kernels, biases, stride=2, padding=1, groups=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    torch.manual_seed(0)
    with use_backend(backend):
        assert gradcheck_op(CondConv(2, 2, 3, bias=True, num_experts=2), torch.randn(2, 2, 4, 4))


def test_defaults_and_expert_init():
    m = CondConv(8, 16, 3)
    assert m.num_experts == 8 and m.bias is None and m.padding == (1, 1)
    # kaiming_uniform(a=√5) per expert: U(±1/√fan_in), fan_in = 8·3·3
    bound = 1 / math.sqrt(8 * 9)
    assert m.weight.abs().max() <= bound
    assert all(m.weight[e].std() > 0.4 * bound for e in range(8))
    assert not torch.equal(m.weight[0], m.weight[1])
