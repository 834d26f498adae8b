"""Export models with dynamic operators: `torch.export` programs (.pt2) and ONNX, checked on ONNX Runtime.

Every primitive is traced under `use_backend("export")`, its decomposition into plain PyTorch ops, so the
ONNX graph holds standard operators only, while eager PyTorch keeps the fast kernels: the per-pixel
aggregation (involution, DDF, TVConv, local Deformable Kernels) as K² strided slices of the padded input,
each multiplied by its tap's filter and summed (the reference's unfold would make ONNX Runtime build the
(B, C·K², Ho, Wo) unfolded input, several times slower), the per-sample conv as a grouped conv. The batch
dimension stays symbolic.
Operators whose filters do not depend on the input (TVConv) are exported frozen: `freeze()` folds the
weight generator into constant filters (Chu et al. 2022, Sec. 3.3). An operator that does not export
raises `ExportError` naming the operator and the opset.

`onnx`, `onnxscript` and `onnxruntime` are imported inside the functions that need them, so
`import dynconv` (and training) never loads them.

    program = export_program(model, torch.randn(2, 3, 224, 224))
    torch.export.save(program, "rednet50.pt2")
    export_onnx(model, torch.randn(2, 3, 224, 224), "rednet50.onnx")
    export_aoti(model, torch.randn(2, 3, 224, 224), "rednet50_aoti.pt2")   # the fused kernels, for CPU deployment
    ort_max_rel_diff("rednet50.onnx", model, [torch.randn(1, 3, 224, 224), torch.randn(3, 3, 224, 224)])
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from .functional.backend import use_backend

__all__ = ["ExportError", "deploy_copy", "export_program", "export_onnx", "export_aoti", "ort_max_rel_diff",
           "aoti_max_rel_diff", "float32_error", "ort_tolerance", "DEFAULT_OPSET"]

DEFAULT_OPSET = 20  # torch.onnx's default in torch 2.14; DeformConv (DCNv2) needs >= 19


class ExportError(RuntimeError):
    """An operator of the model cannot be exported (the message names it and the opset)."""


def deploy_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every freezable operator frozen (the original is untouched)."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if m is not model and callable(getattr(m, "freeze", None)) and not getattr(m, "frozen", False):
            m.freeze()
    return model


def _batch_dims(example: Tensor, dynamic_batch: bool):
    return ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None


def _traceable(example: Tensor, dynamic_batch: bool) -> Tensor:
    """`example`, or two copies of a batch-1 one when the batch is to stay symbolic (torch.export specialises a
    size-1 dimension to the constant 1)."""
    if dynamic_batch and example.shape[0] == 1:
        return example.expand(2, *example.shape[1:]).contiguous()
    return example


def _trace(model: nn.Module, example: Tensor, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """torch.export specialises a size-1 dimension to the constant 1 (its 0/1 specialisation), so a batch-1 example
    of a symbolic batch is traced as two copies of itself; the program still serves batch 1."""
    example = _traceable(example, dynamic_batch)
    with use_backend("export"), torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=_batch_dims(example, dynamic_batch))


# onnxscript's rewrite rules that never fire on these graphs but cost time quadratic in their size: SlicesSplit matches
# every pair of Slice nodes of one input (it only rewrites two that halve the last axis, which no tap does), and the
# tap-by-tap decomposition has 2·K² Slices per layer: 36 of RedNet-26's 52 s of graph optimisation (onnxscript 0.7.2)
_SLOW_REWRITES = frozenset({"SlicesSplit"})


@contextlib.contextmanager
def _without_slow_rewrites():
    """onnxscript's graph optimizer (`torch.onnx.export(optimize=True)`) without the rules of `_SLOW_REWRITES`;
    a version of onnxscript without the default rule list runs them all."""
    from onnxscript import rewriter

    default = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if default is None:
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in default if getattr(r, "name", None) not in _SLOW_REWRITES)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = default


def _to_checked_onnx(program: torch.export.ExportedProgram, opset: int):
    """ONNX from an exported program, validated by the ONNX checker. onnxscript's graph optimizer
    can emit nodes out of topological order (seen with Deformable Kernels' clamps); the graph is
    then exported again without it, since ONNX Runtime applies its own optimisations at load."""
    import onnx

    for optimize in (True, False):
        with _without_slow_rewrites():
            proto = torch.onnx.export(program, dynamo=True, opset_version=opset, optimize=optimize,
                                      verbose=False).model_proto
        try:
            onnx.checker.check_model(proto, full_check=True)
            return proto
        except onnx.checker.ValidationError as err:
            problem = err
    raise problem


def _operators(model: nn.Module) -> dict[type, tuple[str, nn.Module]]:
    """The first module of each dynconv operator class in `model`: class → (module path, module)."""
    found: dict[type, tuple[str, nn.Module]] = {}
    for name, m in model.named_modules():
        if getattr(type(m), "op_name", None) and type(m) not in found:
            found[type(m)] = (name or type(m).__name__, m)
    return found


def _culprit(model: nn.Module, example: Tensor, convert, reason: str) -> ExportError | None:
    """Export each operator class alone, on the input it sees in `model`, to name the one that fails
    (None when each exports alone: the failure is elsewhere in the model)."""
    ops, inputs = _operators(model), {}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.setdefault(type(m), a[0]))
             for _, m in ops.values()]
    try:
        with use_backend("export"), torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    for cls, (path, m) in ops.items():
        try:
            convert(m, inputs[cls])
        except Exception as err:  # any failure of the export stack: this is the operator to name
            return ExportError(f"operator {cls.op_name!r} ({cls.__name__}, first at '{path}') {reason}: "
                               f"{_first_line(err)}")
    return None


def _first_line(err: Exception) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:400]


def export_program(model: nn.Module, example: Tensor, *, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """`torch.export` program of `deploy_copy(model)` traced on `example` (B, C, H, W), batch symbolic."""
    model = deploy_copy(model)
    try:
        return _trace(model, example, dynamic_batch)
    except Exception:
        fail = _culprit(model, example, lambda m, x: _trace(m, x, dynamic_batch), "cannot be captured by torch.export")
        if fail is None:
            raise
    raise fail


def export_onnx(model: nn.Module, example: Tensor, path: str | Path | None = None, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True):
    """ONNX (`torch.onnx.export(..., dynamo=True)`) of `deploy_copy(model)`, checked, saved to `path`
    if given; returns the `onnx.ModelProto`. Raises `ExportError` naming an operator that fails."""
    import onnx

    program = export_program(model, example, dynamic_batch=dynamic_batch)
    try:
        proto = _to_checked_onnx(program, opset)
    except Exception:
        fail = _culprit(deploy_copy(model), example, lambda m, x: _to_checked_onnx(_trace(m, x, dynamic_batch), opset),
                        f"has no valid lowering to ONNX opset {opset}")
        if fail is None:
            raise
    else:
        if path is not None:
            onnx.save(proto, str(path))
        return proto
    raise fail


def export_aoti(model: nn.Module, example: Tensor, path: str | Path, *, dynamic_batch: bool = True,
                freezing: bool = True) -> str:
    """An AOTInductor package (`torch._inductor.aoti_compile_and_package`) of `deploy_copy(model)` at `path`
    (a .pt2 file), the batch symbolic. Unlike `export_onnx` it keeps the fast backend: the per-pixel operators
    stay the custom ops with the compiled CPU kernels (involution, DDF, TVConv, local Deformable Kernels), which
    the package calls by name, and inductor compiles the rest (with `freezing`, the default: BatchNorm folded
    into the convolutions, weights pre-packed for oneDNN). Load it with `torch._inductor.aoti_load_package(path)`
    in a process that has imported `dynconv` (which registers the ops); returns the path."""
    model = deploy_copy(model)
    example = _traceable(example, dynamic_batch)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=_batch_dims(example, dynamic_batch))
    from torch._inductor import aoti_compile_and_package

    return aoti_compile_and_package(program, package_path=str(path), inductor_configs={"freezing": freezing})


def ort_max_rel_diff(onnx_path: str | Path, model: nn.Module, inputs: list[Tensor]) -> float:
    """max |ORT − PyTorch| / max |PyTorch| over `inputs`, ONNX Runtime on CPU against eager `model`
    (eval mode, its default backend). Raises if PyTorch's output is not finite."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return _max_rel_diff(lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]), model, inputs,
                         "ONNX Runtime")


