"""Every operator of `dynconv.list_ops()`, every sample its `Domain` gives, every execution path, held to the
reference backend (tests/dynconv/conformance.py). A new operator is covered by declaring its domain.

What runs where. The CI run (`make test`):
- eager, float64: fast (recompute on), fast with the recompute off, the compiled kernels off
  (`DYNCONV_NATIVE=0`, for the operators that call a `dynconv::` custom op), each in train, eval and, for
  operators with BatchNorm, frozen-BatchNorm training; every sample;
- bf16 autocast (float32 module): every sample, train mode;
- `torch.export` (forward, eval): every sample (a `slow_compile` operator: its compile sample; all under deep);
- inductor, float64, train: static on batch 1 and an odd batch at stride 2 (batch 0 under deep), the compiled kernels off
  on the odd batch, and `dynamic=True` on a shape the first compile never saw (odd, non-square, another batch; for
  the operators where inductor fails symbolic spatial sizes, a changing batch at one size, the failure under deep); an
  operator that declares `slow_compile` (DK+DCN: minutes per compile) compiles the odd batch only, at its smallest
  kernel size;
- the Triton kernels under `TRITON_INTERPRET=1`: the odd-batch sample of each custom-op operator, in one child process;
- Hypothesis: 4 drawn samples per operator (derandomized), fast against reference in a drawn mode.
`DYNCONV_CONFORMANCE=deep` adds batch 0 under inductor, the slow-compile operators' other compiles and exports, a
second new shape under `dynamic=True` and 300 drawn samples per operator.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch._dynamo.utils import counters

import dynconv
from dynconv.functional.geometry import conv_out_size

from .conformance import (MODES, OPS, Result, Sample, build, compare, custom_ops, domain_error, environment, make_input,
                          outside, reference, samples, set_mode, step, tolerance)

settings.register_profile("ci", derandomize=True, max_examples=4, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEEP = os.environ.get("DYNCONV_CONFORMANCE", "ci") == "deep"  # the full matrix, on demand
PROFILE = settings.get_profile("deep" if DEEP else "ci")  # for this module's property test only


def _domain(name):
    return dynconv.get_op(name).domain


def _modes(name):
    return MODES if _domain(name).batchnorm else ("train", "eval")


KERNEL_OPS = [n for n in OPS if custom_ops(n)]  # where DYNCONV_NATIVE=0 and the Triton kernels change the code run


def _eager_paths(name):
    cls = dynconv.get_op(name)
    return ["fast"] + (["no_recompute"] if hasattr(cls, "recompute") else []) + (["native_off"] * (name in KERNEL_OPS))


CASES = [(n, s) for n in OPS for s in samples(_domain(n))]


def _compile_samples(name):
    """Batch 1 and an odd batch at stride 2 (the domain's largest), and batch 0 under DYNCONV_CONFORMANCE=deep (every
    path runs batch 0 eagerly; inductor's own Conv2d backward fails there); for an operator that declares a slow
    compile, the odd batch only, unless deep."""
    found = {}
    for s in samples(_domain(name)):
        key = min(s.batch, 2) if s.batch % 2 == 0 else 1 if s.batch == 1 else 3
        if s.stride == max(_domain(name).strides) and key in (0, 1, 3) and key not in found:
            found[key] = s
    keys = (0, 1, 3) if DEEP else (3,) if _domain(name).slow_compile else (1, 3)
    return [found[k] for k in keys]


EAGER = [pytest.param(n, s, m, p, id=f"{n}-{s}-{m}-{p}") for n, s in CASES for m in _modes(n) for p in _eager_paths(n)]


@functools.lru_cache(maxsize=None)
def _reference(name, sample, mode, dtype=torch.float64, autocast=False):
    module = set_mode(build(name, sample, dtype), mode)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return reference(module, make_input(name, sample, dtype))


def _run(name, sample, mode, path, dtype=torch.float64):
    module = set_mode(build(name, sample, dtype), mode)
    if path == "no_recompute":
        for m in module.modules():
            if hasattr(m, "recompute"):
                m.recompute = False
    with environment(DYNCONV_NATIVE="0" if path == "native_off" else os.environ.get("DYNCONV_NATIVE", "1")):
        return step(module, make_input(name, sample, dtype))


@pytest.mark.parametrize("name,sample,mode,path", EAGER)
def test_eager_path_equals_reference(name, sample, mode, path):
    if outside(name, sample, mode):
        with domain_error():
            _run(name, sample, mode, path)
        return
    expected = _reference(name, sample, mode)
    compare(_run(name, sample, mode, path), expected, tolerance(torch.float64, sample, _domain(name).channels))


@pytest.mark.parametrize("name,sample", [pytest.param(n, s, id=f"{n}-{s}") for n, s in CASES])
def test_bf16_autocast_equals_reference_under_autocast(name, sample):
    """A float32 module under CPU bf16 autocast: the output in bf16, every gradient in its parameter's float32 and
    strides, the values within bf16 rounding of the reference backend under the same autocast."""
    module = set_mode(build(name, sample, torch.float32), "train")
    x = make_input(name, sample, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), domain_error() if outside(name, sample, "train") else nullcontext():
        actual = step(module, x)
    if outside(name, sample, "train"):
        return
    expected = _reference(name, sample, "train", torch.float32, autocast=True)
    assert actual.out.dtype == expected.out.dtype
    assert all(g is None or g.dtype == torch.float32 for g in actual.grads.values())
    compare(actual, expected, tolerance(torch.bfloat16, sample, _domain(name).channels))


@pytest.mark.parametrize("name,sample", [pytest.param(n, s, id=f"{n}-{s}") for n, s in CASES
                                         if DEEP or not _domain(n).slow_compile or s in _compile_samples(n)])
def test_export_forward_equals_reference(name, sample):
    module = set_mode(build(name, sample), "eval")
    x = make_input(name, sample)
    program = torch.export.export(module, (x,))
    with torch.no_grad():
        out = program.module()(x)
    actual = Result(out, None, buffers={n: b for n, b in module.named_buffers()})
    compare(actual, _reference(name, sample, "eval"), tolerance(torch.float64, sample, _domain(name).channels),
            grads=False)


def _inductor_samples(name):
    """`_compile_samples`; in CI a slow-compile operator's at its smallest kernel size (DK+DCN at K=1: the same ops
    in one tap term instead of nine, 25 s of inductor on a cold cache instead of 104 s), under deep its own."""
    found = _compile_samples(name)
    if DEEP or not _domain(name).slow_compile:
        return found
    return [dataclasses.replace(s, kernel_size=min(_domain(name).kernel_sizes)) for s in found]


COMPILED = [pytest.param(n, s, p, id=f"{n}-{s}-{p}") for n in OPS for s in _inductor_samples(n)
            for p in (["inductor", "inductor_native_off"] if s.batch == 3 and n in KERNEL_OPS else ["inductor"])]


def _compiled_step(name, sample, mode="train", native=True, **compile_kw):
    """A fresh module of `sample` compiled with inductor: one step and its Result."""
    torch._dynamo.reset()
    module = set_mode(build(name, sample), mode)
    with environment(DYNCONV_NATIVE=os.environ.get("DYNCONV_NATIVE", "1") if native else "0"):
        return step(module, make_input(name, sample), fn=torch.compile(module, fullgraph=True, **compile_kw))


@pytest.mark.parametrize("name,sample,path", COMPILED)
def test_inductor_equals_reference(name, sample, path):
    """Inductor, fullgraph, train mode. Gradient strides are held to autograd's layout contract (equal at every
    dimension of size > 1): inductor itself returns an nn.Conv2d weight's gradient with other strides at size-1
    dimensions."""
    native = not path.endswith("native_off")
    if outside(name, sample, "train"):
        with domain_error(compiled=True):
            _compiled_step(name, sample, native=native)
        return
    expected = _reference(name, sample, "train")
    rtol = tolerance(torch.float64, sample, _domain(name).channels)
    try:
        actual = _compiled_step(name, sample, native=native)
    except Exception as e:
        if not (sample.batch == 0 and "aten.convolution_backward" in str(e)):
            raise
        # PyTorch's own: inductor's Conv2d backward at batch 0 returns other strides than its meta kernel; the
        # forward (and BatchNorm statistics) are still held, on a fresh module
        assert _inductor_conv_backward_fails_at_batch_0(), f"{name} fails where nn.Conv2d does not: {e}"
        module = set_mode(build(name, sample), "train")
        with torch.no_grad():
            out = torch.compile(module, fullgraph=True)(make_input(name, sample))
        compare(Result(out, None, buffers=dict(module.named_buffers())), expected, rtol, grads=False)
        return
    compare(actual, expected, rtol, exact_strides=False)


@functools.lru_cache(maxsize=None)
def _inductor_conv_backward_fails_at_batch_0() -> bool:
    """Whether inductor fails the backward of a plain `nn.Conv2d` on an empty batch (torch 2.14.1 does: its
    compiled convolution_backward breaks the strides its meta kernel gives). Where it does not, batch 0 must
    pass compiled through every operator."""
    torch._dynamo.reset()
    conv = torch.compile(torch.nn.Conv2d(8, 16, 3, 2, 1).double(), fullgraph=True)
    try:
        conv(torch.zeros(0, 8, 6, 7, dtype=torch.float64, requires_grad=True)).sum().backward()
    except Exception as e:
        return "aten.convolution_backward" in str(e)
    finally:
        torch._dynamo.reset()
    return False


NEW_SHAPES = ((2, (7, 11)), (5, (12, 5))) if DEEP else ((2, (7, 11)),)  # each one more compile (inductor CPU convs)
SYMBOLIC_STRIDE_ERROR = "cannot determine truth value of Relational"  # inductor cannot order symbolic strides
# where torch 2.14's inductor fails that way (the batched and grouped convolutions): CI runs their batch-alone
# dynamic check only; DYNCONV_CONFORMANCE=deep tries symbolic spatial sizes again and reports an expected failure
SYMBOLIC_SPATIAL_FAILS = {"condconv", "dyconv", "odconv", "dk_global", "dcd", "dcd_mbv2"}


@pytest.mark.parametrize("name", [n for n in OPS if DEEP or not _domain(n).slow_compile])
def test_inductor_dynamic_shapes_equal_reference(name):
    """Compiled with `dynamic=True` on an odd batch at stride 2, then run on shapes the first compile never saw
    (odd, non-square, other parities; one in CI, two under DYNCONV_CONFORMANCE=deep). A fixed-size operator gives its one-line size error instead. (Inductor's CPU
    convolutions specialise on the input size, so a new shape may compile again even for a plain nn.Conv2d: the
    results are what is held.) Where inductor itself fails on symbolic spatial sizes (it cannot order the strides
    of some grouped and batched convolutions), a batch that changes at a fixed size must still be exact, and the
    case is reported as an expected failure of PyTorch's (under deep; CI runs the batch check alone for the
    operators of `SYMBOLIC_SPATIAL_FAILS`)."""
    k = _compile_samples(name)[-1].kernel_size
    first = Sample(3, (10, 7), k, max(_domain(name).strides))  # no size equal to the channels (one symbol for both)
    if name in SYMBOLIC_SPATIAL_FAILS and not DEEP:
        _assert_batch_alone_dynamic(name, first)
        return
    try:
        _dynamic_shapes(name, first)
    except torch._inductor.exc.InductorError as e:
        if SYMBOLIC_STRIDE_ERROR not in str(e):
            raise
        _assert_batch_alone_dynamic(name, first)
        pytest.xfail(f"inductor fails {name} on symbolic spatial sizes (PyTorch: {SYMBOLIC_STRIDE_ERROR})")


def _dynamic_shapes(name, first):
    torch._dynamo.reset()
    module = set_mode(build(name, first), "train")
    compiled = torch.compile(module, dynamic=True, fullgraph=True)
    tol = functools.partial(tolerance, torch.float64, channels=_domain(name).channels)
    expected = _reference(name, first, "train")
    compare(step(module, make_input(name, first), fn=compiled), expected, tol(first), exact_strides=False)
    for batch, size in NEW_SHAPES:
        x = make_input(name, first, batch=batch, size=size)
        if _domain(name).fixed_input_size:
            with pytest.raises((ValueError, torch._dynamo.exc.Unsupported),
                               match=rf"{name} was built for {first.size[0]}x{first.size[1]}"):
                compiled(x)
            continue
        expected = reference(module, x)
        compare(step(module, x, fn=compiled), expected, tol(Sample(batch, size, first.kernel_size, first.stride)),
                exact_strides=False)


def _assert_batch_alone_dynamic(name, first):
    """The default compile (automatic dynamic shapes) of a fresh module: batches 3 and 2 at one size, exact."""
    torch._dynamo.reset()
    module = set_mode(build(name, first), "train")
    compiled = torch.compile(module, fullgraph=True)
    for b in (3, 2):
        x = make_input(name, first, batch=b)
        expected = reference(module, x)
        compare(step(module, x, fn=compiled), expected, tolerance(torch.float64, Sample(b, first.size, first.kernel_size,
                first.stride), _domain(name).channels), exact_strides=False)


TRITON_SAMPLES = 1  # per kernel operator, under the interpreter (slow): the odd batch at stride 2, channels_last


def _triton_checks() -> dict:
    """{(op, sample): ""} or the failure, for each operator's last TRITON_SAMPLES compile samples: fast path
    (the Triton kernels, for CPU tensors under the interpreter) against the reference, float64, train mode."""
    results = {}
    for name in KERNEL_OPS:
        for sample in _compile_samples(name)[-TRITON_SAMPLES:]:
            try:
                module = set_mode(build(name, sample), "frozen_bn" if outside(name, sample, "train") else "train")
                x = make_input(name, sample)
                expected = reference(module, x)  # first: the step updates the module's BatchNorm statistics
                compare(step(module, x), expected, tolerance(torch.float64, sample, 8))
                results[f"{name}-{sample}"] = ""
            except Exception as e:  # reported per case by the parent test
                results[f"{name}-{sample}"] = f"{type(e).__name__}: {e}"[:3000]
    return results


@pytest.fixture(scope="module")
def triton_results():
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", DYNCONV_TRITON_INTERPRET="1", DYNCONV_NATIVE="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    code = "import json, tests.dynconv.test_conformance as t; print(json.dumps(t._triton_checks()))"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-6000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"{n}-{s}" for n in KERNEL_OPS for s in _compile_samples(n)[-TRITON_SAMPLES:]])
def test_triton_interpreter_equals_reference(case, triton_results):
    assert triton_results[case] == "", triton_results[case]


@st.composite
def drawn(draw, name):
    d = _domain(name)
    return Sample(draw(st.integers(0, 4)), (draw(st.integers(1, 10)), draw(st.integers(1, 10))),
                  draw(st.sampled_from(d.kernel_sizes)), draw(st.sampled_from(d.strides)),
                  draw(st.sampled_from(d.dilations)), draw(st.sampled_from((1, *d.groups))),
                  draw(st.sampled_from(("contiguous", "channels_last", "strided"))))


@pytest.mark.parametrize("name", OPS)
@settings(PROFILE)
@given(data=st.data())
def test_property_fast_equals_reference(name, data):
    """Shapes and options drawn from the domain: the fast path equals the reference in every mode, and a shape
    outside the domain (an output smaller than one pixel) gives the operator's one-line error."""
    sample = data.draw(drawn(name))
    mode = data.draw(st.sampled_from(_modes(name)))
    pad = sample.dilation * (sample.kernel_size - 1) // 2
    fits = min(conv_out_size(n, sample.kernel_size, sample.stride, pad, sample.dilation) for n in sample.size) >= 1
    module = set_mode(build(name, sample), mode)
    x = make_input(name, sample)
    if not fits:
        with pytest.raises(ValueError, match="too small|smaller"):
            module(x)
        return
    if outside(name, sample, mode):
        with domain_error():
            step(module, x)
        return
    expected = reference(module, x)  # first: the step updates the module's BatchNorm statistics
    compare(step(module, x), expected, tolerance(torch.float64, sample, _domain(name).channels))


