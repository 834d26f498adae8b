"""Involution: the paper's equation as loops, gradients, odd sizes, official key layout."""
import pytest
import torch

import dynconv
from dynconv.ops.involution import Involution
from tests.dynconv.op_checks import gradcheck_op


def _op(stride=1, C=8, K=3, group_channels=4):
    torch.manual_seed(0)
    op = Involution(C, C, K, stride, group_channels=group_channels, reduction_ratio=2).eval()
    bn = op.conv1.bn
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    return op


@pytest.mark.parametrize("stride,size", [(1, (6, 5)), (2, (6, 8)), (2, (7, 5))])
def test_matches_paper_equation(naive_aggregate, backend, stride, size):
    """Eq. 4 with Eq. 6's generator; the pooled input averages each s×s window (clipped at the
    border: the official AvgPool(s, s) whenever s divides the size)."""
    op = _op(stride)
    x = torch.randn(2, 8, *size)
    K, s, gc = 3, stride, 4
    ho, wo = -(-size[0] // s), -(-size[1] // s)
    pooled = torch.stack([torch.stack([x[:, :, i * s:(i + 1) * s, j * s:(j + 1) * s].mean((2, 3))
                                       for j in range(wo)], -1) for i in range(ho)], -2)
    with torch.no_grad():
        kernels = op.conv2.conv(torch.relu(op.conv1.bn(op.conv1.conv(pooled)))).tolist()
        out = op(x)
    expected = naive_aggregate(x, lambda b, c, kh, kw, i, j: kernels[b][(c // gc) * K * K + kh * K + kw][i][j],
                               K, s, 1, (ho, wo))
    assert out.shape == (2, 8, ho, wo)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_gradcheck(backend):
    assert gradcheck_op(_op(stride=2, C=4, group_channels=2), torch.randn(2, 4, 3, 4))


@pytest.mark.parametrize("stride,size,expected", [(1, (7, 9), (7, 9)), (2, (7, 9), (4, 5)), (2, (8, 6), (4, 3))])
def test_output_size_follows_conv_formula(stride, size, expected):
    op = _op(stride, K=7)
    assert op(torch.randn(1, 8, *size)).shape[-2:] == expected


def test_non_default_padding_and_dilation(backend):
    """padding 0 ('valid') and dilation 2: output by the conv formula, generator at the tap centres."""
    torch.manual_seed(1)
    x = torch.randn(1, 8, 9, 8)
    assert Involution(8, 8, 3, 2, padding=0, group_channels=4)(x).shape[-2:] == (4, 3)
    assert Involution(8, 8, 3, 1, dilation=2, group_channels=4)(x).shape[-2:] == (9, 8)


def test_registry_and_channel_errors():
    op = dynconv.create_op("involution", 32, 32, 7, stride=2)
    assert isinstance(op, Involution) and op.kernel_groups == 2
    with pytest.raises(ValueError, match="1x1 projection"):
        dynconv.create_op("involution", 32, 64, 7)
    with pytest.raises(ValueError, match="group_channels"):
        dynconv.create_op("involution", 24, 24, 7)


def test_official_key_layout():
    """RedNet keys `conv2.conv1.conv.weight`, `conv2.conv1.bn.*`, `conv2.conv2.conv.{weight,bias}` (layer1:
    mid 64 → 16 reduced channels, 4 groups · 7² = 196 kernel maps)."""
    shapes = {k: tuple(v.shape) for k, v in Involution(64, 64, 7).state_dict().items()}
    assert shapes == {
        "conv1.conv.weight": (16, 64, 1, 1), "conv1.bn.weight": (16,), "conv1.bn.bias": (16,),
        "conv1.bn.running_mean": (16,), "conv1.bn.running_var": (16,), "conv1.bn.num_batches_tracked": (),
        "conv2.conv.weight": (196, 16, 1, 1), "conv2.conv.bias": (196,),
    }