def aoti_max_rel_diff(package_path: str | Path, model: nn.Module, inputs: list[Tensor]) -> float:
    """max |package − PyTorch| / max |PyTorch| over `inputs`, the AOTInductor package of `export_aoti` against
    eager `model` (eval mode). Raises if PyTorch's output is not finite."""
    from torch._inductor import aoti_load_package

    package = aoti_load_package(str(package_path))
    return _max_rel_diff(package, model, inputs, "the AOTInductor package")


def _max_rel_diff(run, model: nn.Module, inputs: list[Tensor], engine: str) -> float:
    model = deploy_copy(model)
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            ref = model(x).double()
            if not torch.isfinite(ref).all():
                raise ValueError("the PyTorch output is not finite; calibrate BatchNorm statistics before comparing")
            out = run(x).double()
        if out.shape != ref.shape:
            raise ValueError(f"{engine} output {tuple(out.shape)} != PyTorch output {tuple(ref.shape)}")
        worst = max(worst, ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
    return worst


def float32_error(model: nn.Module, inputs: list[Tensor]) -> float:
    """max |float32 − float64| / max |float64| of `model`'s deploy copy over `inputs`: the rounding that PyTorch's
    own float32 output carries."""
    model32 = deploy_copy(model)
    model64 = deploy_copy(model).double()
    errors = []
    with torch.no_grad():
        for x in inputs:
            ref = model64(x.double())
            errors.append(((model32(x).double() - ref).abs().max() / ref.abs().max()).item())
    return max(errors)


def ort_tolerance(model: nn.Module, inputs: list[Tensor]) -> float:
    """The bound on `ort_max_rel_diff` of a faithful export: max(1e-4, 4 × `float32_error`). ONNX Runtime sums in
    another order, which can add as much rounding as float32 adds in PyTorch itself, and random weights with
    eval-mode BatchNorm amplify that rounding well beyond 1e-4 in some models (MobileNetV2 + DDF)."""
    return max(1e-4, 4 * float32_error(model, inputs))
