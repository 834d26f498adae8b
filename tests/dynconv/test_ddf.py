"""DDF: the paper's decoupled filter as loops, FilterNorm's unbiased std, gradients, key layout."""
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

import dynconv
from dynconv.ops.ddf import DDF, FilterNorm
from tests.dynconv.op_checks import gradcheck_op


def _normalised(values, scale):
    """Filter normalisation (Eq. 6) of one k²-tap filter with Python's unbiased statistics.stdev."""
    mean, std = statistics.mean(values), statistics.stdev(values)
    return [(v - mean) / (std + 1e-10) * sc for v, sc in zip(values, scale)]


@pytest.mark.parametrize("combine", ["mul", "add"])
@pytest.mark.parametrize("stride,size", [(1, (5, 6)), (2, (7, 6))])
def test_matches_paper_equation(naive_aggregate, backend, combine, stride, size):
    torch.manual_seed(0)
    C, k, head = 6, 3, 2
    op = DDF(C, C, k, stride, kernel_combine=combine, head=head, se_ratio=0.5)
    x = torch.randn(2, C, *size)
    ho, wo = -(-size[0] // stride), -(-size[1] // stride)
    with torch.no_grad():
        raw_s = op.spatial_branch[0](x).tolist()  # strided 1×1 conv: (B, head·k², ho, wo)
        raw_c = op.channel_branch[3](F.relu(op.channel_branch[1](x.mean((2, 3), keepdim=True)))).flatten(1).tolist()
        out = op(x)
    gain = math.sqrt(2) / k
    scale_c = op.channel_branch[4].std.tolist()
    spatial = {(b, g, i, j): _normalised([raw_s[b][g * k * k + t][i][j] for t in range(k * k)], [gain] * k * k)
               for b in range(2) for g in range(head) for i in range(ho) for j in range(wo)}
    channel = {(b, c): _normalised(raw_c[b][c * k * k:(c + 1) * k * k], scale_c[c * k * k:(c + 1) * k * k])
               for b in range(2) for c in range(C)}

    def filt(b, c, kh, kw, i, j):
        sv, cv = spatial[b, c // (C // head), i, j][kh * k + kw], channel[b, c][kh * k + kw]
        return cv * sv if combine == "mul" else cv + sv

    expected = naive_aggregate(x, filt, k, stride, 1, (ho, wo))
    assert out.shape == (2, C, ho, wo)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_filter_norm_uses_unbiased_std():
    torch.manual_seed(1)
    f = torch.randn(2, 2 * 9, 3, 4)
    v = f.view(2, 2, 9, 3, 4)
    centred = v - v.mean(2, keepdim=True)
    official = centred / (torch.std(v, 2, unbiased=True, keepdim=True) + 1e-10) * math.sqrt(2) / 3
    biased = centred / (torch.std(v, 2, unbiased=False, keepdim=True) + 1e-10) * math.sqrt(2) / 3
    out = FilterNorm(2, 3, "spatial")(f)
    torch.testing.assert_close(out, official)
    assert (out - biased).abs().max() > 1e-2


def test_channel_filter_norm_scale_is_learnable():
    torch.manual_seed(2)
    fn = FilterNorm(4, 3, "channel")
    assert fn.std.shape == (36,) and fn.std.requires_grad
    assert abs(fn.std.std().item() - math.sqrt(2) / 3) < 0.2  # init randn·√2/k
    assert FilterNorm(4, 3, "spatial").std is None


@pytest.mark.parametrize("combine", ["mul", "add"])
def test_gradcheck(backend, combine):
    torch.manual_seed(3)
    op = DDF(4, 4, 3, 2, kernel_combine=combine, head=2, se_ratio=0.5)
    assert gradcheck_op(op, torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("stride,size,expected", [(1, (7, 9), (7, 9)), (2, (7, 9), (4, 5)), (2, (8, 6), (4, 3))])
def test_output_size_follows_conv_formula(stride, size, expected):
    op = DDF(8, 8, 3, stride)
    assert op(torch.randn(1, 8, *size)).shape == (1, 8, *expected)


def test_dilation_and_padding(backend):
    torch.manual_seed(4)
    x = torch.randn(1, 8, 9, 8)
    assert DDF(8, 8, 3, 1, dilation=2)(x).shape[-2:] == (9, 8)
    assert DDF(8, 8, 5, 2, padding=1)(x).shape[-2:] == (4, 3)


def test_registry_and_errors():
    op = dynconv.create_op("ddf", 16, 16, 3, stride=2, kernel_combine="add")
    assert isinstance(op, DDF) and op.kernel_combine == "add"
    with pytest.raises(ValueError, match="1x1 projection"):
        dynconv.create_op("ddf", 16, 32, 3)
    with pytest.raises(ValueError, match="kernel_combine"):
        dynconv.create_op("ddf", 16, 16, 3, kernel_combine="max")


def test_official_key_layout():
    """DDF-ResNet-50 layer1 `conv2.*`: 64 channels, k = 3, se_ratio 0.2 → 12 hidden channels."""
    shapes = {k: tuple(v.shape) for k, v in DDF(64, 64, 3).state_dict().items()}
    assert shapes == {
        "spatial_branch.0.weight": (9, 64, 1, 1), "spatial_branch.0.bias": (9,),
        "channel_branch.1.weight": (12, 64, 1, 1), "channel_branch.1.bias": (12,),
        "channel_branch.3.weight": (576, 12, 1, 1), "channel_branch.3.bias": (576,),
        "channel_branch.4.std": (576,),
    }
