"""Replacement policies: which convolutions of a model become which operator.

    report = dynconv.replace(model, op="ddf", policy="all_3x3", input_size=(224, 224))

A policy picks `nn.Conv2d` modules by a rule, then include/exclude patterns adjust the pick:
- `none`: nothing (only `Slot`s are filled, see below);
- `all_3x3`: every k×k conv with k > 1 outside the stem;
- `dw_only`: every depthwise conv (groups == in == out > 1) outside the stem;
- `deep_only`: the k×k convs (k > 1) of the last stages (`stages=[3, 4]` or `from_stage=3`; by default
  the last two stages);
- `shallow_only`: the k×k convs of the first stages (`stages=[1, 2]`; by default the first two).
`include` patterns add convs by module name, `exclude` patterns remove them (exclude wins). A pattern
is an fnmatch glob on the module name; it also matches every module below a matching name.

The stem is the first conv the forward pass runs plus everything under a top-level child named
`stem`, `conv1` or `conv_stem` (the names timm, torchvision and mmcls give it). Stages are read from a
dry forward pass: stage k holds the convs whose output has the k-th largest resolution among the
non-stem convs (ResNet: `layer<k>`). The same pass gives every replaced layer its input size, which
operators that need it (TVConv's `input_size`) receive.

A `Slot` is a place in a backbone built around a dynamic operator (RedNet's involutions, DDF-ResNet's
3×3 convs, the face nets' depthwise convs): it holds a conv's geometry. `none`, `all_3x3` and `dw_only`
fill every slot with the chosen operator. The placement policies `deep_only` / `shallow_only` and
`exclude` patterns also place it in slots: a slot outside the chosen stages (or excluded) gets the plain
conv it stands for (same geometry and groups: a depthwise conv in the face nets), so
`model=face_mobilenetv2 op=tvconv policy=deep_only` puts TVConv in the last two stages only.

Replacement keeps stride, dilation, padding, groups and bias where the operator takes them. An
operator that cannot change the channel count gets the 1×1 projection the papers use in front of it
(`proj`: in → out channels, then the operator at out channels, which carries the stride).
`op="conv"` leaves policy-picked convs as they are (a conv replacing a conv changes nothing).

A layer the operator cannot take (its constructor refuses the geometry or an option) is handled by
`on_incompatible`: `error` stops with the reason; `skip` keeps the conv (a slot gets the plain conv it
stands for) and reports why; `adapt` changes the option to the nearest valid value and reports it:
`group_channels` → the largest divisor of the channel count not above it; a Deformable Kernels
`scope_size` below k → k + 1; an `input_size` that differs from the dry pass → the dry pass's size.

`warm_start=True` (a pretrained backbone) starts each operator that has a conv-shaped kernel from the
weights of the conv it replaces: the operator names that kernel by `conv_prefix` (`""`: its own
`weight`/`bias`, copied into every expert when it has experts; `"conv."`: DCD's static W0). The report
says which layers started from the conv (`init`).
"""
from __future__ import annotations

import fnmatch
import logging
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from .errors import UserError
from .functional.geometry import conv_out_hw, resolve_padding
from .registry import get_op, op_options, resolve_op

log = logging.getLogger(__name__)

POLICIES = ("none", "all_3x3", "dw_only", "deep_only", "shallow_only")
ON_INCOMPATIBLE = ("error", "skip", "adapt")
PLACEMENT = ("deep_only", "shallow_only")  # policies that also choose which slots get the operator
STEM_NAMES = ("stem", "conv1", "conv_stem")
DEFAULT_INPUT_SIZE = (224, 224)


class IncompatibleLayerError(UserError, ValueError):
    """A layer the operator cannot take, under `on_incompatible="error"` (or `"adapt"` with no valid option)."""


