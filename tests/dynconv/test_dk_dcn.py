"""DK + DCN: the defining sum as loops, its relation to dk_local at init, gradients, geometry, contract."""
import math

import pytest
import torch

import dynconv
from dynconv.ops.deformable_kernel import DeformKernelLocal, deform_kernel_local
from dynconv.ops.dk_dcn import DeformKernelDCN, deform_kernel_dcn
from tests.dynconv.op_checks import assert_channels_last_matches, gradcheck_op
from tests.dynconv.test_deformable_kernel import _planar_bilinear


def _op(C=4, G=2, stride=1, dilation=1, scope=4, dtype=torch.float32, seed=0):
    """dk_dcn with learnt-looking kernel and data offsets and masks away from ½."""
    torch.manual_seed(seed)
    op = DeformKernelDCN(C, C, 3, stride, dilation=dilation, scope_size=scope, offset_groups=G).to(dtype)
    with torch.no_grad():
        for conv in (op.rotation_conv, op.conv_offset):
            conv.weight.normal_(0, 0.25)
            conv.bias.normal_(0, 0.7)
    return op


@pytest.mark.parametrize("stride,dilation,size,scope", [(1, 1, (5, 4), 4), (2, 1, (6, 5), (5, 4)), (1, 2, (5, 6), 4)])
def test_matches_the_defining_sum(stride, dilation, size, scope):
    """out[b,c,i,j] = Σ_k W̃_k · x_c(i·s − p + fh·d + Δy, j·s − p + fw·d + Δx) · sigmoid(logit_k),
    W̃_k = planar_bilinear(W_c, fh + Δh + (S_h−k)/2, fw + Δw + (S_w−k)/2); every offset of group c mod G.
    The input is sampled by the same rule as the scope (DCN's: 0 outside (−1, H), corners outside 0)."""
    op, k, G = _op(stride=stride, dilation=dilation, scope=scope, dtype=torch.float64), 3, 2
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    with torch.no_grad():
        out = op(x)
        kernel_off, om = op.rotation_conv(x).tolist(), op.conv_offset(x).tolist()
    planes, xs = op.weight.squeeze(1).tolist(), x.tolist()
    sh, sw = op.scope_size
    pad = dilation  # the centred default d·(k−1)/2
    expected = torch.zeros_like(out)
    for b, c, i, j in torch.cartesian_prod(*(torch.arange(n) for n in out.shape)).tolist():
        g, acc = c % G, 0.0
        for t in range(k * k):
            fh, fw = divmod(t, k)
            ch = (g * k * k + t) * 2  # (g, tap, {h, w}) in both offset convs
            w = _planar_bilinear(planes[c], fh + kernel_off[b][ch][i][j] + (sh - k) / 2,
                                 fw + kernel_off[b][ch + 1][i][j] + (sw - k) / 2)
            v = _planar_bilinear(xs[b][c], i * stride - pad + fh * dilation + om[b][ch][i][j],
                                 j * stride - pad + fw * dilation + om[b][ch + 1][i][j])
            mask = 1 / (1 + math.exp(-om[b][2 * G * k * k + g * k * k + t][i][j]))
            acc += w * v * mask
        expected[b, c, i, j] = acc
    assert out.shape == (2, 4, -(-size[0] // stride), -(-size[1] // stride))
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected)


def test_at_init_it_is_half_dk_local():
    """Zero `conv_offset`: Δp = 0 and m = sigmoid(0) = ½ (DCNv2), so dk_dcn = ½ · dk_local, with the kernel
    offsets (here nonzero) and scope weight shared; with m = 1 the aggregation is dk_local's exactly."""
    dk_dcn = _op(stride=2)
    with torch.no_grad():
        dk_dcn.conv_offset.weight.zero_()
        dk_dcn.conv_offset.bias.zero_()
    dk_local = DeformKernelLocal(4, 4, 3, 2, offset_groups=2)
    dk_local.load_state_dict(dk_dcn.state_dict(), strict=False)
    x = torch.randn(2, 4, 7, 6)
    with torch.no_grad():
        local = dk_local(x)
        torch.testing.assert_close(dk_dcn(x), 0.5 * local)
        offset = dk_dcn.kernel_offsets(x)
        assert offset.abs().max() > 0.5
        ones = torch.ones(2, 2, 9, *offset.shape[-2:])
        out = deform_kernel_dcn(x, offset, torch.zeros_like(offset), ones, dk_dcn.weight.squeeze(1),
                                kernel_size=3, stride=2)
    torch.testing.assert_close(out, local)
    torch.testing.assert_close(out, deform_kernel_local(x, offset, dk_dcn.weight.squeeze(1), kernel_size=3, stride=2,
                                                        backend="reference"))


def test_gradcheck_module():
    """Input, scope weight, both offset convs (kernel and data offsets, mask logits), bias; stride 2."""
    op = _op(C=1, G=1, stride=2, seed=1)  # one channel: the offset convs' parameters dominate the cost
    op.bias = torch.nn.Parameter(torch.randn(1))
    assert gradcheck_op(op, torch.randn(1, 1, 4, 3))


def test_gradcheck_function_offset_groups_and_dilation():
    """Two offset groups (channel c in group c mod G), dilation 2, offsets that leave the input and the scope."""
    torch.manual_seed(2)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(1, 4, 3, 3, **f64, requires_grad=True)
    kernel_off = (1.5 * torch.randn(1, 2, 9, 2, 2, 2, **f64)).requires_grad_()
    data_off = (1.5 * torch.randn(1, 2, 9, 2, 2, 2, **f64)).requires_grad_()
    mask = torch.rand(1, 2, 9, 2, 2, **f64, requires_grad=True)
    weight = torch.randn(4, 4, 4, **f64, requires_grad=True)

    def f(*args):
        return deform_kernel_dcn(*args, kernel_size=3, stride=2, dilation=2)

    assert torch.autograd.gradcheck(f, (x, kernel_off, data_off, mask, weight))


@pytest.mark.parametrize("stride,dilation,size,expected", [(1, 1, (7, 9), (7, 9)), (2, 1, (7, 9), (4, 5)),
                                                           (1, 2, (7, 9), (7, 9)), (2, 2, (8, 9), (4, 5))])
def test_registry_and_geometry(stride, dilation, size, expected):
    assert "dk_dcn" in dynconv.list_ops()
    assert {"scope_size", "offset_groups"} <= set(dynconv.op_options("dk_dcn"))
    op = dynconv.create_op("dk_dcn", 4, 4, 3, stride=stride, dilation=dilation, scope_size=(4, 5), offset_groups=2)
    assert isinstance(op, DeformKernelDCN) and op.scope_size == (4, 5)
    assert op.conv_offset.out_channels == 2 * 9 * 3
    out = op(torch.randn(2, 4, *size))
    assert out.shape == (2, 4, *expected) and torch.isfinite(out).all()


def test_channel_rules_name_the_operator():
    with pytest.raises(ValueError, match="dk_dcn filters each channel separately.*1x1 projection"):
        dynconv.create_op("dk_dcn", 4, 8, 3)
    with pytest.raises(ValueError, match="dk_dcn: offset_groups"):
        dynconv.create_op("dk_dcn", 4, 4, 3, offset_groups=3)
    with pytest.raises(ValueError, match="dk_dcn: scope_size"):
        dynconv.create_op("dk_dcn", 4, 4, 5, scope_size=4)


def test_backward_keeps_no_per_tap_tensors():
    """Per-tap checkpointing: autograd holds only x, the parameters and the offset/mask maps (G·k²·6
    channels: conv_offset's output, its sigmoid, the kernel offsets), not the ~8·k² (B, C, Ho, Wo)
    tensors of the bare loop (72·B·C·Ho·Wo here, ~15× this bound)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    op = _op(C=32, G=1)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = op(x)
    maps = 2 * 9 * 6 * 8 * 8
    bound = x.numel() + sum(p.numel() for p in op.parameters()) + maps
    assert sum(storages.values()) <= bound * x.element_size()
    out.sum().backward()
    assert x.grad.abs().sum() > 0 and op.conv_offset.weight.grad.abs().sum() > 0


def test_channels_last_input():
    """channels_last offset-conv outputs (sliced per group) give the contiguous result and gradients."""
    assert_channels_last_matches(_op(C=6, G=3), torch.randn(2, 6, 6, 5))


def test_bfloat16_autocast_runs_in_float32():
    op, x = _op(), torch.randn(2, 4, 6, 5)
    with torch.no_grad():
        ref = op(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = op(x)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, atol=5e-2 * ref.abs().max().item(), rtol=5e-2)
