"""The compiled CPU kernel for `pixel_filter` (`dynconv/functional/native.py`, `dynconv/csrc/`)."""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dynconv.functional import native
from dynconv.functional import pixel_filter as pf

B = 2


def tap_loop(x, spatial, channel, K, s, p, d, combine):
    """Independent oracle: one strided slice of the zero-padded input per tap (k = kh·K + kw)."""
    Bx, C, H, W = x.shape
    _, G, _, Ho, Wo = spatial.shape
    xp = F.pad(x, (p, p, p, p))
    out = x.new_zeros(Bx, C, Ho, Wo)
    gidx = torch.arange(C) // (C // G)
    for kh, kw in itertools.product(range(K), range(K)):
        k = kh * K + kw
        xt = xp[:, :, kh * d: kh * d + (Ho - 1) * s + 1: s, kw * d: kw * d + (Wo - 1) * s + 1: s]
        f = spatial[:, gidx, k]
        if channel is not None:
            a = channel[:, :, k, None, None]
            f = f * a if combine == "mul" else f + a
        out = out + f * xt
    return out


def make(K, s, d, H, W, C, G, shared, combine, dtype=torch.float64, batch=B):
    p = d * (K - 1) // 2
    ho, wo = (H + 2 * p - d * (K - 1) - 1) // s + 1, (W + 2 * p - d * (K - 1) - 1) // s + 1
    x = torch.randn(batch, C, H, W, dtype=dtype, requires_grad=True)
    spatial = torch.randn(1 if shared else batch, G, K * K, ho, wo, dtype=dtype, requires_grad=True)
    channel = torch.randn(batch, C, K * K, dtype=dtype, requires_grad=True) if combine else None
    return x, spatial, channel, p


def grads(out, leaves, go):
    return torch.autograd.grad(out, [t for t in leaves if t is not None], go)


def test_kernel_builds():
    info = native.build_info()
    assert info["built"], f"the native kernel did not build: {info}"
    assert Path(info["path"]).is_dir()


@pytest.mark.parametrize("K", [3, 5, 7])
@pytest.mark.parametrize("s,d", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_matches_tap_loop_and_reference_backend(K, s, d):
    """Forward and the three gradients, float64 (exact up to rounding), over the grid."""
    torch.manual_seed(100 * K + 10 * s + d)
    C = 8
    grid = itertools.product([(6, 7), (7, 6)], [1, 2, 8], [False, True], [None, "mul", "add"])
    for (H, W), G, shared, combine in grid:
        x, spatial, channel, p = make(K, s, d, H, W, C, G, shared, combine)
        mode = combine or "mul"
        out = native.pixel_filter(x, spatial, channel, kernel_size=K, stride=s, dilation=d, combine=mode)
        ref = tap_loop(x, spatial, channel, K, s, p, d, mode)
        ref2 = pf.pixel_filter(x, spatial, channel, kernel_size=K, stride=s, dilation=d, combine=mode,
                               backend="reference")
        case = dict(K=K, s=s, d=d, H=H, W=W, G=G, shared=shared, combine=combine)
        torch.testing.assert_close(out, ref, msg=lambda m: f"{case}: {m}")
        torch.testing.assert_close(out, ref2, msg=lambda m: f"{case} (reference backend): {m}")
        go = torch.randn_like(out)
        for g, rg in zip(grads(out, (x, spatial, channel), go), grads(ref, (x, spatial, channel), go)):
            torch.testing.assert_close(g, rg, msg=lambda m: f"{case} grad: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("W", [16, 37])
def test_wide_rows_float32_tolerance(dtype, W):
    """Rows with whole vector blocks and a partial last block; float32 within 1e-5 of float64."""
    torch.manual_seed(W)
    x, spatial, channel, p = make(3, 1, 1, 5, W, 12, 3, False, "mul", dtype=torch.float64)
    ref = tap_loop(x, spatial, channel, 3, 1, p, 1, "mul")
    go = torch.randn_like(ref)
    ref_grads = grads(ref, (x, spatial, channel), go)
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, spatial, channel)]
    out = native.pixel_filter(*leaves, kernel_size=3, combine="mul")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads(out, leaves, go.to(dtype)), ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("G", [1, 4])
def test_shared_filter_gradient_over_threads(threads, G):
    """Bs = 1 sums the filter gradient over the batch: per group (G >= threads) or through
    per-thread partial sums (G < threads); both equal the oracle."""
    torch.manual_seed(threads + G)
    x, spatial, channel, p = make(3, 1, 1, 6, 5, 4, G, True, None, batch=5)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = native.pixel_filter(x, spatial, kernel_size=3)
        gx, gs = grads(out, (x, spatial), torch.ones_like(out))
    finally:
        torch.set_num_threads(prev)
    rx, rs = grads(tap_loop(x, spatial, None, 3, 1, p, 1, "mul"), (x, spatial), torch.ones_like(out))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gs, rs)


