"""DCD: dynamic convolution decomposition (Li et al., ICLR 2021; official liyunsheng13/dcd).

`W(x) = Λ(x)·W0 + P·Φ(x)·Qᵀ` (paper eq. 4), never synthesised: two feature paths are added.
- static path `Λ(x) ⊙ (W0 * x)`, Λ = hsigmoid per output channel, hsigmoid(t) = ReLU6(t+3)/3 ∈ [0, 2];
- dynamic path `P(BN1d(Φ(x)·z) + z)`, `z = BN2d(Qᵀx)`: Q (strided) and P are 1×1 convs even for
  k×k kernels, Φ(x) is an L×L matrix from the squeezed context.
Context: GAP (`conv_dy`) or a 2×2 average pool (`conv_basic_dy`, the DYModule expansion case),
`Linear(→ squeeze, no bias)` then `SEModuleSmall`.

Ablations (the paper's latent-dimension, Λ on/off and ΛW0-only variants): `latent_dim` overrides L
(the squeeze size still follows the official formula with that L); `dynamic_scale=False` drops Λ
(W0 + PΦQᵀ); `dynamic_residual=False` drops the Φ path (ΛW0 alone, DY-Conv-like channel attention).

Submodule names follow the official state_dict (`conv, q, p, bn1, bn2, fc.0, fc.1.fc.0, fc_phi,
fc_scale`; DYModule: `conv_q, conv_p`; DYCls: `cls, cls_q, cls_p, ...`), so official checkpoints
load with an identity mapping inside each module.
"""
from __future__ import annotations

import math

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..domain import Domain
from ..functional.geometry import check_groups, conv_geometry
from ..operator import Operator
from ..registry import register_op

__all__ = ["HSigmoid", "SEModuleSmall", "DCD", "DCDMobile", "DYCls", "dcd_sizes", "dymodule_sizes"]


class HSigmoid(nn.Module):
    """ReLU6(x + 3) / 3: DCD's hard sigmoid, range [0, 2] (divided by 3, not the usual 6)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x + 3) / 3


class SEModuleSmall(nn.Module):
    """`z ⊙ hsigmoid(Linear(z))` on the squeezed context vector."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels, bias=False), HSigmoid())

    def forward(self, z: Tensor) -> Tensor:
        return z * self.fc(z)


def _latent(latent_dim: int | None, official: int) -> int:
    """L: the official value, or the `latent_dim` override (a positive int)."""
    if latent_dim is None:
        return official
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"dcd: latent_dim must be a positive int (or None for the official L), got {latent_dim!r}")
    return latent_dim


