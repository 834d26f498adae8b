"""ODConv: four attentions (channel on the input, filter on the output, spatial, kernel), with the
official skips; the folded-kernel operator equals the official order of operations per sample."""
import pytest
import torch
import torch.nn.functional as F

from dynconv import use_backend
from dynconv.ops.odconv import ODConv
from tests.dynconv.op_checks import gradcheck_op

BACKENDS = ["fast", "reference"]
# (in, out, k, groups, num_experts, stride): general, depthwise (no filter att.), 1×1 with n=1 (no spatial/kernel att.)
CASES = [(4, 6, 3, 2, 3, 2), (4, 4, 3, 4, 2, 1), (4, 6, 1, 1, 1, 1)]


def _official_order(m, x):
    """α_f ⊙ conv(α_c ⊙ x, Σ_i α_k,i·α_s ⊙ W_i), attention by attention, one sample at a time."""
    att, t = m.attention, float(m.temperature)
    z = F.relu(att.bn(att.fc(F.adaptive_avg_pool2d(x, 1))))
    a_c = torch.sigmoid(att.channel_fc(z) / t)
    a_f = torch.sigmoid(att.filter_fc(z) / t) if att.filter_fc is not None else 1.0
    n, kh, kw = m.num_experts, *m.kernel_size
    a_s = (torch.sigmoid(att.spatial_fc(z) / t).view(-1, 1, 1, kh, kw) if att.spatial_fc is not None
           else torch.ones(len(x), 1, 1, 1, 1))
    a_k = torch.softmax(att.kernel_fc(z).flatten(1) / t, 1) if att.kernel_fc is not None else torch.ones(len(x), 1)
    outs = []
    for b in range(len(x)):
        w = sum(a_k[b, i] * a_s[b] * m.weight[i] for i in range(n))
        y = F.conv2d(x[b:b + 1] * a_c[b:b + 1], w, None, m.stride, m.padding, m.dilation, m.groups)
        outs.append(y * (a_f[b:b + 1] if torch.is_tensor(a_f) else a_f))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cin,cout,k,groups,n,stride", CASES)
def test_equals_official_order_of_operations(backend, cin, cout, k, groups, n, stride):
    torch.manual_seed(0)
    m = ODConv(cin, cout, k, stride=stride, groups=groups, num_experts=n, temperature=3.0)
    x = torch.randn(3, cin, 7, 6)
    with use_backend(backend):
        out = m(x)
    torch.testing.assert_close(out, _official_order(m, x))


def test_skipped_heads_and_hidden_width():
    dw = ODConv(8, 8, 3, groups=8, num_experts=4)
    assert dw.attention.filter_fc is None and dw.attention.kernel_fc is not None
    pw = ODConv(8, 16, 1)
    assert pw.attention.spatial_fc is None and pw.attention.kernel_fc is None and pw.attention.filter_fc is not None
    # hidden = max(int(C_in · 1/16), 16)
    assert ODConv(64, 64, 3).attention.fc.out_channels == 16
    assert ODConv(512, 64, 3).attention.fc.out_channels == 32
    assert ODConv(64, 64, 3, reduction=0.5, min_hidden=4).attention.fc.out_channels == 32


def test_defaults():
    m = ODConv(16, 32, 3)
    assert m.num_experts == 1 and m.bias is None and float(m.temperature) == 30.0
    assert m.weight.shape == (1, 32, 16, 3, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    torch.manual_seed(0)
    m = ODConv(2, 3, 3, num_experts=2, min_hidden=2, temperature=2.0)
    with use_backend(backend):
        assert gradcheck_op(m, torch.randn(3, 2, 4, 4))
