"""`Domain`: what an operator accepts, declared next to its code as the `domain` class attribute.

The conformance suite (tests/dynconv/test_conformance.py) draws every sample from it and runs each through
every execution path against the reference backend, in the manner of PyTorch's OpInfo entries, so a new
operator gets the whole matrix by declaring its domain (docs/CONTRIBUTING.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Domain:
    """The geometry and options an operator takes.

    kernel_sizes, strides, dilations: values its constructor accepts (each tried by the suite).
    groups: Conv2d `groups` values beyond 1 that change what it computes (empty where it has no such groups).
    channelwise: out_channels must equal in_channels (involution, DDF, TVConv, local DK).
    channels: a small channel count that `options` fit, for the samples.
    options: small-shape constructor options (official defaults scaled down to `channels`).
    fixed_input_size: built for one input size, given as `input_size=(H, W)`; any other size is an error.
    batchnorm: it has BatchNorm inside, so frozen-BatchNorm training (`norm_eval`) is a path of its own.
    min_train_batch: the smallest non-empty batch it trains on (BatchNorm over pooled features needs 2); a
        smaller one gives BatchNorm's one-line error.
    slow_compile: inductor takes minutes on it, so the CI run compiles one sample (the full set runs with
        DYNCONV_CONFORMANCE=deep).
    """

    kernel_sizes: tuple[int, ...] = (1, 3, 5)
    strides: tuple[int, ...] = (1, 2)
    dilations: tuple[int, ...] = (1, 2)
    groups: tuple[int, ...] = ()
    channelwise: bool = False
    channels: int = 8
    options: dict = field(default_factory=dict)
    fixed_input_size: bool = False
    batchnorm: bool = False
    min_train_batch: int = 1
    slow_compile: bool = False

    def constructor_kwargs(self, size: tuple[int, int], dilation: int = 1, groups: int = 1) -> dict:
        """Keyword arguments of `create_op` for a sample: the options, and the input size where it is fixed."""
        kwargs = dict(self.options, dilation=dilation)
        if groups != 1:
            kwargs["groups"] = groups
        if self.fixed_input_size:
            kwargs["input_size"] = tuple(size)
        return kwargs
