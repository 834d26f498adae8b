"""Compiled CPU kernel for `pixel_filter` (C++/OpenMP, built from `dynconv/csrc/` on first use).

The fast backend calls `pixel_filter` here when `available(...)` is true. The extension is
compiled with the machine's C++ compiler through `torch.utils.cpp_extension.load` into a
persistent folder, `$DYNCONV_CACHE_DIR` or `~/.cache/dynconv` (`$XDG_CACHE_HOME` honoured), under
`ext-<hash>`, where the hash covers the sources (content and path) and the headers beside them, the flags, the torch install and
Python version and the CPU's instruction-set flags; so the `-march=native` build is never reused on a different CPU, and
a second process (or run) only loads the cached library. `build_info()` reports where it lives and
what the build or load cost. A failed build gives one warning and `available()` turns False, so
the pure-PyTorch path runs. `DYNCONV_NATIVE=0` switches the kernel off (read at every call).
The kernel runs on torch's intra-op thread pool (`at::parallel_for`), so `torch.set_num_threads`
applies; build it ahead of time with `python -m dynconv.functional.native` (it exits 1 after the compiler's
output when the build fails). The build runs the `ninja` package's binary where that package is installed, so
it does not depend on which `ninja` PATH finds.

Computation: float32 and float64 natively; bfloat16 and float16 inputs are computed in float32
(accumulation in float32) and cast back. The kernel reads contiguous NCHW, so channels_last or
otherwise strided inputs are copied once to contiguous (one extra read and write of the input).
The per-pixel channel sums of the channel filter's gradient are accumulated in double.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .geometry import conv_out_hw, resolve_padding

_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_COMBINE = {None: 0, "mul": 1, "add": 2}
_NATIVE_DTYPES = (torch.float32, torch.float64)
_UPCAST_DTYPES = (torch.bfloat16, torch.float16)

def enabled() -> bool:
    """False when the environment says `DYNCONV_NATIVE=0` (or `false`/`off`)."""
    return os.environ.get("DYNCONV_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


@contextlib.contextmanager
def _package_ninja_first():
    """Put the `ninja` package's binary first on PATH while building: `cpp_extension` runs the `ninja` that PATH
    finds, and a different ninja version rewrites the build log and recompiles everything (the PATH of a venv
    differs from the system's). Without the package, PATH's ninja builds."""
    try:
        import ninja
        bin_dir = ninja.BIN_DIR
    except ImportError:
        bin_dir = ""
    path = os.environ.get("PATH")
    if bin_dir:
        os.environ["PATH"] = os.pathsep.join(p for p in (bin_dir, path) if p)
    try:
        yield
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


class Extension:
    """One compiled extension (`sources` under `dynconv/csrc/`), built on first use into its own cached folder.

    Each fused kernel is its own extension, so a change to one source rebuilds only that library. A source
    may expose functions through pybind11 (the loaded module's attributes) or register
    `torch.ops.<namespace>.*` operators with `TORCH_LIBRARY_FRAGMENT`; loading the library registers them.
    """

    def __init__(self, name: str, sources: list[Path]):
        self.name, self.sources = name, list(sources)
        self.module = None
        self.tried = False
        self.info: dict = {}

    def build_dir(self) -> Path:
        """The folder the extension is built into (one per sources/flags/torch/CPU combination)."""
        h = hashlib.sha256()
        for src in [*self.sources, *sorted(CSRC.glob("*.h"))]:  # the sources and the headers they may include
            h.update(src.read_bytes())
        # the generated build file names the sources' and torch's absolute paths, so a folder shared by two
        # checkouts or environments would be rebuilt by each in turn: one folder per pair of paths
        for part in (_CFLAGS, _LDFLAGS, torch.__version__, platform.python_version(), platform.machine(),
                     _cpu_flags(), [str(src) for src in self.sources], torch.__file__):
            h.update(repr(part).encode())
        root = os.environ.get("DYNCONV_CACHE_DIR") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dynconv"
        return Path(root) / f"ext-{h.hexdigest()[:16]}"

    def load(self):
        """The compiled extension module, building it on first use; None if it cannot be built."""
        if self.tried or not enabled():
            return self.module
        self.tried = True
        # Importing cpp_extension logs a CUDA_HOME notice on machines without CUDA; it is irrelevant here.
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            log.setLevel(level)

        folder = self.build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{self.name}_" + folder.name.removeprefix("ext-")
        cached = any(folder.glob(f"{name}*.so"))
        t0 = time.perf_counter()
        error = None
        try:
            with _package_ninja_first():
                self.module = cpp_extension.load(name=name, sources=[str(s) for s in self.sources],
                                                 extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                                                 build_directory=str(folder), verbose=False)
        except Exception as err:  # any compiler/linker failure: fall back to the PyTorch path
            error = f"{type(err).__name__}: {str(err).strip()}"
            warnings.warn(f"dynconv: the native {self.name} kernel failed to build in {folder} "
                          f"({error[-500:]}); using the pure-PyTorch "
                          "fast path. Set DYNCONV_NATIVE=0 to skip the attempt.", RuntimeWarning)
            self.module = None
        self.info.update(path=str(folder), cached=cached, seconds=time.perf_counter() - t0,
                         built=self.module is not None, error=error)
        return self.module

    def build_info(self) -> dict:
        """Where the extension lives, whether it was already built, what loading it cost (s), and the build's
        error (None when it built)."""
        self.load()
        return dict(self.info)


CSRC = Path(__file__).resolve().parent.parent / "csrc"
PIXEL_FILTER = Extension("dynconv_pixel_filter", [CSRC / "pixel_filter_cpu.cpp"])
INVOLUTION = Extension("dynconv_involution", [CSRC / "involution_cpu.cpp"])
DEFORM_KERNEL = Extension("dynconv_deform_kernel", [CSRC / "deform_kernel_cpu.cpp"])


def build_dir() -> Path:
    """The pixel_filter extension's build folder."""
    return PIXEL_FILTER.build_dir()


def load():
    """The pixel_filter extension module, building it on first use; None if it cannot be built."""
    return PIXEL_FILTER.load()


def build_info() -> dict:
    """Where the pixel_filter extension lives, whether it was already built, and what loading it cost (s)."""
    return PIXEL_FILTER.build_info()


def available(x: Tensor, spatial: Tensor, channel: Tensor | None = None) -> bool:
    """True when the compiled kernel can serve these inputs (CPU, floating point, built)."""
    tensors = [t for t in (x, spatial, channel) if t is not None]
    if not enabled() or any(t.device.type != "cpu" for t in tensors):
        return False
    if any(t.dtype not in _NATIVE_DTYPES + _UPCAST_DTYPES for t in tensors):
        return False
    return load() is not None


def _compute_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _PixelFilter(torch.autograd.Function):
    """The compiled forward, and its hand-derived backward (all three gradients in one pass):
    grad_x[b,c,y,x] = Σ F·grad_out over the taps that read (y, x); grad_S = Σ_{c∈g} ∂F/∂S·grad_out·x_tap
    (and Σ_b for a shared filter); grad_A = Σ_{i,j} ∂F/∂A·grad_out·x_tap."""

    @staticmethod
    def forward(ctx, x, spatial, channel, mode, k, s, p, d):
        ctx.geom = (mode, k, s, p, d)
        ctx.save_for_backward(x, spatial, channel)
        empty = x.new_empty(0)
        return PIXEL_FILTER.module.forward(x, spatial, empty if channel is None else channel, mode, k, s, p, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, spatial, channel = ctx.saved_tensors
        gx, gs, gc = _backward(grad_out, x, spatial, channel, *ctx.geom, ctx.needs_input_grad[:3])
        return gx, gs, gc, None, None, None, None, None


def _backward(grad_out, x, spatial, channel, mode, k, s, p, d, need):
    """The compiled backward on compute-dtype contiguous inputs; None for the gradients not needed."""
    empty = x.new_empty(0)
    gx, gs, gc = PIXEL_FILTER.module.backward(grad_out.contiguous(), x, spatial, empty if channel is None else channel,
                               mode, k, s, p, d)
    return gx if need[0] else None, gs if need[1] else None, gc if channel is not None and need[2] else None


def backward(grad_out: Tensor, x: Tensor, spatial: Tensor, channel: Tensor | None, kernel_size: int, stride: int,
             padding: int, dilation: int, combine: str, need) -> tuple:
    """Gradients of `pixel_filter` for (x, spatial, channel), each in its input's dtype (None where
    `need` is False), by the compiled kernel; the inputs need not be contiguous or float32/64."""
    tensors = [t for t in (x, spatial, channel) if t is not None]
    cdt = _compute_dtype(tensors)
    xc, sc = x.to(cdt).contiguous(), spatial.to(cdt).contiguous()
    cc = None if channel is None else channel.to(cdt).contiguous()
    mode = _COMBINE[combine] if channel is not None else _COMBINE[None]
    grads = _backward(grad_out.to(cdt), xc, sc, cc, mode, kernel_size, stride, padding, dilation, need)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (x, spatial, channel)))


def _check(x: Tensor, spatial: Tensor, channel: Tensor | None, k: int, ho: int, wo: int) -> None:
    if x.dim() != 4 or spatial.dim() != 5:
        raise ValueError(f"pixel_filter expects x (B, C, H, W) and spatial (Bs, G, K*K, Ho, Wo); got "
                         f"{tuple(x.shape)} and {tuple(spatial.shape)}")
    b, c = x.shape[:2]
    bs, g, kk, sh, sw = spatial.shape
    if bs not in (1, b) or kk != k * k or (sh, sw) != (ho, wo) or g < 1 or c % g:
        raise ValueError(f"spatial filter shape {tuple(spatial.shape)} does not fit x {tuple(x.shape)}: "
                         f"expected ({b} or 1, G dividing {c}, {k * k}, {ho}, {wo})")
    if channel is not None and tuple(channel.shape) != (b, c, k * k):
        raise ValueError(f"channel filter shape {tuple(channel.shape)}: expected {(b, c, k * k)}")


def pixel_filter(x: Tensor, spatial: Tensor, channel: Tensor | None = None, *, kernel_size: int,
                 stride: int = 1, padding: int | None = None, dilation: int = 1,
                 combine: str = "mul") -> Tensor:
    """`out[b,c,i,j] = Σ_k F[b,c,k,i,j] · x[b, c, i·s − p + kh·d, j·s − p + kw·d]` by the compiled kernel.

    Same contract as `dynconv.functional.pixel_filter`; call only when `available(...)` is true.
    """
    if load() is None:
        raise RuntimeError("the native pixel_filter kernel is not built (disabled by DYNCONV_NATIVE=0 "
                           "or failed to compile); check available(...) first")
    if combine not in ("mul", "add"):
        raise ValueError(f"combine must be 'mul' or 'add', got {combine!r}")
    k, s, d = int(kernel_size), int(stride), int(dilation)
    p = int(resolve_padding(k, padding, d)[0])
    ho, wo = conv_out_hw(x.shape[2:], k, s, p, d)
    _check(x, spatial, channel, k, ho, wo)
    tensors = [t for t in (x, spatial, channel) if t is not None]
    out_dtype = x.dtype
    for t in tensors[1:]:
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    cdt = _compute_dtype(tensors)
    xc, sc = x.to(cdt).contiguous(), spatial.to(cdt).contiguous()
    cc = None if channel is None else channel.to(cdt).contiguous()
    mode = _COMBINE[combine] if channel is not None else _COMBINE[None]
    return _PixelFilter.apply(xc, sc, cc, mode, k, s, p, d).to(out_dtype)


def main() -> int:
    """Build (or load) every compiled kernel and say which CPU path runs (`make setup`); 1, after the
    compiler's output, when one does not build."""
    if not enabled():
        print("dynconv: DYNCONV_NATIVE=0: the compiled CPU kernels are off; CPU runs use the pure-PyTorch path")
        return 0
    failed = []
    for ext in [v for v in globals().values() if isinstance(v, Extension)]:
        with warnings.catch_warnings():  # the full error is printed below
            warnings.simplefilter("ignore", RuntimeWarning)
            info = ext.build_info()
        if info["built"]:
            how = "loaded from cache" if info["cached"] else "built"
            print(f"dynconv: compiled CPU kernel {ext.name} {how} in {info['seconds']:.1f} s ({info['path']})")
        else:
            print(f"dynconv: compiled CPU kernel {ext.name} failed to build in {info['path']}:\n{info['error']}",
                  file=sys.stderr)
            failed.append(ext.name)
    if failed:
        print(f"dynconv: without {', '.join(failed)}, CPU runs use the slower pure-PyTorch path. Fix the build "
              "(a C++17 compiler with OpenMP, `pip install ninja`) and rerun, or set DYNCONV_NATIVE=0 to run "
              "without the compiled kernels", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":  # `python -m dynconv.functional.native`: build the kernels ahead of time
    sys.exit(main())
