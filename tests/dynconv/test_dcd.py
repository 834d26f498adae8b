"""DCD: Λ(x)·(W0 * x) + P Φ(x) Qᵀ x, the official module layouts, its size rules and ablation variants."""
import pytest
import torch
import torch.nn.functional as F

from dynconv.ops.dcd import DCD, DCDMobile, DYCls, HSigmoid, dcd_sizes, dymodule_sizes
from tests.dynconv.op_checks import gradcheck_op, per_sample_conv


def _randomise_bn(m):
    """Eval-mode BN with non-trivial statistics and affine terms: a fixed per-channel affine map."""
    for bn in m.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
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


def _bn_affine(bn):
    """Eval-mode BN as t ↦ d·t + e."""
    d = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return d, bn.bias - bn.running_mean * d


def _synthesised(m, x):
    """Paper eq. 4 with the kernel synthesised per sample, then one ordinary conv per sample:
    W_b = Λ_b·W0 + P (I + D2 Φ_b) D1 Qᵀ at the centre tap, bias_b = Λ_b·b0 + P((I + D2 Φ_b) e1 + e2),
    where BN_i(t) = D_i t + e_i (eval mode). Λ = 1 without `fc_scale`; no PΦQᵀ term without `fc_phi`."""
    hsig = lambda t: torch.clamp(t + 3, 0, 6) / 3  # noqa: E731
    kh, kw = m.conv.kernel_size
    weights, biases = [], []
    for xb in x:
        y = m.fc[0].weight @ F.adaptive_avg_pool2d(xb, m.pool.output_size).reshape(-1)
        y = y * hsig(m.fc[1].fc[0].weight @ y)
        lam = torch.ones(m.conv.out_channels) if m.fc_scale is None else hsig(m.fc_scale.weight @ y)
        w = lam[:, None, None, None] * m.conv.weight
        b = lam * (torch.zeros_like(lam) if m.conv.bias is None else m.conv.bias)
        if m.fc_phi is not None:
            q, p = (getattr(m, n).weight.flatten(1) for n in m.qp_names)
            (d1, e1), (d2, e2) = _bn_affine(m.bn1), _bn_affine(m.bn2)
            mix = torch.eye(m.dim) + d2[:, None] * (m.fc_phi.weight @ y).view(m.dim, m.dim)
            centre = torch.zeros_like(w)
            centre[:, :, kh // 2, kw // 2] = p @ mix @ (d1[:, None] * q)
            w, b = w + centre, b + p @ (mix @ e1 + e2)
        weights.append(w)
        biases.append(b)
    return per_sample_conv(x, weights, biases, stride=m.conv.stride, padding=m.conv.padding,
                           dilation=m.conv.dilation)


VARIANTS = [dict(), dict(dynamic_scale=False), dict(dynamic_residual=False), dict(latent_dim=3),
            dict(latent_dim=5, dynamic_scale=False)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("make,shape", [
    (lambda **kw: DCD(16, 8, 3, stride=2, **kw), (3, 16, 7, 6)),
    (lambda **kw: DCD(6, 8, 3, dilation=2, bias=True, **kw), (2, 6, 7, 6)),
    (lambda **kw: DCD(8, 12, 3, stride=2, context="pool2", **kw), (2, 8, 6, 6)),
    (lambda **kw: DCDMobile(8, 32, 1, **kw), (2, 8, 6, 6)),
    (lambda **kw: DCDMobile(32, 8, 1, **kw), (2, 32, 5, 4)),
])
def test_equals_synthesised_kernel(variant, make, shape):
    torch.manual_seed(0)
    m = _randomise_bn(make(**variant))
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _synthesised(m, x), atol=1e-5, rtol=1e-4)


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


def _expected_params(c_in, c_out, k, n, sq, dim, scale=True, residual=True):
    """conv + context (fc.0, SE) + Λ (fc_scale) + Φ path (q, p, two BN affines, fc_phi), from the layer sizes."""
    count = c_out * c_in * k * k + n * sq + sq * sq
    count += sq * c_out if scale else 0
    count += dim * c_in + c_out * dim + 2 * 2 * dim + sq * dim * dim if residual else 0
    return count


@pytest.mark.parametrize("latent_dim", [None, 3, 8, 20])
@pytest.mark.parametrize("variant", [dict(), dict(dynamic_scale=False), dict(dynamic_residual=False)])
def test_latent_dim_sets_phi_and_param_count(latent_dim, variant):
    """L = latent_dim (official int(√n) when None); squeeze = max(n, L²)//16 with that L (floor 1 for
    gap, 4 for pool2, max(n, L²)//fc_squeeze floored at 4 for DYModule)."""
    scale, residual = variant.get("dynamic_scale", True), variant.get("dynamic_residual", True)
    cases = [  # (module, c_in, c_out, k, context features n, official L, squeeze(n, L))
        (DCD(64, 32, 3, latent_dim=latent_dim, **variant), 64, 32, 3, 64, 8, lambda n, L: max(max(n, L * L) // 16, 1)),
        (DCD(16, 16, 3, context="pool2", latent_dim=latent_dim, **variant), 16, 16, 3, 64, 8,
         lambda n, L: max(max(n, L * L) // 16, 4)),
        (DCDMobile(24, 144, 1, latent_dim=latent_dim, **variant), 24, 144, 1, 96, 12,  # 96//8 = 12, 12² ≤ 2·96
         lambda n, L: max(max(n, L * L) // 16, 4)),
    ]
    for m, c_in, c_out, k, n, official, squeeze in cases:
        L = official if latent_dim is None else latent_dim
        sq = squeeze(n, L)
        assert (m.dim, m.fc[0].weight.shape) == (L, (sq, n))
        if residual:
            assert m.fc_phi.weight.shape == (L * L, sq) and m.bn1.num_features == m.bn2.num_features == L
        assert sum(p.numel() for p in m.parameters()) == _expected_params(c_in, c_out, k, n, sq, L, scale, residual)


def test_ablation_keys():
    base = set(_shapes(DCD(64, 64, 3)))
    phi_path = {k for k in base if k.split(".")[0] in ("q", "p", "bn1", "bn2", "fc_phi")}
    assert set(_shapes(DCD(64, 64, 3, dynamic_scale=False))) == base - {"fc_scale.weight"}
    assert set(_shapes(DCD(64, 64, 3, dynamic_residual=False))) == base - phi_path
    assert len(phi_path) == 11  # q, p, fc_phi weights and 4 entries for each BN (num_batches_tracked aside)
    assert list(DCD(64, 64, 3).state_dict()) == list(DCD(64, 64, 3, latent_dim=None, dynamic_scale=True,
                                                         dynamic_residual=True).state_dict())


def test_ablation_errors():
    with pytest.raises(ValueError, match="static conv: use op=conv"):
        DCD(8, 8, 3, dynamic_scale=False, dynamic_residual=False)
    with pytest.raises(ValueError, match="latent_dim must be a positive int"):
        DCDMobile(8, 8, 1, latent_dim=0)
    with pytest.raises(ValueError, match="latent_dim must be a positive int"):
        dcd_sizes(64, "pool2", latent_dim=2.5)


@pytest.mark.parametrize("make,shape", [
    (lambda: DCD(4, 4, 3), (2, 4, 4, 4)),
    (lambda: DCD(4, 4, 3, dynamic_scale=False), (2, 4, 4, 4)),
    (lambda: DCD(4, 4, 3, stride=2, dynamic_residual=False), (2, 4, 5, 4)),
    (lambda: DCD(4, 4, 3, latent_dim=3), (2, 4, 4, 4)),
    (lambda: DCDMobile(2, 4, 1, latent_dim=3, dynamic_scale=False), (2, 2, 4, 4)),
    (lambda: DCD(2, 3, 3, stride=2, context="pool2"), (2, 2, 5, 4)),
    (lambda: DCDMobile(2, 4, 1), (2, 2, 4, 4)),
    (lambda: DYCls(4, 3, dim=2, squeeze=2), (3, 4)),
])
def test_gradcheck(make, shape):
    torch.manual_seed(0)
    assert gradcheck_op(make(), torch.randn(shape))
