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


def _sigmoid_filter(values, scale):
    return [1 / (1 + math.exp(-v)) for v in values]


def _raw_filter(values, scale):
    return list(values)


FILTER_NORMS = {"fn": _normalised, "sigmoid": _sigmoid_filter, "none": _raw_filter}
# every branches × filter_norm pair; kernel_combine only matters when both branches are present
CASES = [(b, n, c) for b in ("both", "spatial", "channel") for n in FILTER_NORMS
         for c in (("mul", "add") if b == "both" else ("mul",))]


@pytest.mark.parametrize("branches,filter_norm,combine", CASES)
@pytest.mark.parametrize("stride,size", [(1, (5, 6)), (2, (7, 6))])
def test_matches_paper_equation(naive_aggregate, backend, branches, filter_norm, combine, stride, size):
    """Eq. 5 and 6 with Python loops; a missing branch contributes nothing (its filter is left out)."""
    torch.manual_seed(0)
    C, k, head = 6, 3, 2
    op = DDF(C, C, k, stride, kernel_combine=combine, head=head, se_ratio=0.5, branches=branches,
             filter_norm=filter_norm)
    x = torch.randn(2, C, *size)
    ho, wo = -(-size[0] // stride), -(-size[1] // stride)
    norm, gain = FILTER_NORMS[filter_norm], math.sqrt(2) / k
    spatial = channel = None
    with torch.no_grad():
        out = op(x)
        if branches != "channel":
            raw_s = op.spatial_branch[0](x).tolist()  # strided 1×1 conv: (B, head·k², ho, wo)
            spatial = {(b, g, i, j): norm([raw_s[b][g * k * k + t][i][j] for t in range(k * k)], [gain] * k * k)
                       for b in range(2) for g in range(head) for i in range(ho) for j in range(wo)}
        if branches != "spatial":
            raw_c = op.channel_branch[3](F.relu(op.channel_branch[1](x.mean((2, 3), keepdim=True)))).flatten(1)
            raw_c = raw_c.tolist()
            scale_c = op.channel_branch[4].std.tolist() if filter_norm == "fn" else [None] * C * k * k
            channel = {(b, c): norm(raw_c[b][c * k * k:(c + 1) * k * k], scale_c[c * k * k:(c + 1) * k * k])
                       for b in range(2) for c in range(C)}

    def filt(b, c, kh, kw, i, j):
        t = kh * k + kw
        if channel is None:
            return spatial[b, c // (C // head), i, j][t]
        if spatial is None:
            return channel[b, c][t]
        sv, cv = spatial[b, c // (C // head), i, j][t], channel[b, c][t]
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


@pytest.mark.parametrize("branches,filter_norm,combine", [
    ("both", "fn", "mul"), ("both", "fn", "add"), ("spatial", "fn", "mul"), ("channel", "fn", "mul"),
    ("both", "sigmoid", "mul"), ("both", "none", "add")])
def test_gradcheck(backend, branches, filter_norm, combine):
    torch.manual_seed(3)
    op = DDF(4, 4, 3, 2, kernel_combine=combine, head=2, se_ratio=0.5, branches=branches, filter_norm=filter_norm)
    assert gradcheck_op(op, torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("branches", ["both", "spatial", "channel"])
@pytest.mark.parametrize("stride,size,expected", [(1, (7, 9), (7, 9)), (2, (7, 9), (4, 5)), (2, (8, 6), (4, 3))])
def test_output_size_follows_conv_formula(branches, stride, size, expected):
    op = DDF(8, 8, 3, stride, branches=branches)
    assert op(torch.randn(1, 8, *size)).shape == (1, 8, *expected)


@pytest.mark.parametrize("branches", ["both", "spatial", "channel"])
def test_dilation_and_padding(backend, branches):
    torch.manual_seed(4)
    x = torch.randn(1, 8, 9, 8)
    assert DDF(8, 8, 3, 1, dilation=2, branches=branches)(x).shape[-2:] == (9, 8)
    assert DDF(8, 8, 5, 2, padding=1, branches=branches)(x).shape[-2:] == (4, 3)


def test_registry_and_errors():
    op = dynconv.create_op("ddf", 16, 16, 3, stride=2, kernel_combine="add", branches="spatial", filter_norm="none")
    assert isinstance(op, DDF) and (op.kernel_combine, op.branches, op.filter_norm) == ("add", "spatial", "none")
    with pytest.raises(ValueError, match="1x1 projection"):
        dynconv.create_op("ddf", 16, 32, 3)
    with pytest.raises(ValueError, match="kernel_combine"):
        dynconv.create_op("ddf", 16, 16, 3, kernel_combine="max")
    with pytest.raises(ValueError, match=r"branches must be one of \('both', 'spatial', 'channel'\), got 'depth'"):
        dynconv.create_op("ddf", 16, 16, 3, branches="depth")
    with pytest.raises(ValueError, match=r"filter_norm must be one of \('fn', 'sigmoid', 'none'\), got 'bn'"):
        dynconv.create_op("ddf", 16, 16, 3, filter_norm="bn")


@pytest.mark.parametrize("filter_norm", ["fn", "sigmoid", "none"])
def test_ablation_keys_and_param_counts(filter_norm):
    """A left-out branch has no modules; only FilterNorm owns parameters (`channel_branch.4.std`)."""
    C, k, mid = 64, 3, 12
    spatial = {"spatial_branch.0.weight": (k * k, C, 1, 1), "spatial_branch.0.bias": (k * k,)}
    channel = {"channel_branch.1.weight": (mid, C, 1, 1), "channel_branch.1.bias": (mid,),
               "channel_branch.3.weight": (C * k * k, mid, 1, 1), "channel_branch.3.bias": (C * k * k,)}
    if filter_norm == "fn":
        channel["channel_branch.4.std"] = (C * k * k,)
    for branches, expected in (("both", {**spatial, **channel}), ("spatial", spatial), ("channel", channel)):
        op = DDF(C, C, k, branches=branches, filter_norm=filter_norm)
        assert {n: tuple(v.shape) for n, v in op.state_dict().items()} == expected
        assert sum(p.numel() for p in op.parameters()) == sum(math.prod(s) for s in expected.values())


def test_default_keys_equal_the_explicit_defaults():
    """The ablation options' defaults are today's layer: same keys in the same order, same count."""
    default, explicit = DDF(64, 64, 3), DDF(64, 64, 3, branches="both", filter_norm="fn")
    assert list(default.state_dict()) == list(explicit.state_dict()) == [
        "spatial_branch.0.weight", "spatial_branch.0.bias", "channel_branch.1.weight", "channel_branch.1.bias",
        "channel_branch.3.weight", "channel_branch.3.bias", "channel_branch.4.std"]


def test_official_key_layout():
    """DDF-ResNet-50 layer1 `conv2.*`: 64 channels, k = 3, se_ratio 0.2 → 12 hidden channels."""
    shapes = {k: tuple(v.shape) for k, v in DDF(64, 64, 3).state_dict().items()}
    assert shapes == {
        "spatial_branch.0.weight": (9, 64, 1, 1), "spatial_branch.0.bias": (9,),
        "channel_branch.1.weight": (12, 64, 1, 1), "channel_branch.1.bias": (12,),
        "channel_branch.3.weight": (576, 12, 1, 1), "channel_branch.3.bias": (576,),
        "channel_branch.4.std": (576,),
    }
