"""Global and per-call choice of the primitives' backend ("fast", the default, or "reference")."""
from __future__ import annotations

import contextlib

BACKENDS = ("fast", "reference")
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
