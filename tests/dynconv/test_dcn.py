"""DCN (v2): zero-initialised offset/mask branch, offset layout, gradcheck."""
import pytest
import torch
import torch.nn.functional as F

from dynconv.ops.dcn import DCN
from tests.dynconv.op_checks import gradcheck_op


@pytest.mark.parametrize("groups,offset_groups,stride", [(1, 1, 1), (2, 2, 2)])
def test_zero_offsets_and_half_mask_is_half_a_plain_conv(groups, offset_groups, stride):
    torch.manual_seed(0)
    m = DCN(4, 6, 3, stride=stride, groups=groups, offset_groups=offset_groups)
    assert m.conv_offset.out_channels == 3 * 9 * offset_groups
    x = torch.randn(2, 4, 7, 6)
    expected = 0.5 * F.conv2d(x, m.weight, None, stride, 1, 1, groups) + m.bias[:, None, None]
    torch.testing.assert_close(m(x), expected)


def test_unit_x_offset_samples_the_right_neighbour():
    torch.manual_seed(0)
    m = DCN(3, 5, 3, bias=False)
    with torch.no_grad():
        m.conv_offset.bias[1:m.num_offsets:2] = 1.0  # (dy, dx) pairs per tap: dx = +1, mask logits stay 0
    x = torch.randn(2, 3, 6, 7)
    # every tap reads x_pad(p + tap + (0, 1)): shift the zero-padded input one column left
    shifted = F.pad(F.pad(x, (1, 1, 1, 1))[..., 1:], (0, 1))
    torch.testing.assert_close(m(x), 0.5 * F.conv2d(shifted, m.weight))


def test_gradcheck():
    torch.manual_seed(0)
    m = DCN(2, 2, 3, offset_groups=2)
    with torch.no_grad():  # off the integer grid, where bilinear sampling is differentiable
        m.conv_offset.weight.normal_(0, 0.3)
        m.conv_offset.bias.uniform_(0.1, 0.4)
    assert gradcheck_op(m, torch.randn(1, 2, 4, 4))


def test_low_precision_runs_in_fp32_and_keeps_its_dtype():
    torch.manual_seed(0)
    m = DCN(4, 6, 3)
    x = torch.randn(2, 4, 6, 6)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(m(x), ref, atol=0.05, rtol=0.05)
    low = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