def dcd_sizes(in_channels: int, context: str = "gap", latent_dim: int | None = None) -> tuple[int, int, int]:
    """(pool, L, squeeze) of `conv_dy` (context "gap") and `conv_basic_dy` ("pool2").

    gap: L = int(√C_in), squeeze = max(C_in, L²)//16. pool2: n = 4·C_in context features,
    L = int(√n), squeeze = max(n, L²)//16, at least 4. The gap squeeze is floored at 1 so that
    C_in < 16 still builds (the official formula gives an empty layer there). `latent_dim`
    replaces L, in the squeeze formula too.
    """
    if context == "gap":
        dim = _latent(latent_dim, math.isqrt(in_channels))
        return 1, dim, max(max(in_channels, dim * dim) // 16, 1)
    if context == "pool2":
        n = 4 * in_channels
        dim = _latent(latent_dim, math.isqrt(n))
        return 2, dim, max(max(n, dim * dim) // 16, 4)
    raise ValueError(f"dcd: context must be 'gap' (conv_dy, ResNet-50) or 'pool2' (conv_basic_dy, ResNet-18); "
                     f"got {context!r}")


def dymodule_sizes(in_channels: int, out_channels: int, fc_squeeze: int = 16,
                   latent_dim: int | None = None) -> tuple[int, int, int]:
    """(pool, L, squeeze) of the MobileNetV2 `DYModule`.

    Expansion (C_in < C_out): 2×2 context (mul 4), reduction 8; otherwise GAP (mul 1), reduction 2.
    L = min(C_in·mul // red, C_out // red), doubling red while L² > 2·C_in·mul, at least 4;
    squeeze = max(C_in·mul, L²) // fc_squeeze, at least 4. `latent_dim` replaces L (no reduction
    rule, no minimum), in the squeeze formula too.
    """
    pool, red = (2, 8) if in_channels < out_channels else (1, 2)
    n = in_channels * pool * pool
    dim = min(n // red, out_channels // red)
    while dim * dim > 2 * n:
        red *= 2
        dim = min(n // red, out_channels // red)
    dim = _latent(latent_dim, max(dim, 4))
    return pool, dim, max(max(n, dim * dim) // fc_squeeze, 4)


class _DCDConv(Operator):
    """Shared body of `conv_dy`, `conv_basic_dy` and `DYModule`; sizes come from the subclass."""

    qp_names = ("q", "p")  # official attribute names of Qᵀ and P
    conv_prefix = "conv."  # the static W0: dynconv.replace(warm_start=True) copies the replaced conv in

    def _build(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, sizes,
               dynamic_scale: bool, dynamic_residual: bool):
        check_groups(self.op_name, in_channels, out_channels, groups)
        if not (dynamic_scale or dynamic_residual):
            raise ValueError(f"{self.op_name}: dynamic_scale=False and dynamic_residual=False leave W(x) = W0, "
                             "a static conv: use op=conv")
        k, s, p, d = conv_geometry(kernel_size, stride, padding, dilation)
        if any(2 * pi != di * (ki - 1) for ki, pi, di in zip(k, p, d)):
            raise ValueError(f"{self.op_name}: the 1×1 dynamic path needs 'same' padding = dilation·(k−1)/2 "
                             f"(odd kernel); got kernel_size={k}, padding={p}, dilation={d}")
        pool, self.dim, squeeze = sizes
        # registration order is the official state_dict order; a disabled part has no modules at all
        self.conv = nn.Conv2d(in_channels, out_channels, k, s, p, d, groups, bias)
        if dynamic_residual:
            q_name, p_name = self.qp_names
            self.add_module(q_name, nn.Conv2d(in_channels, self.dim, 1, s, bias=False))
            self.add_module(p_name, nn.Conv2d(self.dim, out_channels, 1, bias=False))
            self.bn1 = nn.BatchNorm2d(self.dim)
            self.bn2 = nn.BatchNorm1d(self.dim)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Sequential(nn.Linear(in_channels * pool * pool, squeeze, bias=False), SEModuleSmall(squeeze))
        self.fc_phi = nn.Linear(squeeze, self.dim * self.dim, bias=False) if dynamic_residual else None
        self.fc_scale = nn.Linear(squeeze, out_channels, bias=False) if dynamic_scale else None
        self.hs = HSigmoid()

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(self.pool(x).flatten(1))
        r = self.conv(x)
        if self.fc_scale is not None:
            r = r * self.hs(self.fc_scale(y))[:, :, None, None]
        return r if self.fc_phi is None else self._residual(x, y) + r

    def _residual(self, x: Tensor, y: Tensor) -> Tensor:
        """P(BN1d(Φ(y)·z) + z), z = BN2d(Qᵀx): the low-rank dynamic path PΦ(x)Qᵀ at the kernel centre."""
        b = x.shape[0]
        q, p = (getattr(self, n) for n in self.qp_names)
        phi = self.fc_phi(y).view(b, self.dim, self.dim)
        z = self.bn1(q(x))
        h, w = z.shape[-2:]
        z = z.flatten(2)
        z = self.bn2(phi @ z) + z
        return p(z.view(b, self.dim, h, w))


@register_op("dcd")
class DCD(_DCDConv):
    """DCD conv, official `conv_dy` (context "gap", every conv of ResNet-50's Bottleneck_dy) or
    `conv_basic_dy` (context "pool2", both 3×3 convs of ResNet-18/34's BasicBlock)."""

    domain = Domain(groups=(2,), batchnorm=True)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, *, context="gap", latent_dim: int | None = None, dynamic_scale: bool = True,
                 dynamic_residual: bool = True):
        super().__init__()
        self._build(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                    dcd_sizes(in_channels, context, latent_dim), dynamic_scale, dynamic_residual)


@register_op("dcd_mbv2")
class DCDMobile(_DCDConv):
    """DCD conv with MobileNetV2's `DYModule` sizes (both 1×1 convs of every t ≠ 1 block).

    `fc_squeeze=16`: the value of the README training commands, which the reported mobilenetv2_dcd
    (5,720,028 params) uses; the official class default is 8.
    """

    domain = Domain(kernel_sizes=(1, 3), groups=(2,), batchnorm=True)

    qp_names = ("conv_q", "conv_p")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, *, fc_squeeze=16, latent_dim: int | None = None, dynamic_scale: bool = True,
                 dynamic_residual: bool = True):
        super().__init__()
        self._build(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                    dymodule_sizes(in_channels, out_channels, fc_squeeze, latent_dim), dynamic_scale,
                    dynamic_residual)


class DYCls(nn.Module):
    """DCD's dynamic classifier, a drop-in for `nn.Linear(in_features, out_features)`:
    `hsigmoid(Λ)·cls(x) + cls_p(BN(Φ·z) + z)`, `z = BN(cls_q(x))`, with L = 32 and a 32-wide context."""

    def __init__(self, in_features: int, out_features: int, dim: int = 32, squeeze: int = 32):
        super().__init__()
        self.dim = dim
        self.cls = nn.Linear(in_features, out_features)
        self.cls_q = nn.Linear(in_features, dim, bias=False)
        self.cls_p = nn.Linear(dim, out_features, bias=False)
        self.fc = nn.Sequential(nn.Linear(in_features, squeeze, bias=False), SEModuleSmall(squeeze))
        self.fc_phi = nn.Linear(squeeze, dim * dim, bias=False)
        self.fc_scale = nn.Linear(squeeze, out_features, bias=False)
        self.bn1 = nn.BatchNorm1d(dim)
        self.bn2 = nn.BatchNorm1d(dim)
        self.hs = HSigmoid()

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        phi = self.fc_phi(y).view(-1, self.dim, self.dim)
        r = self.hs(self.fc_scale(y)) * self.cls(x)
        z = self.bn1(self.cls_q(x))
        z = self.bn2((phi @ z.unsqueeze(2)).squeeze(2)) + z
        return self.cls_p(z) + r
