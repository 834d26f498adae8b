"""sample_conv: fast == reference == a per-sample F.conv2d loop; gradcheck; dtypes; layouts."""
import itertools

import pytest
import torch

from dynconv.functional.sample_conv import sample_conv
from tests.dynconv.op_checks import per_sample_conv, rounding_tolerance

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GEOMS = list(itertools.product((1, 2), (1, 2), ((7, 6), (8, 9)), (1, 3, 5), ("g1", "g2", "dw"), (False, True)))


def _inputs(b, c_in, c_out, groups, k, h, w, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c_in, h, w, generator=g, dtype=dtype)
    wt = torch.randn(b, c_out, c_in // groups, k, k, generator=g, dtype=dtype)
    bs = torch.randn(b, c_out, generator=g, dtype=dtype) if bias else None
    return x, wt, bs


def _groups(kind, c):
    return {"g1": 1, "g2": 2, "dw": c}[kind]


@pytest.mark.parametrize("stride,dilation,hw,k,gkind,bias", GEOMS)
def test_fast_equals_reference(stride, dilation, hw, k, gkind, bias):
    c_in = 4
    groups = _groups(gkind, c_in)
    c_out = 8 if gkind == "dw" else 6
    x, w, b = _inputs(3, c_in, c_out, groups, k, *hw, bias)
    kw = dict(stride=stride, padding=dilation * (k - 1) // 2, dilation=dilation, groups=groups)
    fast = sample_conv(x, w, b, backend="fast", **kw)
    ref = sample_conv(x, w, b, backend="reference", **kw)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, per_sample_conv(x, w, b, **kw), atol=1e-5, rtol=1e-5)


def test_asymmetric_geometry():
    x, w, b = _inputs(2, 4, 4, 2, 3, 9, 7, True)
    w = torch.randn(2, 4, 2, 3, 1)
    kw = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    torch.testing.assert_close(sample_conv(x, w, b, backend="fast", **kw), per_sample_conv(x, w, b, **kw))
    torch.testing.assert_close(sample_conv(x, w, b, backend="reference", **kw), per_sample_conv(x, w, b, **kw))


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("groups,stride", [(1, 1), (2, 2)])
def test_gradcheck(backend, groups, stride):
    x, w, b = _inputs(2, 2, 2, groups, 3, 4, 5, True, dtype=torch.float64)
    for t in (x, w, b):
        t.requires_grad_(True)
    fn = lambda x, w, b: sample_conv(x, w, b, stride=stride, padding=1, groups=groups, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(backend, dtype):
    x, w, b = _inputs(2, 8, 8, 1, 3, 6, 6, True)
    ref = sample_conv(x, w, b, padding=1, backend=backend)
    low = sample_conv(x.to(dtype), w.to(dtype), b.to(dtype), padding=1, backend=backend)
    assert low.dtype == dtype
    # x·w: two rounded inputs and a rounded product; 8·3·3 products and the bias per output
    tol = rounding_tolerance(dtype, sample_conv(x.abs(), w.abs(), b.abs(), padding=1), ref, roundings=3, n=73)
    assert ((low.float() - ref).abs() <= tol).all()


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_channels_last(backend):
    x, w, b = _inputs(2, 4, 6, 1, 3, 6, 5, True)
    out = sample_conv(x.contiguous(memory_format=torch.channels_last), w, b, padding=1, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, per_sample_conv(x, w, b, padding=1))


def test_shape_errors_name_the_problem():
    x, w, _ = _inputs(2, 4, 6, 1, 3, 6, 6, False)
    with pytest.raises(ValueError, match="one kernel per sample"):
        sample_conv(x, w[0], padding=1)
    with pytest.raises(ValueError, match="kernels for a batch"):
        sample_conv(x, w[:1], padding=1)
    with pytest.raises(ValueError, match="groups=2"):
        sample_conv(x, w, groups=2)
    with pytest.raises(ValueError, match="bias"):
        sample_conv(x, w, torch.zeros(6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_devices_and_dtypes_agree_with_the_loop(device, dtype):
    x, w, b = _inputs(3, 4, 6, 2, 3, 7, 8, True)
    expected = per_sample_conv(x, w, b, stride=2, padding=1, groups=2)
    magnitude = per_sample_conv(x.abs(), w.abs(), b.abs(), stride=2, padding=1, groups=2)
    tol = rounding_tolerance(dtype, magnitude, expected, roundings=3, n=2 * 3 * 3 + 1)  # (4/2)·3·3 products + bias
    for backend in ("fast", "reference"):
        out = sample_conv(x.to(device, dtype).contiguous(memory_format=torch.channels_last), w.to(device, dtype),
                          b.to(device, dtype), stride=2, padding=1, groups=2, backend=backend)
        assert out.dtype == dtype and out.device.type == device
        assert ((out.float().cpu() - expected).abs() <= tol).all()
