"""Margin softmax heads for face recognition, on L2-normalised embeddings and class centres.

logits_j = s * cos(theta_j) for every class j, except at the target class y, where
- CosFace / AM-Softmax (Wang et al. 2018, Eq. 4):  s * (cos(theta_y) - m)   (TVConv: m=0.35, s=32)
- ArcFace (Deng et al. 2019, Eq. 3):               s * cos(theta_y + m)     (insightface: m=0.5, s=64)
Train with `F.cross_entropy(head(emb, labels), labels)`.

Autograd runs through the margin exactly: cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m)
with sin(theta) = sqrt(1 - cos^2), so d logit / d cos = s (cos m + sin m cos / sin theta).
(insightface applies the ArcFace margin in place under no_grad: same loss, but the gradient treats
that derivative as s.) As in insightface's arcface_torch there is no correction for
theta + m > pi, where cos(theta + m) stops decreasing.

Class-centre init, `init=`:
- "uniform": uniform(-1, 1) rows scaled to unit norm (TVConv's AM-Softmax `uniform_.renorm_.mul_`);
- "normal":  normal(0, 0.01) (insightface's PartialFC).
Only the direction of a centre enters the logits, so the two differ in the initial spread of
the directions and in how far a step with weight decay turns a centre.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

INITS = ("uniform", "normal")


class MarginHead(nn.Module):
    """Cosine classifier `s * cos(theta)` with a margin at the target class (set by `margin`)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float, m: float, init: str = "uniform"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init={init!r}: choose one of {INITS}")
        self.s, self.m, self.init = float(s), float(m), init
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "uniform":
                self.weight.uniform_(-1.0, 1.0)
                self.weight.div_(self.weight.norm(dim=1, keepdim=True))
            else:
                self.weight.normal_(0.0, 0.01)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """cos(theta) (B, num_classes), in at least float32 even under autocast."""
        dtype = torch.promote_types(torch.promote_types(emb.dtype, self.weight.dtype), torch.float32)
        with torch.autocast(emb.device.type, enabled=False):
            return F.linear(F.normalize(emb.to(dtype), dim=1), F.normalize(self.weight.to(dtype), dim=1))

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled logits (B, num_classes); without labels, no margin (s * cos for every class)."""
        cos = self.cosine(emb)
        if labels is not None:
            index = labels.view(-1, 1)
            cos = cos.scatter(1, index, self.margin(cos.gather(1, index)))
        return self.s * cos

    def extra_repr(self) -> str:
        n, d = self.weight.shape
        return f"embedding_size={d}, num_classes={n}, s={self.s}, m={self.m}, init={self.init}"


class CosFace(MarginHead):
    """Additive cosine margin (CosFace / AM-Softmax): target logit s * (cos(theta) - m)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 32.0, m: float = 0.35,
                 init: str = "uniform"):
        super().__init__(embedding_size, num_classes, s, m, init)

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.m


class ArcFace(MarginHead):
    """Additive angular margin (ArcFace): target logit s * cos(theta + m)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 init: str = "uniform"):
        super().__init__(embedding_size, num_classes, s, m, init)

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        # sin(theta) >= 0 on [0, pi]; the floor keeps the gradient finite at theta = 0 where the
        # exact d sin / d cos is infinite (and the tangential gradient of cos is zero).
        sin = (1.0 - cos * cos).clamp_min(torch.finfo(cos.dtype).eps).sqrt()
        return cos * math.cos(self.m) - sin * math.sin(self.m)


HEADS = {"cosface": CosFace, "arcface": ArcFace}


def build_head(name: str, embedding_size: int, num_classes: int, **opts) -> MarginHead:
    """`build_head("cosface", 512, 10572, s=32, m=0.35)`; opts are the head's keyword arguments."""
    if name not in HEADS:
        raise ValueError(f"unknown face head {name!r}; choose one of {sorted(HEADS)}")
    return HEADS[name](embedding_size, num_classes, **opts)
