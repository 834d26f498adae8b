"""Name → operator class registry, and the `create_op` factory.

Every operator is a drop-in for `nn.Conv2d`: its constructor starts with
`(in_channels, out_channels, kernel_size, stride=1, ...)` followed by its own keyword options, and
its class derives from `Operator` (the hooks the rest of the code asks, `dynconv/operator.py`).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch.nn as nn

from .errors import UserError
from .operator import Operator

_OPS: dict[str, type[nn.Module]] = {}


def register_op(name: str | None = None) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `@register_op("involution")` makes the class creatable by name."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        key = name or cls.__name__.lower()
        if not issubclass(cls, Operator):
            raise TypeError(f"register_op({key!r}): {cls.__qualname__} must derive from dynconv.Operator "
                            "(it gives the hooks the model builders and the trainer ask every operator)")
        if key in _OPS and _OPS[key] is not cls:
            raise ValueError(f"operator name {key!r} is already registered by {_OPS[key].__qualname__}")
        _OPS[key] = cls
        cls.op_name = key
        return cls

    return deco


def list_ops() -> list[str]:
    """Sorted names of every registered operator."""
    return sorted(_OPS)


def get_op(name: str) -> type[nn.Module]:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown operator {name!r}; known operators: {', '.join(list_ops())}") from None


def op_options(name: str) -> dict[str, inspect.Parameter]:
    """The keyword options an operator accepts beyond the Conv2d geometry (name → Parameter)."""
    params = inspect.signature(get_op(name).__init__).parameters
    skip = {"self", "in_channels", "out_channels", "kernel_size", "args", "kwargs"}
    return {k: p for k, p in params.items() if k not in skip and p.kind is not p.VAR_KEYWORD}


class OptionError(UserError, TypeError):
    """An option that the operator or model does not take (the message lists those it does)."""


def check_op_kwargs(name: str, kwargs: dict) -> None:
    """Raise a clear error for options the operator does not take (misspelt config keys)."""
    known = op_options(name)
    bad = sorted(set(kwargs) - set(known))
    if bad:
        raise OptionError(
            f"operator {name!r} got unknown option(s) {bad}; its options are: {', '.join(sorted(known))}"
        )


def resolve_op(op: str | dict) -> tuple[str, dict]:
    """(name, options) from an operator name or a config dict `{"name": ..., "module": ..., <options>}`.

    `module` (optional) is imported first: an operator defined outside dynconv registers itself there,
    so `op.name=my_op +op.module=my_pkg.my_op` uses it without editing any list.
    """
    op = op if isinstance(op, dict) else {"name": op}
    if op.get("module"):
        try:
            importlib.import_module(op["module"])
        except ImportError as e:
            raise ImportError(f"op.module={op['module']!r} cannot be imported ({e}); it must be an importable "
                              "Python module (on PYTHONPATH) that registers the operator") from e
    get_op(op["name"])  # an unknown name fails here, listing the known ones
    return op["name"], {k: v for k, v in op.items() if k not in ("name", "module")}


def create_op(name: str, in_channels: int, out_channels: int, kernel_size, stride=1, **kwargs) -> nn.Module:
    """Build operator `name` with `nn.Conv2d`'s geometry, e.g. `create_op("ddf", 64, 64, 3, stride=2)`."""
    cls = get_op(name)
    check_op_kwargs(name, kwargs)
    return cls(in_channels, out_channels, kernel_size, stride=stride, **kwargs)
