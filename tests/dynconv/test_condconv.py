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


@pytest.mark.parametrize("batch,channels_last", [(4, False), (2, False), (2, True)])
def test_compiled_mixing_order_equals_eager(batch, channels_last):
    """Under torch.compile the experts are mixed straight into channels_last kernels where that reads no
    more (B >= E, or channels_last experts): the per-sample kernels, the output and every gradient equal
    eager's (a mixing in the wrong index order would scramble the taps)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    m = CondConv(4, 6, 3, groups=2, bias=True, num_experts=3).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = m.to(memory_format=fmt)
    x = torch.randn(batch, 4, 7, 6, dtype=torch.float64).contiguous(memory_format=fmt)
    coeff = torch.rand(batch, 3, dtype=torch.float64)
    torch._dynamo.reset()
    counters.clear()
    mixed = torch.compile(m.mix, backend="aot_eager", fullgraph=True)(coeff)
    eager_mixed = m.mix(coeff)
    for got, want in zip(mixed, eager_mixed):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if batch >= 3 or channels_last:
        assert mixed[0].permute(0, 1, 3, 4, 2).is_contiguous()  # the channels_last order, no transpose
    results = []
    for fn in (m, torch.compile(m, backend="aot_eager", fullgraph=True)):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        results.append((out, *torch.autograd.grad(out.square().sum(), [xi, *m.parameters()])))
    assert not counters["graph_break"]
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
