"""Global and per-call choice of the primitives' backend.

"fast" (the default) runs the custom ops and their compiled kernels; "reference" the short plain-PyTorch
decomposition (unfold, multiply, sum) that the tests hold every path to; "export" the decomposition that
`dynconv.export` traces for deployment engines: the reference's everywhere except the per-pixel aggregations
(`pixel_filter`, and through it involution and local Deformable Kernels), which sum the K² taps as shifted
slices of the padded input, out of place, never building the (B, C·K², Ho, Wo) unfolded input.
"""
from __future__ import annotations

import contextlib

BACKENDS = ("fast", "reference", "export")
_current = "fast"


def set_backend(name: str) -> None:
    global _current
    _current = resolve(name)


def get_backend() -> str:
    return _current


def resolve(name: str | None) -> str:
    """The backend a call uses: `name` if given, else the global one."""
    if name is None:
        return _current
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """`with use_backend("reference"): ...` switches the global backend inside the block."""
    global _current
    prev, _current = _current, resolve(name)
    try:
        yield
    finally:
        _current = prev
