"""Candidate operations and their registry (docs/science.md §1.1).

Every op is built as `OPS[name](C, stride, affine)` and maps C channels to C channels; with
stride 2 it halves the spatial size. The search space, the supernet, the discretized network and
the evaluation networks all build their ops from this one registry, so a new op is one entry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import ConfigError

OpFactory = Callable[[int, int, bool], nn.Module]

# Column order of alpha: the DARTS PRIMITIVES list, and the DA2S list without `none`.
DARTS_OPS = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
DA2S_OPS = DARTS_OPS[1:]
OP_LISTS = {"darts": DARTS_OPS, "da2s": DA2S_OPS}


class Zero(nn.Module):
    """The `none` op: zeros of the output shape (a strided input is subsampled first)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class Identity(nn.Module):
    """`skip_connect` at stride 1. Drop path exempts it (docs/science.md §4.1), hence its own class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU, depthwise (dilated) k x k conv, 1x1 conv, BN."""

    def __init__(self, c_in, c_out, kernel, stride, padding, dilation, affine):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two DilConv blocks with dilation 1; only the first is strided."""

    def __init__(self, c_in, c_out, kernel, stride, padding, affine):
        super().__init__(
            DilConv(c_in, c_in, kernel, stride, padding, 1, affine),
            DilConv(c_in, c_out, kernel, 1, padding, 1, affine),
        )


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x (B, C, H, W), or the tensor x is a strided view of, lies in memory as (B, H, W, C):
    the channels innermost (and x not also (B, C, H, W)-contiguous, as when C = 1)."""
    return x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous()


def even_pixels(x: torch.Tensor) -> torch.Tensor:
    """x[:, :, ::2, ::2], a view. A channels-last x is sliced through its (B, H, W, C) view, so that
    the backward pass hands back a channels-last gradient (slicing x itself zero-fills a
    (B, C, H, W)-contiguous one)."""
    if is_channels_last(x):
        return x.permute(0, 2, 3, 1)[:, ::2, ::2].permute(0, 3, 1, 2)
    return x[:, :, ::2, ::2]


def odd_pixels(x: torch.Tensor) -> torch.Tensor:
    """x[:, :, 1::2, 1::2], zero-padded at the bottom and right to the size of `even_pixels(x)`
    where H or W is odd; channels-last as `even_pixels`."""
    h, w = (x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2
    if is_channels_last(x):
        odd = x.permute(0, 2, 3, 1)[:, 1::2, 1::2]
        pad = (0, 0, 0, w - odd.shape[2], 0, h - odd.shape[1])
        return (nn.functional.pad(odd, pad) if any(pad) else odd).permute(0, 3, 1, 2)
    odd = x[:, :, 1::2, 1::2]
    pad = (0, w - odd.shape[3], 0, h - odd.shape[2])
    return nn.functional.pad(odd, pad) if any(pad) else odd


class GlobalAverage(nn.Module):
    """(B, C, H, W) -> (B, C), the mean over the pixels. For a channels-last x the mean is taken over
    its (B, H, W, C) view, so that the backward pass hands the last cell a channels-last gradient
    (nn.AdaptiveAvgPool2d's is (B, C, H, W)-contiguous, and every op of the cell's backward would
    then mix the two memory orders)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_channels_last(x):
            return x.permute(0, 2, 3, 1).mean((1, 2))
        return x.mean((2, 3))


class FactorizedReduce(nn.Module):
    """Halves the spatial size: one 1x1 conv on the even pixels x[::2, ::2], one on the odd pixels
    x[1::2, 1::2] (zero where an odd size leaves none), concatenated. This is the DARTS code's
    pair of stride-2 1x1 convs, the second on x shifted by one pixel and zero-padded back; here the
    pixels are picked first and the convs run with stride 1, which computes the same and keeps
    PyTorch's CPU off its strided 1x1 conv backward (with channels-last tensors and some small
    odd batches, PyTorch 2.14's corrupts the heap)."""

    def __init__(self, c_in: int, c_out: int, affine: bool):
        super().__init__()
        check_even_channels(c_out, "FactorizedReduce c_out")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(even_pixels(x)), self.conv_2(odd_pixels(x))], dim=1))


class Conv7x1x1x7(nn.Sequential):
    def __init__(self, c: int, stride: int, affine: bool):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c, c, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
            nn.Conv2d(c, c, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
            nn.BatchNorm2d(c, affine=affine),
        )


def _skip(c: int, stride: int, affine: bool) -> nn.Module:
    return Identity() if stride == 1 else FactorizedReduce(c, c, affine)


OPS: dict[str, OpFactory] = {
    "none": lambda c, stride, affine: Zero(stride),
    "max_pool_3x3": lambda c, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "avg_pool_3x3": lambda c, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "skip_connect": _skip,
    "sep_conv_3x3": lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine),
    "sep_conv_5x5": lambda c, stride, affine: SepConv(c, c, 5, stride, 2, affine),
    "sep_conv_7x7": lambda c, stride, affine: SepConv(c, c, 7, stride, 3, affine),
    "dil_conv_3x3": lambda c, stride, affine: DilConv(c, c, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda c, stride, affine: DilConv(c, c, 5, stride, 4, 2, affine),
    "conv_7x1_1x7": lambda c, stride, affine: Conv7x1x1x7(c, stride, affine),
}


def op_list(spec: str | tuple[str, ...], path: str = "ops") -> tuple[str, ...]:
    """The op names of a search: a named list (`darts`, `da2s`) or the names themselves (each is
    checked where the space is built, with check_op)."""
    if not isinstance(spec, str):
        return tuple(spec)
    if spec not in OP_LISTS:
        raise ConfigError(path, spec, f"expected one of {', '.join(OP_LISTS)} or a list of op names")
    return OP_LISTS[spec]


def check_op(name: str, path: str = "ops") -> None:
    """A ConfigError unless `name` is in the registry."""
    if name not in OPS:
        raise ConfigError(path, name, f"unknown op; allowed: {', '.join(OPS)}")


def check_even_channels(channels: int, path: str) -> None:
    """Factorized reductions halve the channels, so a network's channel count must be even."""
    if channels % 2:
        raise ConfigError(path, channels, "must be even (factorized reductions halve it)")


def is_pooling(name: str) -> bool:
    return "pool" in name


def build_op(name: str, channels: int, stride: int, affine: bool, search: bool = False) -> nn.Module:
    """The op `name`. In the search network (`search=True`) pooling gets a BN(affine=False) after
    it, as in the DARTS supernet, so that its output scale matches the parametric ops'."""
    op = OPS[name](channels, stride, affine)
    if search and is_pooling(name):
        op = nn.Sequential(op, nn.BatchNorm2d(channels, affine=False))
    return op
