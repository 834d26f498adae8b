"""Deformable Kernels: the paper's resampled kernel as loops, the official sampling quirks, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

import dynconv
from dynconv.ops.deformable_kernel import DeformKernelGlobal, DeformKernelLocal, deform_kernel_local
from tests.dynconv.op_checks import assert_channels_last_matches, gradcheck_op


def _planar_bilinear(plane, h, w):
    """The official sampler: 0 unless −1 < h < S_h and −1 < w < S_w; corners outside count as 0."""
    sh, sw = len(plane), len(plane[0])
    if not (-1 < h < sh and -1 < w < sw):
        return 0.0
    h0, w0 = math.floor(h), math.floor(w)
    lh, lw = h - h0, w - w0
    corners = [(h0, w0, (1 - lh) * (1 - lw)), (h0, w0 + 1, (1 - lh) * lw),
               (h0 + 1, w0, lh * (1 - lw)), (h0 + 1, w0 + 1, lh * lw)]
    return sum(a * plane[hi][wi] for hi, wi, a in corners if 0 <= hi < sh and 0 <= wi < sw)


def _local(stride=1, C=4, G=2, scope=4, offset_std=0.7):
    torch.manual_seed(0)
    op = DeformKernelLocal(C, C, 3, stride, scope_size=scope, offset_groups=G)
    with torch.no_grad():  # learnt-looking offsets: some taps leave the scope
        op.rotation_conv.weight.normal_(0, offset_std / 3)
        op.rotation_conv.bias.normal_(0, offset_std)
    return op


@pytest.mark.parametrize("stride,size,scope", [(1, (5, 6), 4), (2, (7, 6), (5, 4))])
def test_local_matches_paper_equation(naive_aggregate, backend, stride, size, scope):
    """W'[b,c,fh,fw,i,j] = planar_bilinear(W_c, fh + Δh + (S_h−k)/2, fw + Δw + (S_w−k)/2), Δ of group c mod G."""
    op = _local(stride, scope=scope)
    x = torch.randn(2, 4, *size)
    k, G = 3, 2
    sh, sw = op.scope_size
    with torch.no_grad():
        off = op.rotation_conv(x).tolist()
        out = op(x)
    planes = op.weight.squeeze(1).tolist()

    def filt(b, c, fh, fw, i, j):
        ch = (c % G) * k * k * 2 + (fh * k + fw) * 2
        return _planar_bilinear(planes[c], fh + off[b][ch][i][j] + (sh - k) / 2,
                                fw + off[b][ch + 1][i][j] + (sw - k) / 2)

    ho, wo = -(-size[0] // stride), -(-size[1] // stride)
    expected = naive_aggregate(x, filt, k, stride, 1, (ho, wo))
    assert out.shape == (2, 4, ho, wo)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_offset_group_of_channel_is_c_mod_g(backend):
    """Group 0 keeps the rigid kernel, group 1 is pushed out of the scope (kernel 0): with c mod G
    channels 1 and 3 vanish (contiguous groups would zero channels 2 and 3 instead)."""
    torch.manual_seed(1)
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 4)
    offset = torch.zeros(1, 2, 9, 2, 5, 5)
    offset[:, 1] = 10.0
    out = deform_kernel_local(x, offset, weight, kernel_size=3)
    rigid = deform_kernel_local(x, torch.zeros_like(offset), weight, kernel_size=3)
    assert out[:, [1, 3]].abs().max() == 0
    torch.testing.assert_close(out[:, [0, 2]], rigid[:, [0, 2]])
    assert rigid[:, [1, 3]].abs().max() > 0