@pytest.mark.parametrize("batch,G,C", [(8, 4, 4), (9, 4, 4), (3, 2, 12), (6, 1, 3)])
def test_shared_filter_planes_of_several_samples_share_lanes(batch, G, C):
    """With a filter shared by the batch and one-channel groups (G = C), a work item's planes are
    samples of one channel: 8 fill 4-plane lanes, 9 leave a remainder; with larger groups the
    items go group by group. Forward and all gradients equal the oracle in float64."""
    torch.manual_seed(batch * G)
    for combine in (None, "mul", "add"):
        x, spatial, channel, p = make(3, 1, 1, 5, 6, C, G, True, combine, batch=batch)
        mode = combine or "mul"
        out = native.pixel_filter(x, spatial, channel, kernel_size=3, combine=mode)
        ref = tap_loop(x, spatial, channel, 3, 1, p, 1, mode)
        torch.testing.assert_close(out, ref)
        go = torch.randn_like(out)
        for g, rg in zip(grads(out, (x, spatial, channel), go), grads(ref, (x, spatial, channel), go)):
            torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("W,s", [(9, 1), (14, 1), (28, 1), (28, 2), (48, 1), (7, 1), (56, 2)])
def test_float32_block_widths(W, s):
    """float32 forwards over rows of 9-16, 25-32 and 41-48 outputs use 64-byte blocks, others (and
    every backward) 32-byte ones: the kernel picks by the output width. Every width equals the
    float64 oracle within 1e-5."""
    torch.manual_seed(W + s)
    for shared, combine, G in ((False, "mul", 2), (True, None, 8), (False, None, 1)):
        x, spatial, channel, p = make(3, s, 1, 4, W, 8, G, shared, combine, batch=3)
        mode = combine or "mul"
        ref = tap_loop(x, spatial, channel, 3, s, p, 1, mode)
        go = torch.randn_like(ref)
        ref_grads = grads(ref, (x, spatial, channel), go)
        leaves = [t if t is None else t.detach().float().requires_grad_() for t in (x, spatial, channel)]
        out = native.pixel_filter(*leaves, kernel_size=3, stride=s, combine=mode)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        for g, rg in zip(grads(out, leaves, go.float()), ref_grads):
            torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("combine,shared,s", [(None, False, 1), ("mul", False, 2), ("add", True, 1),
                                               ("mul", True, 2)])
def test_gradcheck(combine, shared, s):
    torch.manual_seed(7)
    x, spatial, channel, _ = make(3, s, 1, 5, 4, 4, 2, shared, combine)
    inputs = tuple(t for t in (x, spatial, channel) if t is not None)

    def fn(*args):
        return native.pixel_filter(*args, kernel_size=3, stride=s, combine=combine or "mul")

    assert torch.autograd.gradcheck(fn, inputs)


def test_layouts_and_dtypes():
    """channels_last and non-contiguous inputs give the contiguous result; bfloat16 runs in float32."""
    torch.manual_seed(3)
    x, spatial, channel, _ = make(3, 1, 1, 6, 6, 4, 2, False, "mul", dtype=torch.float32)
    ref = native.pixel_filter(x, spatial, channel, kernel_size=3)
    cl = native.pixel_filter(x.contiguous(memory_format=torch.channels_last), spatial, channel, kernel_size=3)
    wide = torch.randn(B, 4, 6, 12)[..., ::2].copy_(x)  # a strided view with x's values
    strided = native.pixel_filter(wide, spatial, channel, kernel_size=3)
    torch.testing.assert_close(cl, ref)
    torch.testing.assert_close(strided, ref)
    half = native.pixel_filter(x.bfloat16(), spatial.bfloat16(), channel.bfloat16(), kernel_size=3)
    assert half.dtype == torch.bfloat16
    exact = tap_loop(*(t.bfloat16().float() for t in (x, spatial, channel)), 3, 1, 1, 1, "mul")
    torch.testing.assert_close(half.float(), exact, atol=0.05, rtol=0.02)


def test_availability_and_switch(monkeypatch):
    x = torch.randn(1, 2, 4, 4)
    s = torch.randn(1, 1, 9, 4, 4)
    assert native.available(x, s)
    assert not native.available(x.int(), s)
    monkeypatch.setenv("DYNCONV_NATIVE", "0")
    assert not native.available(x, s)


