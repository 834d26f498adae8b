"""dynconv.export at the operator level: the export backend's decomposition, lazy imports, freezing, the
optimiser fallback, clear failures."""
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dynconv
from dynconv.export import ExportError, deploy_copy, export_onnx, export_program, ort_max_rel_diff

from .conformance import OPS, build, compare, make_input, reference, samples, set_mode, step, tolerance

ROOT = Path(__file__).resolve().parents[2]
CASES = [(n, s) for n in OPS for s in samples(dynconv.get_op(n).domain)]


@pytest.mark.parametrize("name,sample", [pytest.param(n, s, id=f"{n}-{s}") for n, s in CASES])
def test_export_backend_equals_reference(name, sample):
    """The export backend (what `dynconv.export` traces) on every conformance sample, eval mode, float64:
    output, input gradient and parameter gradients equal the reference backend's."""
    module = set_mode(build(name, sample), "eval")
    x = make_input(name, sample)
    with dynconv.use_backend("export"):
        actual = step(module, x)
    # the gradients' layout contract (DDP's buckets) binds the training paths; this backend serves inference
    actual.strides = {n: (param, param) for n, (_, param) in actual.strides.items()}
    compare(actual, reference(module, x), tolerance(torch.float64, sample, dynconv.get_op(name).domain.channels))


@pytest.mark.parametrize("op,kwargs", [("involution", {}), ("ddf", {}), ("ddf", {"kernel_combine": "add"}),
                                       ("tvconv", {"input_size": (9, 9)}), ("dk_local", {})],
                         ids=["involution", "ddf-mul", "ddf-add", "tvconv", "dk_local"])
def test_exported_per_pixel_ops_never_unfold_the_input(op, kwargs):
    """No tensor of the exported program holds the K² taps of every channel, (B, C·K², Ho, Wo): the aggregation
    is traced as shifted slices summed tap by tap, and the reference decomposition would hold one."""
    K, B, C, H = (7 if op == "involution" else 3), 4, 32, 9  # TVConv's frozen (1, C·K², H, W) filter: unfolded / B
    model = nn.Sequential(dynconv.create_op(op, C, C, K, **kwargs)).eval()
    x = torch.randn(B, C, H, H)
    unfolded = B * C * K * K * H * H

    def largest(program):  # over the graph and any subgraphs
        return max(n.meta["val"].numel() for gm in program.graph_module.modules()
                   if isinstance(gm, torch.fx.GraphModule) for n in gm.graph.nodes
                   if isinstance(n.meta.get("val"), torch.Tensor))

    assert largest(export_program(model, x, dynamic_batch=False)) < unfolded / 2
    with dynconv.use_backend("reference"), torch.no_grad():
        assert largest(torch.export.export(deploy_copy(model), (x,))) >= unfolded


def test_onnx_graph_optimised_without_the_quadratic_rewrite(monkeypatch):
    """export_onnx runs onnxscript's graph optimizer without SlicesSplit (matched against every pair of Slices: 36 of
    RedNet-26's 52 s of optimisation), puts the rule list back afterwards, and the graph still comes out optimised:
    per tap two slices of x, one of the filter, a multiply and an add, no constant, cast or reshape left over.
    No autocast region is traced either (the primitives enter one only while autocast is on)."""
    from onnxscript import rewriter

    from dynconv.export import _without_slow_rewrites

    names = lambda: {getattr(r, "name", None) for r in rewriter._DEFAULT_REWRITE_RULES}  # noqa: E731
    assert "SlicesSplit" in names()
    with _without_slow_rewrites():
        assert "SlicesSplit" not in names() and "CastCast" in names()
    assert "SlicesSplit" in names()
    slices_split = next(r for r in rewriter._DEFAULT_REWRITE_RULES if getattr(r, "name", None) == "SlicesSplit")

    def tried(*args, **kwargs):
        raise AssertionError("SlicesSplit ran")
    monkeypatch.setattr(slices_split, "try_rewrite", tried)
    model = nn.Sequential(dynconv.create_op("involution", 16, 16, 7)).eval()
    program = export_program(model, torch.randn(2, 16, 9, 9))
    assert not [n for n in program.graph.nodes if "autocast" in str(n.target)]
    ops = Counter(n.op_type for n in export_onnx(model, torch.randn(2, 16, 9, 9)).graph.node)
    assert ops["Mul"] == 49 and ops["Add"] == 48 and ops["Slice"] <= 3 * 49
    assert not {"Constant", "Cast", "CastLike"} & set(ops) and ops["Reshape"] <= 3
    assert "SlicesSplit" in names()