class Slot(nn.Module):
    """A conv-shaped place that `replace` fills with the chosen operator.

    `op_hints` maps an operator name to options this place needs when that operator fills it
    (e.g. DCD's pooled context in ResNet-18 blocks). Until filled, `forward` only produces a zero
    tensor of the right shape, so that the dry pass can measure sizes. Conv2d's `bias` argument is kept
    as the bool `has_bias` (an operator's `bias` is its Parameter).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=None,
                 dilation=1, groups: int = 1, bias: bool = False, op_hints: dict | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.groups, self.has_bias = in_channels, out_channels, groups, bias
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = resolve_padding(self.kernel_size, padding, self.dilation)
        self.op_hints = dict(op_hints or {})

    @classmethod
    def like(cls, conv: nn.Conv2d, op_hints: dict | None = None) -> "Slot":
        """A slot with `conv`'s geometry."""
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.groups, conv.bias is not None, op_hints)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = conv_out_hw(x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation)
        return x.new_zeros(x.shape[0], self.out_channels, h, w)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride} (unfilled)")


@dataclass
class Policy:
    """Which convs to replace; see the module docstring."""

    name: str = "none"
    stages: Sequence[int] | None = None
    from_stage: int | None = None
    include: Sequence[str] = field(default_factory=tuple)
    exclude: Sequence[str] = field(default_factory=tuple)
    on_incompatible: str = "error"

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"unknown policy {self.name!r}; choose one of {POLICIES}")
        if self.on_incompatible not in ON_INCOMPATIBLE:
            raise ValueError(f"policy.on_incompatible={self.on_incompatible!r}: choose one of {ON_INCOMPATIBLE}")
        if self.stages is not None and self.from_stage is not None:
            raise ValueError("give policy.stages or policy.from_stage, not both")
        if self.from_stage is not None and self.name != "deep_only":
            raise ValueError(f"policy.from_stage applies to deep_only only; for {self.name} give policy.stages")
        self.include, self.exclude = tuple(self.include or ()), tuple(self.exclude or ())

    @classmethod
    def parse(cls, policy: "str | dict | Policy | None") -> "Policy":
        """From a name, a config dict (`{"name": "deep_only", "from_stage": 3}`) or a Policy."""
        if isinstance(policy, Policy):
            return policy
        if policy is None:
            return cls()
        if isinstance(policy, str):
            return cls(policy)
        known = {f.name for f in fields(cls)}
        bad = sorted(set(policy) - known)
        if bad:
            raise ValueError(f"unknown policy key(s) {bad}; policy keys are: {', '.join(sorted(known))}")
        return cls(**dict(policy))


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def _is_op(module: nn.Module) -> bool:
    return hasattr(type(module), "op_name")


def _candidates(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """Conv2d and Slot modules, not looking inside operators (their inner convs are theirs)."""
    found: OrderedDict[str, nn.Module] = OrderedDict()

    def walk(module: nn.Module, prefix: str):
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, Slot) or (isinstance(child, nn.Conv2d) and not _is_op(child)):
                found[full] = child
            elif not _is_op(child):
                walk(child, full + ".")

    walk(model, "")
    return found


