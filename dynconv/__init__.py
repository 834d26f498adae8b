"""dynconv: dynamic convolutions as drop-in replacements for `nn.Conv2d`.

    import dynconv
    dynconv.list_ops()
    op = dynconv.create_op("ddf", 64, 64, 3, stride=2)
    report = dynconv.replace(model, op="involution", policy="deep_only")
"""
from .domain import Domain
from .errors import UserError
from .operator import Operator, on_epoch_start, tensorboard_images
from .registry import create_op, get_op, list_ops, register_op, check_op_kwargs, op_options, resolve_op
from .functional.backend import get_backend, set_backend, use_backend
from . import ops  # noqa: F401  (registers every operator)
from .replace import replace

__all__ = ["Operator", "on_epoch_start", "tensorboard_images", "create_op", "get_op", "list_ops", "register_op",
           "check_op_kwargs", "op_options", "resolve_op", "get_backend", "set_backend", "use_backend", "replace",
           "UserError", "Domain"]
