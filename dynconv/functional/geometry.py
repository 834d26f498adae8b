"""Convolution geometry shared by every operator and primitive: "same" padding, output size and the
channel/groups checks (one copy, in the spirit of timm's `layers/padding.py`)."""
from __future__ import annotations

from torch import Tensor
from torch.nn.modules.utils import _pair

__all__ = ["same_padding", "resolve_padding", "conv_geometry", "conv_out_size", "conv_out_hw", "check_groups",
           "check_channelwise", "centre_aligned"]


def same_padding(kernel_size, dilation=1) -> tuple[int, int]:
    """The centred ("same" at stride 1) padding d·(K−1)//2 per dimension."""
    return tuple(d * (k - 1) // 2 for k, d in zip(_pair(kernel_size), _pair(dilation)))


def resolve_padding(kernel_size, padding, dilation=1) -> tuple[int, int]:
    """`padding` as a pair; None means the centred default `same_padding(kernel_size, dilation)`."""
    return same_padding(kernel_size, dilation) if padding is None else _pair(padding)


def conv_geometry(kernel_size, stride=1, padding=None, dilation=1):
    """Pairs `(kernel_size, stride, padding, dilation)`; padding None → 'same' = dilation·(k−1)//2."""
    return _pair(kernel_size), _pair(stride), resolve_padding(kernel_size, padding, dilation), _pair(dilation)


def conv_out_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    """The convolution output-size formula, floor((H + 2p − d(K−1) − 1) / s) + 1."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def conv_out_hw(hw, kernel_size, stride=1, padding=0, dilation=1) -> tuple[int, int]:
    """`conv_out_size` for both spatial dimensions; every argument an int or a pair."""
    return tuple(conv_out_size(*a) for a in zip(hw, _pair(kernel_size), _pair(stride), _pair(padding),
                                                 _pair(dilation)))


def check_groups(op: str, in_channels: int, out_channels: int, groups: int) -> None:
    """Conv2d's rule: `groups` is a positive divisor of both channel counts."""
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(f"{op}: in_channels={in_channels} and out_channels={out_channels} must both be "
                         f"divisible by groups={groups} (a positive integer)")


def check_channelwise(name: str, in_channels: int, out_channels: int, groups: int) -> None:
    """Shape checks shared by the channel-wise operators (involution, DDF, TVConv, local DK)."""
    if out_channels != in_channels:
        raise ValueError(
            f"{name} filters each channel separately and cannot map {in_channels} to {out_channels} channels; "
            "use out_channels == in_channels (the replacement policy adds a 1x1 projection conv for this)"
        )
    check_groups(name, in_channels, out_channels, groups)


def centre_aligned(x: Tensor, kernel_size: int, padding, dilation) -> Tensor:
    """Crop `x` so that pixel (i·s, j·s) is the centre tap of output (i, j).

    Kernel generators that look at the input at the output's own position (involution's pooled
    input, DDF's strided 1×1 conv) need this when `padding` is smaller than the centred default;
    with the default it is `x` itself. Larger padding would put centres outside the input.
    """
    p = resolve_padding(kernel_size, padding, dilation)
    off = [c - pi for c, pi in zip(same_padding(kernel_size, dilation), p)]
    if min(off) < 0:
        raise ValueError(
            f"padding {p} exceeds the centred padding for kernel_size={kernel_size}, dilation={dilation}; "
            "this operator's kernel generator needs padding <= dilation*(kernel_size-1)//2"
        )
    return x[..., off[0]:, off[1]:]