@torch.no_grad()
def trace(model: nn.Module, input_size=DEFAULT_INPUT_SIZE, in_chans: int | None = None,
          modules: "OrderedDict[str, nn.Module] | None" = None) -> "OrderedDict[str, dict]":
    """Dry forward pass (batch 1, eval mode): name → {order, in_hw, out_hw} for each given module."""
    modules = _candidates(model) if modules is None else modules
    if in_chans is None:
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, Slot))), None)
        in_chans = first.in_channels if first is not None else 3
    param = next(model.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (None, torch.float32)
    seen: OrderedDict[str, dict] = OrderedDict()

    def hook(name):
        def fn(_m, args, out):
            if name not in seen:
                seen[name] = {"order": len(seen), "in_hw": tuple(args[0].shape[-2:]), "out_hw": tuple(out.shape[-2:])}
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(torch.zeros(1, in_chans, *_pair(input_size), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return seen


def _stem(names: Sequence[str], seen: dict) -> set[str]:
    stem = {n for n in names if n.split(".")[0] in STEM_NAMES}
    if seen:
        stem.add(min(seen, key=lambda n: seen[n]["order"]))
    return stem


def _stages(seen: dict, stem: set[str]) -> dict[str, int]:
    heights = sorted({v["out_hw"][0] for n, v in seen.items() if n not in stem}, reverse=True)
    return {n: heights.index(v["out_hw"][0]) + 1 for n, v in seen.items() if n not in stem}


def _rule(policy: Policy, candidates: dict, seen: dict) -> Callable[[str], bool]:
    """The policy's own pick as a predicate on module names (include/exclude not applied)."""
    stem = _stem(list(candidates), seen)
    stage_of = _stages(seen, stem)
    n_stages = max(stage_of.values(), default=0)
    if policy.stages is not None:
        wanted = set(policy.stages)
    elif policy.name == "deep_only":
        wanted = set(range(policy.from_stage if policy.from_stage is not None else n_stages - 1, n_stages + 1))
    else:
        wanted = {1, 2}

    def rule(name: str) -> bool:
        m = candidates[name]
        big = max(m.kernel_size) > 1
        if name in stem or policy.name == "none":
            return False
        if policy.name == "all_3x3":
            return big
        if policy.name == "dw_only":
            return m.groups == m.in_channels == m.out_channels > 1
        return big and stage_of.get(name) in wanted

    return rule


def select(policy: Policy, candidates: dict, seen: dict) -> list[str]:
    """Names of the convs `policy` picks (slots are not included: see `slot_ops`)."""
    rule = _rule(policy, candidates, seen)
    convs = [n for n, m in candidates.items() if not isinstance(m, Slot)]
    return [n for n in convs if (rule(n) or _matches(n, policy.include)) and not _matches(n, policy.exclude)]


def slot_ops(policy: Policy, candidates: dict, seen: dict, op: str) -> dict[str, str]:
    """Slot name → the operator that fills it: `op`, or "conv" where a placement policy or an
    exclude pattern leaves the slot out (module docstring)."""
    slots = [n for n, m in candidates.items() if isinstance(m, Slot)]
    placed = _rule(policy, candidates, seen) if policy.name in PLACEMENT else (lambda _name: True)
    return {n: op if placed(n) and not _matches(n, policy.exclude) else "conv" for n in slots}


def _conv_params(m: nn.Module) -> int:
    if isinstance(m, Slot):
        k = m.kernel_size[0] * m.kernel_size[1]
        return m.out_channels * (m.in_channels // m.groups) * k + (m.out_channels if m.has_bias else 0)
    return sum(p.numel() for p in m.parameters())


def _padding(m: nn.Module, info: dict):
    """`m`'s padding; a conv that pads in its forward instead (timm's `Conv2dSame`/`StdConv2dSame` declare 0
    and pad TensorFlow-style) gets the symmetric 'same' padding, which gives the size the dry pass saw."""
    if isinstance(m.padding, str) or not info:
        return m.padding
    declared = conv_out_hw(info["in_hw"], m.kernel_size, m.stride, m.padding, m.dilation)
    return m.padding if declared == tuple(info["out_hw"]) else resolve_padding(m.kernel_size, None, m.dilation)


def _geometry_kwargs(op: str, m: nn.Module, info: dict, user: dict) -> dict:
    """The geometry and size options `m` passes on to operator `op` (only those it takes)."""
    in_hw = info.get("in_hw")
    opts = op_options(op)
    kw = {}
    if max(m.dilation) > 1:
        if "dilation" not in opts:
            raise ValueError(f"operator {op!r} takes no `dilation`, but the layer it replaces has dilation {m.dilation}")
        kw["dilation"] = m.dilation
    if "padding" in opts:
        kw["padding"] = _padding(m, info)
    if "groups" in opts and m.groups > 1:
        kw["groups"] = m.groups
    if "bias" in opts:
        kw["bias"] = m.has_bias if isinstance(m, Slot) else m.bias is not None
    if "input_size" in opts and "input_size" not in user:
        if in_hw is None:
            raise ValueError(f"operator {op!r} needs the layer's input size, but the dry forward pass never ran it")
        kw["input_size"] = tuple(in_hw)
    return kw


def _make(op: str, m: nn.Module, info: dict, op_kwargs: dict) -> tuple[nn.Module, bool]:
    """Build operator `op` in place of conv/slot `m`; returns (module, projected?).

    A channel-wise operator refuses in != out with a ValueError; it then gets the 1×1 projection.
    """
    kw = {**_geometry_kwargs(op, m, info, op_kwargs), **op_kwargs,
          **(m.op_hints.get(op, {}) if isinstance(m, Slot) else {})}
    cls = get_op(op)
    stride = m.stride if m.stride[0] != m.stride[1] else m.stride[0]
    k = m.kernel_size if m.kernel_size[0] != m.kernel_size[1] else m.kernel_size[0]
    try:
        return cls(m.in_channels, m.out_channels, k, stride=stride, **kw), False
    except ValueError:
        if m.in_channels == m.out_channels:
            raise
    kw.pop("groups", None)
    proj = nn.Conv2d(m.in_channels, m.out_channels, 1, bias=False)
    return nn.Sequential(OrderedDict(proj=proj, op=cls(m.out_channels, m.out_channels, k, stride=stride, **kw))), True


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _adapt(op: str, m: nn.Module, info: dict, kw: dict) -> tuple[dict, list[str]]:
    """`kw` with the options `op` cannot take at layer `m` moved to their nearest valid value (module
    docstring), and a note per change."""
    opts, kw, notes = op_options(op), dict(kw), []

    def change(key, new):
        old = kw.get(key, opts[key].default)
        if old is not None and new is not None and tuple(_pair(old)) != tuple(_pair(new)):
            kw[key] = new
            notes.append(f"{key} {old}→{new}")

    channels, k = m.out_channels, max(m.kernel_size)  # a channel-wise op runs at out_channels (after proj)
    if "group_channels" in opts:
        g = kw.get("group_channels", opts["group_channels"].default)
        change("group_channels", _largest_divisor(channels, g))
    if "scope_size" in opts and min(_pair(kw.get("scope_size", opts["scope_size"].default))) < k:
        change("scope_size", k + 1)
    if "input_size" in opts and info:
        change("input_size", tuple(info["in_hw"]))
    return kw, notes


def _fill(name: str, op: str, m: nn.Module, info: dict, kw: dict, mode: str) -> tuple[nn.Module | None, bool, str]:
    """(module, projected?, note) for layer `name` under `on_incompatible=mode`; module None: keep `m`."""
    notes = []
    if mode == "adapt":
        kw, notes = _adapt(op, m, info, kw)
    try:
        new, projected = _make(op, m, info, kw)
        return new, projected, "adapted: " + ", ".join(notes) if notes else ""
    except ValueError as e:
        reason = str(e)
    if mode == "adapt":
        done = f" after adapting {', '.join(notes)}" if notes else " (no option to adapt)"
        raise IncompatibleLayerError(f"{name}: {reason}{done}; policy.on_incompatible=skip keeps this conv")
    if mode == "error":
        raise IncompatibleLayerError(f"{name}: {reason}; policy.on_incompatible=skip keeps this conv, "
                         "=adapt picks the nearest valid option")
    if isinstance(m, Slot):  # a slot must be filled: the plain conv it stands for
        return _make("conv", m, info, {})[0], False, f"skipped (plain conv): {reason}"
    return None, False, f"skipped: {reason}"


@torch.no_grad()
def _load_conv(new: nn.Module, conv: nn.Module) -> bool:
    """Copy `conv`'s weight and bias into `new`'s conv-shaped kernel (module docstring); False if none fits."""
    prefix = getattr(type(new), "conv_prefix", None)
    if prefix is None or not isinstance(conv, nn.Conv2d):
        return False
    params = dict(new.named_parameters())
    weight, bias = params.get(prefix + "weight"), params.get(prefix + "bias")
    if weight is None or weight.shape[-4:] != conv.weight.shape:
        return False
    weight.copy_(conv.weight.expand_as(weight))
    if bias is not None:
        bias.copy_(conv.bias.expand_as(bias)) if conv.bias is not None else bias.zero_()
    return True


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def replace(model: nn.Module, op="conv", policy="none", *, input_size=None, in_chans: int | None = None,
            init: Callable[[str, nn.Module], None] | None = None, warm_start: bool = False,
            **op_kwargs) -> list[dict]:
    """Fill every `Slot` of `model` and replace the convs `policy` picks by operator `op`, in place.

    `op` is a registered name or a config dict `{"name": ..., "module": ..., <options>}` (`resolve_op`);
    `policy` a name, a config dict or a `Policy`. `input_size` (default 224×224) is the dry pass's input
    size: give the size the model will run at. `init(op, module)` is called on each new module (a backbone's
    own weight init); `warm_start` then copies the replaced conv's weights where the operator can take them.
    Returns the replacement report: one dict per replaced (or skipped) layer.
    """
    op, options = resolve_op(op)
    op_kwargs = {**options, **op_kwargs}
    policy = Policy.parse(policy)
    candidates = _candidates(model)
    has_slots = any(isinstance(m, Slot) for m in candidates.values())
    if not has_slots and (policy.name == "none" and not policy.include or op == "conv"):
        return []
    seen = trace(model, input_size or DEFAULT_INPUT_SIZE, in_chans, candidates)
    picked = [] if op == "conv" else select(policy, candidates, seen)
    targets = {**slot_ops(policy, candidates, seen, op), **{n: op for n in picked}}
    report = []
    for name, m in candidates.items():
        if name not in targets:
            continue
        layer_op = targets[name]
        info = seen.get(name, {})
        new, projected, note = _fill(name, layer_op, m, info, op_kwargs if layer_op == op else {},
                                     policy.on_incompatible)
        started = False
        if new is not None:
            if init is not None:
                init(layer_op, new)
            started = warm_start and not projected and _load_conv(new, m)
            _set(model, name, new)
        report.append({
            "layer": name, "op": layer_op, "kind": "slot" if isinstance(m, Slot) else policy.name,
            "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "input_size": list(info["in_hw"]) if info else None, "projection": projected,
            "params_before": _conv_params(m), "params_after": sum(p.numel() for p in (new or m).parameters()),
            "skipped": new is None or note.startswith("skipped"), "note": note,
            "init": "kept" if new is None else "conv" if started else "fresh",
        })
    skipped = [r["layer"] for r in report if r["skipped"]]
    if report:
        kept = f" ({len(skipped)} kept their conv)" if skipped else ""
        log.info("replaced %d layer(s) by %s%s:\n%s", len(report) - len(skipped), op, kept, format_report(report))
    if skipped:
        log.warning("%d layer(s) kept their conv (policy.on_incompatible=skip; the report's notes say why): %s",
                    len(skipped), ", ".join(skipped))
    return report


def format_report(report: list[dict]) -> str:
    """The report as an aligned text table, with totals."""
    head = ("layer", "kind", "op", "in→out", "k", "stride", "input", "params before→after", "init", "note")
    rows = [(r["layer"], r["kind"], r["op"] + (" +proj" if r["projection"] else ""),
             f"{r['in_channels']}→{r['out_channels']}", "×".join(map(str, r["kernel_size"])),
             "×".join(map(str, r["stride"])), "×".join(map(str, r["input_size"])) if r["input_size"] else "-",
             f"{r['params_before']:,}→{r['params_after']:,}", r.get("init", ""),
             "; ".join(filter(None, (r.get("note"), r.get("warning"))))) for r in report]
    rows.append(("total", "", "", "", "", "", "",
                 f"{sum(r['params_before'] for r in report):,}→{sum(r['params_after'] for r in report):,}", "", ""))
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows])