def test_domains_are_declared_truthfully():
    """Every declared option builds; `batchnorm` says whether the module has BatchNorm; a fixed-size operator takes
    `input_size`."""
    for name in OPS:
        d = _domain(name)
        for sample in samples(d):
            module = build(name, sample)
            has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
            assert has_bn == d.batchnorm, f"{name}: domain.batchnorm={d.batchnorm} but the module says {has_bn}"
        assert d.fixed_input_size == ("input_size" in dynconv.op_options(name)), name


def test_tolerance_catches_a_dropped_bias_and_a_wrong_tap():
    """The float64 tolerance is tight enough that the bugs it exists for fail it: the span conv's bias left out,
    and every tap reading its neighbour (the input shifted by one column)."""
    sample = Sample(2, (7, 9), 3)
    module = set_mode(build("involution", sample), "train")
    x = make_input("involution", sample)
    expected = reference(module, x)
    rtol = tolerance(torch.float64, sample, 8)
    compare(step(module, x), expected, rtol)
    no_bias = set_mode(build("involution", sample), "train")
    with torch.no_grad():
        no_bias.conv2.conv.bias.zero_()
    with pytest.raises(AssertionError):
        compare(step(no_bias, x), expected, rtol)
    shifted = set_mode(build("involution", sample), "train")
    with pytest.raises(AssertionError):
        compare(step(shifted, x, fn=lambda xi: shifted(xi.roll(1, -1))), expected, rtol)
