"""DCD: Λ(x)·(W0 * x) + P Φ(x) Qᵀ x, the official module layouts, and its size rules."""
import pytest
import torch
import torch.nn.functional as F

from dynconv.ops.dcd import DCD, DCDMobile, DYCls, HSigmoid, dcd_sizes, dymodule_sizes
from tests.dynconv.op_checks import gradcheck_op


def _randomise_bn(m):
    """Eval-mode BN with non-trivial statistics and affine terms: a fixed per-channel affine map."""
    for bn in (m.bn1, m.bn2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    return m.eval()


def _bn(z, bn):
    z = (z - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
    return z * bn.weight[:, None] + bn.bias[:, None]


def _explicit(m, x, pool, q, p):
    """Sample by sample, with matrices: Λ ⊙ (W0 * x) + P (BN(Φ·BN(Qᵀx)) + BN(Qᵀx))."""
    hsig = lambda t: torch.clamp(t + 3, 0, 6) / 3  # noqa: E731
    s = m.conv.stride[0]
    outs = []
    for xb in x:
        ctx = F.adaptive_avg_pool2d(xb, pool).reshape(-1)
        y = m.fc[0].weight @ ctx
        y = y * hsig(m.fc[1].fc[0].weight @ y)
        lam = hsig(m.fc_scale.weight @ y)
        phi = (m.fc_phi.weight @ y).view(m.dim, m.dim)
        static = lam[:, None, None] * F.conv2d(xb[None], m.conv.weight, None, m.conv.stride, m.conv.padding)[0]
        xs = xb[:, ::s, ::s]
        z = _bn(q.weight.flatten(1) @ xs.flatten(1), m.bn1)
        z = _bn(phi @ z, m.bn2) + z
        outs.append((p.weight.flatten(1) @ z).view(static.shape) + static)
    return torch.stack(outs)


def test_hsigmoid_range_is_0_to_2():
    t = torch.tensor([-100.0, -3.0, 0.0, 1.5, 3.0, 100.0])
    torch.testing.assert_close(HSigmoid()(t), torch.tensor([0.0, 0.0, 1.0, 1.5, 2.0, 2.0]))


@pytest.mark.parametrize("stride", [1, 2])
def test_dcd_equals_explicit_decomposition(stride):
    torch.manual_seed(0)
    m = _randomise_bn(DCD(16, 8, 3, stride=stride))
    x = torch.randn(3, 16, 7, 6)
    torch.testing.assert_close(m(x), _explicit(m, x, 1, m.q, m.p), atol=1e-5, rtol=1e-4)


def test_pool2_and_mobile_variants_equal_explicit_decomposition():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    m = _randomise_bn(DCD(8, 12, 3, stride=2, context="pool2"))
    torch.testing.assert_close(m(x), _explicit(m, x, 2, m.q, m.p), atol=1e-5, rtol=1e-4)
    mob = _randomise_bn(DCDMobile(8, 32, 1))  # expansion: 2×2 context
    torch.testing.assert_close(mob(x), _explicit(mob, x, 2, mob.conv_q, mob.conv_p), atol=1e-5, rtol=1e-4)


def test_dycls_equals_explicit():
    torch.manual_seed(0)
    m = _randomise_bn(DYCls(20, 7, dim=4, squeeze=5))
    x = torch.randn(3, 20)
    hsig = lambda t: torch.clamp(t + 3, 0, 6) / 3  # noqa: E731
    outs = []
    for xb in x:
        y = m.fc[0].weight @ xb
        y = y * hsig(m.fc[1].fc[0].weight @ y)
        phi = (m.fc_phi.weight @ y).view(4, 4)
        z = _bn((m.cls_q.weight @ xb)[:, None], m.bn1)
        z = _bn(phi @ z, m.bn2) + z
        outs.append(hsig(m.fc_scale.weight @ y) * (m.cls.weight @ xb + m.cls.bias) + (m.cls_p.weight @ z)[:, 0])
    torch.testing.assert_close(m(x), torch.stack(outs))


def test_size_rules():
    # conv_dy: L = int(√C), squeeze = max(C, L²)//16 (official resnet50_dcd: q and fc.0 shapes)
    assert dcd_sizes(64) == (1, 8, 4)
    assert dcd_sizes(128) == (1, 11, 8)
    assert dcd_sizes(2048) == (1, 45, 128)
    # conv_basic_dy: 4·C pooled features (official resnet18_dcd)
    assert dcd_sizes(64, "pool2") == (2, 16, 16)
    assert dcd_sizes(256, "pool2") == (2, 32, 64)
    assert dcd_sizes(512, "pool2") == (2, 45, 128)
    assert dcd_sizes(4, "pool2")[2] == 4  # minimum squeeze
    # DYModule (official mobilenetv2_dcd, fc_squeeze 16): expansion / projection, red doubled for 960 → 320
    assert dymodule_sizes(16, 96) == (2, 8, 4)
    assert dymodule_sizes(96, 24) == (1, 12, 9)
    assert dymodule_sizes(144, 32) == (1, 16, 16)
    assert dymodule_sizes(960, 320) == (1, 40, 100)
    assert dymodule_sizes(960, 320, fc_squeeze=8) == (1, 40, 200)
    with pytest.raises(ValueError, match="context"):
        dcd_sizes(64, "gap2")


def _shapes(m):
    return {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}


def _bn_shapes(name, n):
    return {f"{name}.{s}": (n,) for s in ("weight", "bias", "running_mean", "running_var")}


def test_state_dicts_mirror_official_keys():
    # resnet50_dcd layer1.0.conv2
    assert _shapes(DCD(64, 64, 3)) == {
        "conv.weight": (64, 64, 3, 3), "q.weight": (8, 64, 1, 1), "p.weight": (64, 8, 1, 1),
        **_bn_shapes("bn1", 8), **_bn_shapes("bn2", 8),
        "fc.0.weight": (4, 64), "fc.1.fc.0.weight": (4, 4), "fc_phi.weight": (64, 4), "fc_scale.weight": (64, 4)}
    # mobilenetv2_dcd features.2.conv.0
    assert _shapes(DCDMobile(16, 96, 1)) == {
        "conv.weight": (96, 16, 1, 1), "conv_q.weight": (8, 16, 1, 1), "conv_p.weight": (96, 8, 1, 1),
        **_bn_shapes("bn1", 8), **_bn_shapes("bn2", 8),
        "fc.0.weight": (4, 64), "fc.1.fc.0.weight": (4, 4), "fc_phi.weight": (64, 4), "fc_scale.weight": (96, 4)}
    # resnet50_dcd classifier.0
    assert _shapes(DYCls(2048, 1000)) == {
        "cls.weight": (1000, 2048), "cls.bias": (1000,), "cls_q.weight": (32, 2048), "cls_p.weight": (1000, 32),
        "fc.0.weight": (32, 2048), "fc.1.fc.0.weight": (32, 32), "fc_phi.weight": (1024, 32),
        "fc_scale.weight": (1000, 32), **_bn_shapes("bn1", 32), **_bn_shapes("bn2", 32)}


def test_needs_same_padding():
    with pytest.raises(ValueError, match="'same' padding"):
        DCD(8, 8, 3, padding=0)


@pytest.mark.parametrize("make,shape", [
    (lambda: DCD(4, 4, 3), (2, 4, 4, 4)),
    (lambda: DCD(2, 3, 3, stride=2, context="pool2"), (2, 2, 5, 4)),
    (lambda: DCDMobile(2, 4, 1), (2, 2, 4, 4)),
    (lambda: DYCls(4, 3, dim=2, squeeze=2), (3, 4)),
])
def test_gradcheck(make, shape):
    torch.manual_seed(0)
    assert gradcheck_op(make(), torch.randn(shape))
