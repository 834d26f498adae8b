"""conv / dwconv: nn.Conv2d drop-ins with 'same' padding by default."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.ops.conv import Conv, DWConv, conv_geometry


def test_same_padding_default():
    assert conv_geometry(5, 2, None, 2) == ((5, 5), (2, 2), (4, 4), (2, 2))
    assert conv_geometry((3, 1))[2] == (1, 0)
    assert conv_geometry(3, padding=0)[2] == (0, 0)


def test_conv_is_a_conv2d():
    m = Conv(4, 6, 3, stride=2, groups=2)
    assert isinstance(m, nn.Conv2d) and m.padding == (1, 1) and m.bias is not None
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, 2, 1, 1, 2))


def test_dwconv_depthwise_with_multiplier():
    m = DWConv(4, 8, 3, dilation=2)
    assert m.groups == 4 and m.weight.shape == (8, 1, 3, 3) and m.padding == (2, 2)
    x = torch.randn(2, 4, 6, 5)
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, 1, 2, 2, 4))


def test_dwconv_errors():
    with pytest.raises(ValueError, match="multiple of in_channels"):
        DWConv(4, 6, 3)
    with pytest.raises(ValueError, match="groups is always"):
        DWConv(4, 4, 3, groups=2)