def test_fast_backend_dispatches_here(monkeypatch):
    """`pixel_filter`'s fast backend uses this kernel for CPU floating-point inputs."""
    calls = []
    real = native.pixel_filter
    monkeypatch.setattr(native, "pixel_filter", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, spatial, channel, _ = make(3, 1, 1, 5, 5, 4, 2, False, "add")
    pf.pixel_filter(x, spatial, channel, kernel_size=3, combine="add", backend="fast")
    assert calls == [1]


def test_shape_errors_name_the_problem():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="does not fit"):
        native.pixel_filter(x, torch.randn(2, 3, 9, 5, 5), kernel_size=3)
    with pytest.raises(ValueError, match="channel filter shape"):
        native.pixel_filter(x, torch.randn(2, 2, 9, 5, 5), torch.randn(2, 4, 8), kernel_size=3)


@pytest.mark.slow
def test_build_is_cached():
    """A fresh process finds the built library and only loads it."""
    native.load()
    code = "from dynconv.functional import native; i = native.build_info(); print(i['cached'], i['seconds'])"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    cached, seconds = res.stdout.split()[-2:]
    assert cached == "True"
    assert float(seconds) < 10.0, f"loading the cached kernel took {seconds} s"


def test_build_folder_follows_the_shared_headers(monkeypatch, tmp_path):
    """An edit to a header the kernels include (csrc/vec.h) builds them again: it is part of every cache key."""
    (tmp_path / "k.cpp").write_text('#include "vec.h"\n')
    (tmp_path / "vec.h").write_text("// one\n")
    monkeypatch.setattr(native, "CSRC", tmp_path)
    ext = native.Extension("k", [tmp_path / "k.cpp"])
    before = ext.build_dir()
    assert ext.build_dir() == before
    (tmp_path / "vec.h").write_text("// two\n")
    assert ext.build_dir() != before
    assert (Path(native.__file__).parents[1] / "csrc" / "vec.h").is_file()


def test_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    """A source that does not compile: one RuntimeWarning, `available()` False, the fast path runs."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error this source is broken on purpose\n")
    monkeypatch.setenv("DYNCONV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "PIXEL_FILTER", native.Extension("dynconv_pixel_filter", [broken]))
    x, spatial, _, p = make(3, 1, 1, 5, 5, 4, 2, False, None)
    with pytest.warns(RuntimeWarning, match="failed to build") as record:
        assert not native.available(x, spatial)
        assert not native.available(x, spatial)
        out = pf.pixel_filter(x, spatial, kernel_size=3, backend="fast")
    assert len(record) == 1
    torch.testing.assert_close(out, tap_loop(x, spatial, None, 3, 1, p, 1, "mul"))


def _bench_ops():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_ops.py"
    spec = importlib.util.spec_from_file_location("bench_ops", path)
    bench_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_ops)
    return bench_ops


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bench_ops_quick(capsys, device):
    """`scripts/bench_ops.py --quick` runs and prints one table row per measured entry; the compiled kernel's
    rows are the C++ kernel's on CPU and the Triton kernels' on CUDA."""
    threads = torch.get_num_threads()
    try:
        _bench_ops().main(["--quick", "--ops", "involution", "ddf", "--device", device])
    finally:
        torch.set_num_threads(threads)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2x16x8x8")]
    # 3 baselines (depthwise 7x7 with involution), 2 operators x 2 backends, involution unfused,
    # 3 pixel_filter forms x 3 backends
    assert len(table) == 3 + 2 * 2 + 1 + 3 * 3
    assert not [line for line in table if "error" in line]
    compiled = {"cpu": "native", "cuda": "triton"}[device]
    assert sum(f"| {compiled} |" in line for line in table) == 3


def test_bench_ops_cuda_flag_needs_a_gpu(monkeypatch, capsys):
    """Where torch sees no GPU, --device cuda stops with a message that says so."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        _bench_ops().main(["--quick", "--device", "cuda"])
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_kernel_checks_geometry():
    """The extension itself refuses shapes that would make it index outside its tensors."""
    ext = native.load()
    x, s, e = torch.randn(1, 2, 5, 5), torch.randn(1, 1, 9, 5, 5), torch.empty(0)
    with pytest.raises(RuntimeError, match="does not fit"):
        ext.forward(x, s, e, 0, 3, 1, 2, 1)  # padding 2 gives a 7x7 output, not 5x5
    with pytest.raises(RuntimeError, match="padding >= 0"):
        ext.forward(x, s, e, 0, 3, 1, -1, 1)
    with pytest.raises(RuntimeError, match="grad_output"):
        ext.backward(torch.randn(1, 2, 4, 4), x, s, e, 0, 3, 1, 1, 1)
