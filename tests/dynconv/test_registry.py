"""Generic contract of every registered operator: built by name, Conv2d geometry, gradients, errors."""
import pytest
import torch

import dynconv

OPS = dynconv.list_ops()
H = W = 8


def _build(name, in_ch=16, out_ch=16, stride=1):
    """in == out suits the channel-preserving operators; fixed-resolution ones get the input size."""
    kw = {"input_size": (H, W)} if "input_size" in dynconv.op_options(name) else {}
    return dynconv.create_op(name, in_ch, out_ch, 3, stride=stride, **kw)


def test_the_registry_lists_the_operators_of_this_library():
    assert {"conv", "dwconv", "condconv", "dyconv", "odconv", "dcd", "dcd_mbv2", "dcn"} <= set(OPS)
    assert OPS == sorted(OPS)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", OPS)
def test_forward_shape(name, stride):
    torch.manual_seed(0)
    op = _build(name, stride=stride)
    out = op(torch.randn(2, 16, H, W))
    assert out.shape == (2, 16, H // stride, W // stride)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", OPS)
def test_channel_change_works_or_says_why(name):
    try:
        op = _build(name, 16, 32)
    except ValueError as e:
        assert "channels" in str(e)
        return
    assert op(torch.randn(2, 16, H, W)).shape == (2, 32, H, W)


@pytest.mark.parametrize("name", OPS)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    op = _build(name, stride=2)
    x = torch.randn(2, 16, H, W, requires_grad=True)
    out = op(x)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in op.named_parameters():
        assert p.grad is not None, f"{name}: parameter {pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: parameter {pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: parameter {pname} has an all-zero gradient"


def test_unknown_operator_lists_the_known_ones():
    with pytest.raises(KeyError) as err:
        dynconv.create_op("no_such_op", 8, 8, 3)
    assert "no_such_op" in str(err.value) and all(n in str(err.value) for n in OPS)


@pytest.mark.parametrize("name", OPS)
def test_unknown_option_is_named(name):
    with pytest.raises(TypeError, match="num_expertz"):
        dynconv.create_op(name, 16, 16, 3, num_expertz=4)
