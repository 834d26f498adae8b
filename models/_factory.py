"""One path from a name to a model: `models.build` (Hydra) and `timm.create_model` (our registered names).

Every name we register (an exact paper model such as `rednet50`, or a family such as `rednet` whose
`depth`/`width` picks the variant) is a `ModelSpec`: a builder that returns the backbone with `Slot`s
where its operator goes, plus the defaults of that name, and a pretrained config (timm's: the eval transform,
the first conv and classifier, where the official weights are published). Creating one goes through timm's
`build_model_with_cfg`, as timm's own models do (`features_only`, `out_indices`, `pretrained_cfg`), which:
1. splits the keyword arguments into the builder's and the operator's options (unknown keys → error);
2. builds the backbone;
3. `dynconv.replace(model, op, policy)` fills the slots and applies the policy;
4. applies the backbone's own weight init to the new operator modules;
5. sets the backbone options (`frozen_stages`, `norm_eval`, `global_pool`).
"""
from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import timm
import torch.nn as nn
from timm.models import build_model_with_cfg, register_model

import dynconv
from dynconv.checkpoint import load
from dynconv.registry import OptionError, check_op_kwargs
from dynconv.replace import Policy, format_report

log = logging.getLogger(__name__)
_MODELS: dict[str, "ModelSpec"] = {}
# options every backbone takes (models._backbone.Backbone), with their defaults
BACKBONE_OPTIONS = {"frozen_stages": -1, "norm_eval": False, "global_pool": "avg"}
# an ImageNet model's pretrained config: the eval transform of torchvision's reference scripts and mmcls (resize to
# 256, center crop 224, bilinear; timm's ImageNet mean and std and 1000 classes by default)
IMAGENET_CFG = {"input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875, "interpolation": "bilinear"}
# features_only goes through forward_intermediates, so the wrapper keeps the model (and its frozen stages)
FEATURE_CFG = {"feature_cls": "getter"}


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]  # builder(num_classes=..., in_chans=..., **model_kwargs)
    fixed: dict = field(default_factory=dict)  # builder kwargs the name fixes (depth=50, ...)
    op: str = "conv"  # the operator that fills the slots by default
    policy: str = "none"  # the policy used when the caller names an operator but no policy
    op_kwargs: dict = field(default_factory=dict)  # operator options the name fixes
    input_size: tuple = (224, 224)  # dry-pass input size when the caller gives none (the pretrained cfg's)
    init: Callable[[str, nn.Module], None] | None = None  # the backbone's init, for new operator modules


def register(name: str, builder: Callable[..., nn.Module], *, cfg: dict | None = None, **spec) -> None:
    """Register `name` here and in timm, with its pretrained config: `IMAGENET_CFG` updated by `cfg` (timm's
    `PretrainedCfg` fields); `name` must be new to timm (timm's own models stay timm's)."""
    if name not in _MODELS and name in timm.list_models():
        raise ValueError(f"{name!r} is one of timm's models; register ours under a name timm does not have")
    cfg = {**IMAGENET_CFG, **(cfg or {})}
    _MODELS[name] = ModelSpec(builder, input_size=tuple(cfg["input_size"][1:]), **spec)

    def entry(pretrained: bool = False, **kwargs) -> nn.Module:
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights in timm's hub; convert official ones with "
                             "scripts/convert_checkpoint.py or load them with models.load_official")
        return create(name, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = builder.__module__
    # timm's register_model takes a model's pretrained config from its module's `default_cfgs`
    vars(sys.modules[builder.__module__]).setdefault("default_cfgs", {})[name] = cfg
    register_model(entry)


def list_models() -> list[str]:
    return sorted(_MODELS)


def _builder_keys(builder: Callable) -> set[str]:
    return {k for k, p in inspect.signature(builder).parameters.items() if p.kind is p.KEYWORD_ONLY}


def create(name: str, **kwargs) -> nn.Module:
    """Build registered model `name` with timm's `build_model_with_cfg`: `kwargs` are `_build`'s, timm's
    (`features_only`, `out_indices`, `feature_cls`, `pretrained_cfg`, `pretrained_cfg_overlay`)."""
    return build_model_with_cfg(partial(_build, name), name, False, feature_cfg=dict(FEATURE_CFG), **kwargs)


def _build(name: str, *, num_classes: int | None = None, in_chans: int = 3, op=None, policy=None,
           input_size=None, frozen_stages: int = -1, norm_eval: bool = False, global_pool: str = "avg",
           **kwargs) -> nn.Module:
    """`kwargs` are the builder's options and the operator's options; `frozen_stages`, `norm_eval` and
    `global_pool` the backbone's (models._backbone). The replacement report is kept as `model.replacement_report`.
    """
    spec = _MODELS[name]
    op_name, op_kwargs = dynconv.resolve_op(op or spec.op)
    if policy is None:
        policy = spec.policy if op is not None else "none"
    model_keys, op_keys = _builder_keys(spec.builder), set(dynconv.op_options(op_name))
    model_kwargs = {}
    for k, v in kwargs.items():
        if k in spec.fixed:
            raise OptionError(f"{name} fixes {k}={spec.fixed[k]!r}; use its family name to choose {k}")
        if k in model_keys:
            model_kwargs[k] = v
        elif k in op_keys:
            op_kwargs[k] = v
        else:
            valid = ", ".join(sorted((model_keys | set(BACKBONE_OPTIONS)) - set(spec.fixed)))
            raise OptionError(f"{name}: unknown option {k!r}; model options: {valid}; "
                              f"options of operator {op_name!r}: {', '.join(sorted(op_keys)) or '(none)'}")
    if op_name == spec.op:
        op_kwargs = {**spec.op_kwargs, **op_kwargs}
    if num_classes is not None:  # else the builder's default (1000 classes; the face nets' embedding)
        model_kwargs["num_classes"] = num_classes
    model = spec.builder(in_chans=in_chans, **spec.fixed, **model_kwargs)
    report = dynconv.replace(model, op_name, policy, input_size=input_size or spec.input_size,
                             in_chans=in_chans, init=spec.init, **op_kwargs)
    if global_pool != BACKBONE_OPTIONS["global_pool"]:
        model.reset_classifier(model.num_classes, global_pool)
    model.set_backbone_options(frozen_stages, norm_eval)
    model.replacement_report = report
    model.arch = name  # models.load_official picks the key converter by it
    return model


class ModelError(dynconv.UserError, ValueError):
    """A model the config cannot build: an unknown name, weights that cannot be found or fetched."""


def timm_model(name: str, *, pretrained: bool = False, pretrained_file: str | None = None, **kwargs) -> nn.Module:
    """timm's model `name` (timm's own class; none of ours). `pretrained_file` is the offline source of
    the pretrained weights, passed as timm's pretrained-config file overlay; online, timm fetches them."""
    if pretrained_file is not None:
        if not pretrained:
            raise ModelError(f"model.pretrained_file={pretrained_file} is read only with model.pretrained=true")
        if not Path(pretrained_file).is_file():
            raise ModelError(f"model.pretrained_file={pretrained_file}: no such file")
        if not str(pretrained_file).endswith(".safetensors"):  # timm reads those with safetensors, the rest with torch
            load(pretrained_file)  # a damaged or unsafe file: one line naming it
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(pretrained_file)}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        raise ModelError(f"unknown model {name!r}: not one of ours ({', '.join(list_models())}) "
                         f"and timm says: {e}") from None
    except OSError as e:  # huggingface_hub's download and offline-cache errors
        if not pretrained or pretrained_file is not None:
            raise
        raise ModelError(f"model.pretrained=true: timm could not fetch {name}'s weights ({type(e).__name__}: "
                         f"{str(e).split('. ')[0][:160]}); offline, give a weights file with "
                         "model.pretrained_file=<path>") from None