@pytest.mark.parametrize("op,kwargs", [("condconv", {}), ("dyconv", {}), ("ddf", {"kernel_combine": "add"})],
                         ids=["condconv", "dyconv", "ddf-add"])
def test_operator_alone_matches_on_onnx_runtime(op, kwargs, tmp_path):
    """The operators whose paper models export only under DYNCONV_CONFORMANCE=deep (tests/models/test_export.py)
    still run on ONNX Runtime in CI: alone, at stride 2, with a symbolic batch, batches 1 and 3."""
    from dynconv.export import ort_tolerance

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), dynconv.create_op(op, 16, 16, 3, stride=2, **kwargs)).eval()
    export_onnx(model, torch.randn(2, 3, 9, 8), tmp_path / "op.onnx")
    x = [torch.randn(b, 3, 9, 8) for b in (1, 3)]
    assert ort_max_rel_diff(tmp_path / "op.onnx", model, x) < ort_tolerance(model, x)


def test_training_imports_no_onnx():
    code = ("import sys, dynconv, dynconv.export, models, models.export, engine.trainer; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxscript', 'onnxruntime')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_deploy_copy_freezes_tvconv_and_keeps_the_original():
    model = nn.Sequential(dynconv.create_op("tvconv", 8, 8, 3, input_size=(8, 8)))
    frozen = deploy_copy(model)
    assert frozen[0].frozen and not frozen.training
    assert not model[0].frozen and model.training
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model.eval()(x))


def _onnx_ops(proto) -> set[str]:
    return {n.op_type for n in proto.graph.node}


def test_deformable_kernels_export_without_the_broken_optimisation(tmp_path):
    """onnxscript's optimiser mis-orders the global DK's clamped scope sampling; the export falls back to the
    unoptimised graph."""
    model = nn.Sequential(dynconv.create_op("dk_global", 8, 8, 3)).eval()
    proto = export_onnx(model, torch.randn(2, 8, 6, 6), tmp_path / "dk.onnx")
    assert "Gather" in _onnx_ops(proto) and not proto.functions
    x = [torch.randn(b, 8, 6, 6) for b in (1, 3)]
    assert ort_max_rel_diff(tmp_path / "dk.onnx", model, x) < 1e-4


def test_local_deformable_kernel_exports_compactly_and_matches_the_fused_kernel(tmp_path):
    """ONNX Runtime runs the export decomposition (each tap's kernel resampled by one gather of its four
    bilinear corners), eager PyTorch the compiled kernel: equal, with taps leaving the scope, offset
    groups, stride 2 and a non-square scope."""
    torch.manual_seed(0)
    dk = dynconv.create_op("dk_local", 8, 8, 3, stride=2, offset_groups=2, scope_size=(4, 5))
    with torch.no_grad():
        dk.rotation_conv.weight.normal_(0, 0.3)
        dk.rotation_conv.bias.normal_(0, 0.7)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), dk).eval()
    proto = export_onnx(model, torch.randn(2, 3, 9, 7), tmp_path / "dk.onnx")
    assert sum(n.op_type == "GatherElements" for n in proto.graph.node) == 9  # one per tap, not per corner
    x = [torch.randn(b, 3, 9, 7) for b in (1, 3)]
    # float32 rounding of the longest sum (3 input channels, then 9 taps of 4 corners) in either order
    assert ort_max_rel_diff(tmp_path / "dk.onnx", model, x) < 2 * (3 + 9 * 4) * torch.finfo(torch.float32).eps


def test_dcn_exports_at_opset_19_and_fails_clearly_below():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), dynconv.create_op("dcn", 8, 8, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    assert "DeformConv" in _onnx_ops(export_onnx(model, x, opset=19))
    with pytest.raises(ExportError, match=r"operator 'dcn' \(DCN, first at '1'\) .*ONNX opset 18") as err:
        export_onnx(model, x, opset=18)
    assert err.value.__cause__ is None and err.value.__context__ is None  # no chained deep trace


def test_a_batch_1_example_exports_a_symbolic_batch():
    """torch.export would specialise a batch-1 example's batch to 1 (`Constraints violated (batch)`); the program
    traced from it serves other batch sizes too."""
    from dynconv.export import export_program

    model = nn.Sequential(dynconv.create_op("involution", 16, 16, 3), nn.BatchNorm2d(16)).eval()
    program = export_program(model, torch.randn(1, 16, 6, 6))
    for batch in (1, 3):
        x = torch.randn(batch, 16, 6, 6)
        with torch.no_grad(), dynconv.use_backend("reference"):
            torch.testing.assert_close(program.module()(x), model(x))