@pytest.mark.parametrize("cls", [DeformKernelLocal, DeformKernelGlobal])
def test_zero_offsets_average_neighbouring_scope_taps(backend, cls):
    """S = 4, k = 3 at initialisation: tap (fh, fw) samples (fh + ½, fw + ½), the mean of the 2×2
    scope taps around it, so the op is a depthwise conv with the 2×2-averaged scope kernel."""
    torch.manual_seed(2)
    op = cls(4, 4, 3, groups=4, scope_size=4)
    x = torch.randn(2, 4, 6, 5)
    kernel = F.avg_pool2d(op.weight, 2, stride=1)
    with torch.no_grad():
        torch.testing.assert_close(op(x), F.conv2d(x, kernel, padding=1, groups=4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", ["fast", "reference"])
def test_local_gradcheck_function(backend_name):
    """Gradients of x, offsets (some outside the scope) and the scope weight, stride 2, G = 2."""
    torch.manual_seed(3)
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    offset = (1.5 * torch.randn(2, 2, 9, 2, 2, 2, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(4, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(x, offset, weight):
        return deform_kernel_local(x, offset, weight, kernel_size=3, stride=2, backend=backend_name)

    assert torch.autograd.gradcheck(f, (x, offset, weight))


def test_local_fast_equals_reference():
    torch.manual_seed(4)
    for stride, dilation, size in [(1, 1, (6, 7)), (2, 1, (7, 6)), (1, 2, (6, 6)), (2, 2, (9, 8))]:
        x, weight = torch.randn(2, 6, *size), torch.randn(6, 5, 5)
        ho, wo = [(n - 1) // stride + 1 for n in size]
        offset = torch.randn(2, 3, 9, 2, ho, wo)
        outs = [deform_kernel_local(x, offset, weight, kernel_size=3, stride=stride, dilation=dilation, backend=b)
                for b in ("fast", "reference")]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_local_gradcheck_module(backend):
    op = _local(2, C=2, G=1)
    assert gradcheck_op(op, torch.randn(2, 2, 4, 3))


def test_global_gradcheck_module(backend):
    torch.manual_seed(5)
    op = DeformKernelGlobal(4, 6, 3, 2, groups=2, scope_size=4)
    with torch.no_grad():
        op.fc.weight.normal_(0, 0.3)
    assert gradcheck_op(op, torch.randn(2, 4, 4, 3))


def test_global_coordinates_clamped_into_scope():
    """A coordinate far outside the scope is clamped to its edge: every tap reads the corner tap."""
    torch.manual_seed(6)
    op = DeformKernelGlobal(3, 3, 3, scope_size=4, groups=3)
    x = torch.randn(2, 3, 5, 5)
    for shift, corner in [(100.0, -1), (-100.0, 0)]:
        with torch.no_grad():
            op.fc.bias.fill_(shift)
            kern = op.kernels(x)
        expected = op.weight[:, :, corner, corner][None, :, :, None, None].expand(2, 3, 1, 3, 3)
        torch.testing.assert_close(kern, expected)


@pytest.mark.parametrize("cls,name", [(DeformKernelLocal, "dk_local"), (DeformKernelGlobal, "dk_global")])
@pytest.mark.parametrize("stride,size,expected", [(1, (7, 9), (7, 9)), (2, (7, 9), (4, 5))])
def test_output_shapes_and_registry(cls, name, stride, size, expected):
    op = dynconv.create_op(name, 4, 4, 3, stride=stride, scope_size=(4, 5))
    assert isinstance(op, cls) and op.scope_size == (4, 5)
    assert op(torch.randn(2, 4, *size)).shape == (2, 4, *expected)


def test_channel_rules():
    with pytest.raises(ValueError, match="1x1 projection"):
        dynconv.create_op("dk_local", 4, 8, 3)
    assert dynconv.create_op("dk_global", 4, 8, 3)(torch.randn(1, 4, 5, 5)).shape == (1, 8, 5, 5)
    with pytest.raises(ValueError, match="offset_groups"):
        dynconv.create_op("dk_local", 4, 4, 3, offset_groups=3)
    with pytest.raises(ValueError, match="scope_size"):
        dynconv.create_op("dk_local", 4, 4, 5, scope_size=4)


def test_official_parameter_count():
    """`DeformKernel2d((4,4), 64, 64, 3)`: 1,024 scope + 10,386 dense offset-conv parameters."""
    op = DeformKernelLocal(64, 64, 3, groups=64, scope_size=4)
    assert op.weight.shape == (64, 1, 4, 4)
    assert sum(p.numel() for p in op.parameters()) == 11410
    assert op.weight.abs().max() <= 1 / 3  # U(±1/√(k²)) init


def test_local_fast_never_materialises_the_resampled_kernel(largest_tensor):
    torch.manual_seed(7)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    offset = torch.randn(2, 1, 9, 2, 8, 8, requires_grad=True)
    weight = torch.randn(16, 4, 4, requires_grad=True)
    full = 2 * 16 * 9 * 8 * 8

    def step(backend):
        return lambda: deform_kernel_local(x, offset, weight, kernel_size=3, backend=backend).sum().backward()

    assert largest_tensor(step("fast")) < full // 4
    assert largest_tensor(step("reference")) >= full


def test_local_channels_last_and_bfloat16():
    torch.manual_seed(8)
    x, offset, weight = torch.randn(2, 4, 6, 5), torch.randn(2, 2, 9, 2, 6, 5), torch.randn(4, 4, 4)
    ref = deform_kernel_local(x, offset, weight, kernel_size=3, backend="reference")
    xl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = deform_kernel_local(xl, offset, weight, kernel_size=3)
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert xl.grad.is_contiguous(memory_format=torch.channels_last)
    half = deform_kernel_local(x.bfloat16(), offset.bfloat16(), weight.bfloat16(), kernel_size=3)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, atol=3e-2 * ref.abs().max().item(), rtol=3e-2)


def test_local_module_channels_last_with_offset_groups(backend):
    """A channels_last input makes the offset conv's output channels_last; with G > 1 the per-group
    offsets it yields must still give the contiguous-input result and gradients."""
    op = _local(C=4, G=2)
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out, outl = op(x), op(xl)
    torch.testing.assert_close(outl, out)
    g = torch.randn_like(out)
    (gx,), (gxl,) = torch.autograd.grad(out, [x], g), torch.autograd.grad(outl, [xl], g)
    torch.testing.assert_close(gxl, gx)
