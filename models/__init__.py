"""Backbones, registered with timm (`timm.create_model("rednet50", op=..., policy=...)`), and the
official-checkpoint loaders. `models.build(model_cfg, op_cfg, policy_cfg, ...)` is the Hydra path."""
from ._factory import build, create, list_models, format_report
from . import resnet, rednet, mobilenetv2, face  # noqa: F401  (registers the models)
from .official import convert_state_dict, load_official

__all__ = ["build", "create", "list_models", "format_report", "load_official", "convert_state_dict"]