def warn_small_inputs(name: str, report: list[dict], small_input: bool = False) -> None:
    """Flag the operator layers whose input is smaller than their kernel (they see mostly padding), in the
    report (`warning`) and the log, naming the fixes (`model.small_input=true` only when it is not set)."""
    small = [r for r in report if r["op"] != "conv" and not r["skipped"] and r["input_size"]
             and min(r["input_size"]) < max(r["kernel_size"])]
    for r in small:
        r["warning"] = f"input {'×'.join(map(str, r['input_size']))} smaller than kernel " \
                       f"{'×'.join(map(str, r['kernel_size']))}"
    if small:
        worst = min(small, key=lambda r: min(r["input_size"]))
        fix = ("with model.small_input=true already: train at a larger size (data.img_size=...)" if small_input else
               "train at a larger size (data.img_size=...) or, on a backbone with that option, keep the resolution "
               "with model.small_input=true")
        log.warning("model %s: %d operator layer(s) get inputs smaller than their kernel (down to %s): they see "
                    "mostly zero padding; %s", name, len(small), worst["warning"], fix)


def build(model_cfg: dict, op_cfg: dict | None = None, policy_cfg: dict | None = None, *, num_classes: int,
          in_chans: int = 3, input_size=None) -> tuple[nn.Module, list[dict]]:
    """Build from the Hydra `model`, `op` and `policy` groups; returns (model, replacement report).

    `model_cfg["name"]` is one of ours (`list_models()`) or any other timm model, to which the
    policy is then applied; a timm model takes timm's keyword arguments, `pretrained` (its weights are
    loaded before the policy replaces layers, which then start from the replaced convs where they can)
    and `pretrained_file`. An `op_cfg` without a name (`configs/op/default.yaml`) means the model's
    own operator (RedNet: involution; plain backbones: conv).
    """
    cfg = dict(model_cfg)
    name = cfg.pop("name")
    op = dict(op_cfg) if op_cfg and op_cfg.get("name") else None  # no name: the model's own operator
    if op:  # a misspelt op.<key> is named with the valid ones, as create_op does
        check_op_kwargs(*dynconv.resolve_op(op))
    policy = Policy.parse(policy_cfg)
    if name in _MODELS:
        model = create(name, num_classes=num_classes, in_chans=in_chans, op=op, policy=policy,
                       input_size=input_size, **cfg)
        report = model.replacement_report
    else:
        model = timm_model(name, num_classes=num_classes, in_chans=in_chans, **cfg)
        report = dynconv.replace(model, op or "conv", policy, input_size=input_size, in_chans=in_chans,
                                 warm_start=bool(cfg.get("pretrained")))
    warn_small_inputs(name, report, bool(cfg.get("small_input")))
    if op and not report and op["name"] != "conv" and policy.name == "none" and not policy.include:
        raise ModelError(f"op={op['name']} has no effect: model {name!r} has no operator slots and policy is "
                         "'none'; choose a policy (all_3x3, dw_only, deep_only) or include patterns")
    return model, report


__all__ = ["ModelSpec", "register", "IMAGENET_CFG", "list_models", "create", "build", "BACKBONE_OPTIONS", "timm_model",
           "warn_small_inputs", "format_report"]
