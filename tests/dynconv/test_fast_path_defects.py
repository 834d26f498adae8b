"""The five silent fast-path defects of the conformance issue, each in the configuration a user met it, against the
reference backend with the same weights, input and output gradient. They need nothing but `create_op`, so they run
on any commit (each failed before its fix); the conformance suite covers the same paths for every operator."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynconv

from .conformance import Sample, tolerance
from .op_checks import OpRecord

ROOT = Path(__file__).resolve().parents[2]


def _grads(module, x, g, fn=None):
    fn = module if fn is None else fn
    xi = x.detach().clone().requires_grad_()
    out = fn(xi)
    out.backward(g)
    return [out.detach(), xi.grad] + [p.grad for p in module.parameters()]


def _assert_matches_reference(module, x, fn=None, sample=None):
    with dynconv.use_backend("reference"):
        ref = copy.deepcopy(module)
        out = ref(x)
    g = torch.randn_like(out)
    with dynconv.use_backend("reference"):
        expected = _grads(ref, x, g)
    actual = _grads(module, x, g, fn)
    rtol = tolerance(x.dtype, sample, x.shape[1])
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=0, atol=rtol * float(e.abs().max()), msg=lambda m: f"tensor {i}: {m}")


def test_compiled_stride2_involution_input_gradient(K=7):
    """Defect 1: inductor's ceil_mode average-pool backward gave a 30-48 % wrong input gradient."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = dynconv.create_op("involution", 32, 32, K, stride=2).double().train()
    x = torch.randn(2, 32, 17, 17, dtype=torch.float64)
    _assert_matches_reference(m, x, torch.compile(m), Sample(2, (17, 17), K, 2))


def test_frozen_batchnorm_through_the_recompute():
    """Defect 2: the recompute rebuilt the generator with batch statistics where the forward used running ones."""
    torch.manual_seed(0)
    m = dynconv.create_op("involution", 32, 32, 7, stride=2).double().train()
    m.conv1.bn.running_mean.normal_()
    m.conv1.bn.running_var.uniform_(0.5, 2)
    m.conv1.bn.eval()
    _assert_matches_reference(m, torch.randn(3, 32, 9, 12, dtype=torch.float64), sample=Sample(3, (9, 12), 7, 2))


def test_compiled_dk_local_at_batch_1(stride=2):
    """Defect 3: the real kernel returned other strides than the fake kernel promised (an assertion under compile)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = dynconv.create_op("dk_local", 8, 8, 3, stride=stride).double().train()
    torch.nn.init.normal_(m.rotation_conv.weight, std=0.3)
    _assert_matches_reference(m, torch.randn(1, 8, 9, 10, dtype=torch.float64), torch.compile(m),
                              Sample(1, (9, 10), 3, stride))


@pytest.mark.parametrize("name", ["involution", "ddf", "dk_local"])
def test_empty_batch_backward(name):
    """Defect 4: an integer division by the batch in the CPU backward kernels killed the process (SIGFPE). In a child
    process, so that a crash fails this test instead of the run."""
    code = (f"import torch, dynconv; m = dynconv.create_op({name!r}, 16, 16, 3).train(); "
            "x = torch.randn(0, 16, 8, 8, requires_grad=True); out = m(x); out.sum().backward(); "
            "assert out.shape == (0, 16, 8, 8) and x.grad.shape == x.shape; "
            "assert all(p.grad is not None and not p.grad.any() for p in m.parameters()); print('ok')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-3000:])


def test_compiled_involution_without_native_kernels(monkeypatch):
    """Defect 5: with DYNCONV_NATIVE=0 the decomposition's backward returned permuted strides for grad_reduced."""
    monkeypatch.setenv("DYNCONV_NATIVE", "0")
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = dynconv.create_op("involution", 32, 32, 3).double().train()
    _assert_matches_reference(m, torch.randn(2, 32, 9, 9, dtype=torch.float64), torch.compile(m),
                              Sample(2, (9, 9), 3))


def test_parameter_gradients_keep_the_parameter_strides():
    """DDP's buckets: a channels_last model's fused-op parameter gradients come back in the parameter's strides."""
    torch.manual_seed(0)
    for name in ("involution", "dk_local"):
        m = dynconv.create_op(name, 16, 16, 3).to(memory_format=torch.channels_last).train()
        x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
        m(x).square().mean().backward()
        for n, p in m.named_parameters():
            assert p.grad.stride() == p.stride(), f"{name}.{n}: grad strides {p.grad.stride()} != {p.stride()}"


def test_autocast_samples_deformable_kernels_at_float32_offsets():
    """Under bf16 autocast the local DK op gets x and the scope kernels in bf16 but the offsets in float32, as
    torchvision keeps deform_conv2d's (a bf16 offset plus a tap position near 3 rounds to 1/64 of a pixel)."""
    m = dynconv.create_op("dk_local", 8, 8, 3).train()
    with torch.autocast("cpu", dtype=torch.bfloat16), OpRecord() as record:
        m(torch.randn(2, 8, 6, 6))
    seen = [dtypes[:3] for func, dtypes, _ in record.calls
            if func.name().startswith("dynconv::deform_kernel_local")]
    assert seen and all(dt == (torch.bfloat16, torch.float32, torch.bfloat16) for dt in seen), seen
