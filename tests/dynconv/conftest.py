"""Shared fixtures for the operator tests."""
from __future__ import annotations

import pytest
import torch

from dynconv import use_backend
from dynconv.functional import pixel_filter as pixel_filter_module


@pytest.fixture(params=["fast", "reference"])
def backend(request):
    """Run the test under each primitive backend, set globally as a user would."""
    with use_backend(request.param):
        yield request.param


@pytest.fixture
def torch_fast(monkeypatch):
    """The pure-PyTorch fast path even where the compiled kernel (`native`) is built."""
    monkeypatch.setattr(pixel_filter_module, "native", None)


@pytest.fixture
def naive_aggregate():
    """naive(x, filt, K, stride, padding, out_size): the per-pixel filtering sum as plain Python loops,

        out[b,c,i,j] = Σ_{kh,kw} filt(b, c, kh, kw, i, j) · x[b, c, i·s − p + kh, j·s − p + kw]

    (zero padding, dilation 1): the equation every per-pixel operator's paper states.
    """

    def naive(x, filt, K, stride, padding, out_size):
        B, C, H, W = x.shape
        xs = x.tolist()
        out = torch.zeros(B, C, *out_size, dtype=torch.float64)
        for b in range(B):
            for c in range(C):
                for i in range(out_size[0]):
                    for j in range(out_size[1]):
                        acc = 0.0
                        for kh in range(K):
                            for kw in range(K):
                                y, z = i * stride - padding + kh, j * stride - padding + kw
                                if 0 <= y < H and 0 <= z < W:
                                    acc += filt(b, c, kh, kw, i, j) * xs[b][c][y][z]
                        out[b, c, i, j] = acc
        return out

    return naive


@pytest.fixture
def largest_tensor():
    """largest_tensor(fn) → the most elements of any tensor an aten op produced while fn() ran
    (forward and backward), to check that a fast path never materialises the unfolded input."""
    from .op_checks import OpRecord

    def measure(fn) -> int:
        with OpRecord() as record:
            fn()
        return max((n for _, n in record.outputs()), default=0)

    return measure
