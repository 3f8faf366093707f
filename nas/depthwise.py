"""A depthwise convolution whose backward is about as fast as its forward on the CPU.

PyTorch's CPU depthwise convolution (oneDNN, channels-last) runs its forward fast for every
geometry of the search space, and its backward fast only for an undilated 3x3 kernel: the gradients
of the 5x5 and of the dilated kernels take 5-20x their forward. `depthwise_conv2d` computes the
same function with the same forward, and a backward built from fast parts:

* input gradient (stride 1): the forward convolution of the output gradient with the flipped
  kernel (padding d(k-1) - p), 3-10x faster than PyTorch's for the dilated and 5x5 kernels;
  strided convolutions keep PyTorch's;
* weight gradient: the C kernel of nas/native.py for every geometry but the undilated 3x3 (whose
  PyTorch gradient is as fast); where the C kernel cannot be built, the dilation-2 "same" 3x3
  convolution (dil_conv_3x3) splits the image into its four (even/odd row, even/odd column)
  sub-images stacked along the batch ("space to batch"), on which it is an undilated 3x3 one with
  padding 1, and the others are PyTorch's own. (Four offset 3x3 weight gradients covering a 5x5
  kernel were measured slower than PyTorch's 5x5 one: the four shifted copies of the input cost
  more memory traffic than they save.)

Only float32 (or float64) channels-last tensors on the CPU, outside autocast, take this path. With
the C kernel, every geometry does; without it, only the stride-1 dilated kernels (dil_conv_3x3,
dil_conv_5x5; the measured gain on the undilated ones was within the noise). The rest is F.conv2d
as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native

Pair = tuple[int, int]

enabled = True  # False: PyTorch's own backward everywhere (bench/search_step.py compares the two)


def _pair(v: int | Pair) -> Pair:
    return (v, v) if isinstance(v, int) else tuple(v)


def _native(grad, x, weight, stride, padding, dilation, mask):
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, (0, 0), weight.shape[0], mask
    )


def space_to_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) channels-last, H and W even -> (4B, C, H/2, W/2) channels-last: the sub-images
    x[:, :, a::2, b::2] for (a, b) = (0, 0), (0, 1), (1, 0), (1, 1), stacked along the batch."""
    b, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2, c)
    return nhwc.permute(2, 4, 0, 1, 3, 5).reshape(4 * b, h // 2, w // 2, c).permute(0, 3, 1, 2)


def _weight_grad(grad, x, weight, stride: Pair, padding: Pair, dilation: Pair) -> torch.Tensor:
    k = weight.shape[-1]
    h, w = x.shape[-2:]
    square = weight.shape[-2] == k and len({*stride}) == len({*padding}) == len({*dilation}) == 1
    # PyTorch's own is as fast as the C kernel only for the undilated 3x3 kernel (docs/cpu.md).
    if square and (k, dilation) != (3, (1, 1)) and native.takes_weight_grad(x, grad):
        return native.depthwise_weight_grad(x, grad, k, stride[0], padding[0], dilation[0])
    if (
        weight.shape[-2:] == (3, 3)
        and stride == (1, 1)
        and dilation == (2, 2)
        and padding == (2, 2)
        and h % 2 == 0
        and w % 2 == 0
    ):
        x, grad = space_to_batch(x), space_to_batch(grad)
        padding, dilation = ((k - 1) // 2, (k - 1) // 2), (1, 1)
    return _native(grad, x, weight, stride, padding, dilation, (False, True, False))[1]


def _input_grad(grad, x, weight, stride: Pair, padding: Pair, dilation: Pair) -> torch.Tensor:
    kh, kw = weight.shape[-2:]
    flipped_padding = (dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1])
    if min(flipped_padding) < 0:
        return _native(grad, x, weight, stride, padding, dilation, (True, False, False))[0]
    flipped = weight.flip(2, 3).contiguous(memory_format=torch.channels_last)
    return F.conv2d(grad, flipped, None, 1, flipped_padding, dilation, weight.shape[0])


def _gradient_node(t: torch.Tensor):
    try:
        return torch.autograd.graph.get_gradient_edge(t).node if t.requires_grad else None
    except (AttributeError, RuntimeError):
        return None


def _engine_needs(node) -> bool:
    """Whether the running backward pass reaches `node` (a `torch.autograd.grad` call for some
    inputs only skips the rest of the graph; PyTorch's own ops skip the gradients it does not
    need, and so does this one: the architecture step needs no weight gradients)."""
    if node is None:
        return True
    try:
        return torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):
        return True


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding, dilation
        ctx.nodes = _gradient_node(x), _gradient_node(weight)
        return F.conv2d(x, weight, None, stride, padding, dilation, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0] and _engine_needs(ctx.nodes[0]):
            if stride == (1, 1):
                grad_input = _input_grad(grad, x, weight, stride, padding, dilation)
            else:
                grad_input = _native(grad, x, weight, stride, padding, dilation, (True, False, False))[0]
        if ctx.needs_input_grad[1] and _engine_needs(ctx.nodes[1]):
            grad_weight = _weight_grad(grad, x, weight, stride, padding, dilation)
        return grad_input, grad_weight, None, None, None


def takes_fast_backward(x: torch.Tensor) -> bool:
    """Whether `depthwise_conv2d` uses the backward above for x (else PyTorch's own)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.is_autocast_enabled("cpu")
    )


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, stride: int | Pair = 1, padding: int | Pair = 0, dilation: int | Pair = 1
) -> torch.Tensor:
    """F.conv2d(x, weight, None, stride, padding, dilation, groups=weight.shape[0]) for a depthwise
    weight (C, 1, kh, kw), with the faster backward where `takes_fast_backward(x)`."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if not (enabled and takes_fast_backward(x)):
        return F.conv2d(x, weight, None, stride, padding, dilation, weight.shape[0])
    with_c_kernel = x.dtype == torch.float32 and native.available()
    # Without the C weight gradient, only the dilated stride-1 kernels: for them the backward above
    # was measured 1.4-1.7x faster than PyTorch's (forward + backward of one op); for the
    # undilated ones 1.0-1.2x, within the noise.
    if not with_c_kernel and not (stride == (1, 1) and dilation != (1, 1)):
        return F.conv2d(x, weight, None, stride, padding, dilation, weight.shape[0])
    weight = weight.contiguous(memory_format=torch.channels_last)
    return _DepthwiseConv2d.apply(x, weight, stride, padding, dilation)
