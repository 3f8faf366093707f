"""The depthwise convolution with the rewritten backward equals F.conv2d: values and gradients."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import nas.depthwise as depthwise
from nas import native
from nas.depthwise import depthwise_conv2d, space_to_batch, takes_fast_backward

CL = torch.channels_last

# (kernel, stride, padding, dilation): every depthwise geometry of the search space, and a few others
GEOMETRIES = [
    (3, 1, 1, 1),  # sep_conv_3x3
    (5, 1, 2, 1),  # sep_conv_5x5
    (3, 1, 2, 2),  # dil_conv_3x3 (space to batch for its weight gradient)
    (5, 1, 4, 2),  # dil_conv_5x5
    (3, 2, 1, 1),  # strided: F.conv2d as it is
    (3, 1, 0, 1),  # no padding
    (3, 1, 1, 2),  # dilated, not "same"
]


@pytest.mark.parametrize(("k", "stride", "padding", "dilation"), GEOMETRIES)
@pytest.mark.parametrize("size", [(8, 8), (7, 10)])  # odd sizes: no space to batch
def test_values_and_gradients_equal_conv2d(k, stride, padding, dilation, size):
    torch.manual_seed(0)
    x = torch.randn(3, 4, *size, dtype=torch.float64).contiguous(memory_format=CL)
    w = torch.randn(4, 1, k, k, dtype=torch.float64)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    assert takes_fast_backward(x1)
    expected = F.conv2d(x1, w1, None, stride, padding, dilation, 4)
    got = depthwise_conv2d(x2, w2, stride, padding, dilation)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(expected, (x1, w1), g), torch.autograd.grad(got, (x2, w2), g)):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("k", "padding"), [(3, 1), (5, 2)])
def test_the_rewritten_backward_is_exact_for_undilated_kernels_too(k, padding):
    """Not the default for them (no measured gain), but the formulation holds."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(3, 1, k, k, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(x, w, None, 1, padding, 1, 3)
    got = depthwise._DepthwiseConv2d.apply(x, w, (1, 1), (padding, padding), (1, 1))
    g = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(expected, (x, w), g), torch.autograd.grad(got, (x, w), g)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_float32_channels_last_gradients_match_to_round_off():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, 16).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(8, 1, 5, 5, requires_grad=True)
    for padding, dilation in ((2, 1), (4, 2)):
        y1 = F.conv2d(x, w, None, 1, padding, dilation, 8)
        y2 = depthwise_conv2d(x, w, 1, padding, dilation)
        g = torch.randn_like(y1)
        for a, b in zip(torch.autograd.grad(y1, (x, w), g), torch.autograd.grad(y2, (x, w), g)):
            assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_hand_checked_one_pixel_gradients():
    """One input pixel of one; a 3x3 kernel of ones, dilation 2, padding 2: the output is 1 at the
    pixel's 9 dilated neighbours (inside the 6x6 image), and d(sum y)/dw counts the taps that hit."""
    x = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    x[0, 0, 2, 3] = 1.0
    x = x.contiguous(memory_format=CL).requires_grad_()
    w = torch.ones(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    y = depthwise_conv2d(x, w, 1, 2, 2)
    assert y.shape == (1, 1, 6, 6)
    hits = {(r, c) for r in (0, 2, 4) for c in (1, 3, 5)}
    assert {tuple(i) for i in y[0, 0].nonzero().tolist()} == hits
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    # every tap of the kernel reaches the pixel from one output inside the image
    assert torch.equal(gw, torch.ones_like(gw))
    # d(sum y)/dx[p] = number of outputs that read p: 9 where the whole dilated kernel fits, fewer at the border
    assert gx[0, 0, 2, 3].item() == 9.0 and gx[0, 0, 0, 0].item() == 4.0


def test_space_to_batch_stacks_the_four_sub_images():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6).contiguous(memory_format=CL)
    y = space_to_batch(x)
    assert y.shape == (8, 3, 2, 3)
    assert y.is_contiguous(memory_format=CL)
    for n, (a, b) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert torch.equal(y[2 * n : 2 * n + 2], x[:, :, a::2, b::2])


def test_weight_gradient_is_skipped_when_only_the_input_gradient_is_asked(monkeypatch):
    """As PyTorch's own backward does: the architecture step asks for no weight gradients."""
    calls = []
    original = depthwise._weight_grad
    monkeypatch.setattr(depthwise, "_weight_grad", lambda *args: calls.append(1) or original(*args))
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    torch.autograd.grad(depthwise_conv2d(x, w, 1, 2, 2).sum(), x)
    assert calls == []
    depthwise_conv2d(x, w, 1, 2, 2).sum().backward()
    assert calls == [1] and w.grad is not None


def test_other_tensors_take_conv2d_unchanged():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)  # contiguous (NCHW)
    w = torch.randn(4, 1, 3, 3)
    assert not takes_fast_backward(x)
    assert depthwise_conv2d(x, w, 1, 1).grad_fn.name() == F.conv2d(x, w, None, 1, 1, 1, 4).grad_fn.name()


def _c_kernel_or_skip():
    if not native.available():
        pytest.skip("no C compiler here: the C weight gradient is not built (PyTorch's own is used)")


@pytest.mark.parametrize(("k", "stride", "padding", "dilation"), GEOMETRIES)
@pytest.mark.parametrize("size", [(8, 8), (7, 10)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels", [16, 91])  # 91 = 64 + 16 + 8 + 3: every block width of the kernel
def test_c_weight_gradient_equals_the_float64_one(k, stride, padding, dilation, size, threads, channels, monkeypatch):
    """nas/cpu_kernels.c against PyTorch's weight gradient in float64: every geometry, odd sizes,
    split over one and two threads (these sizes are below the work that is split by default)."""
    _c_kernel_or_skip()
    monkeypatch.setattr(native, "PARALLEL_WORK", 0)
    torch.manual_seed(0)
    c = channels
    x = torch.randn(3, c, *size).contiguous(memory_format=CL)
    y = F.conv2d(x, torch.zeros(c, 1, k, k), None, stride, padding, dilation, c)
    grad = torch.randn_like(y).contiguous(memory_format=CL)
    expected = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), torch.zeros(c, 1, k, k, dtype=torch.float64), None, (stride,) * 2,
        (padding,) * 2, (dilation,) * 2, False, (0, 0), c, (False, True, False),
    )[1]  # fmt: skip
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert native.takes_weight_grad(x, grad)
        got = native.depthwise_weight_grad(x, grad, k, stride, padding, dilation)
    finally:
        torch.set_num_threads(saved)
    assert got.shape == (c, 1, k, k) and got.dtype == torch.float32
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_c_weight_gradient_by_hand():
    """One channel, 1x1 image pixels of value 2 and output gradients of 3 on a 2x2 image, 3x3 kernel,
    padding 1: tap (i, j) sees the pixels it reaches inside the image, 2 * 3 each."""
    _c_kernel_or_skip()
    x = torch.full((1, 1, 2, 2), 2.0).contiguous(memory_format=CL)
    grad = torch.full((1, 1, 2, 2), 3.0).contiguous(memory_format=CL)
    got = native.depthwise_weight_grad(x, grad, 3, 1, 1, 1)[0, 0]
    # the centre tap reaches all 4 pixels, edge taps 2, corner taps 1
    assert torch.equal(got, 6.0 * torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]))


def test_without_a_c_compiler_pytorchs_own_kernels_are_used(tmp_path):
    """A machine without a working C compiler: no kernels, a warning, the same gradients."""
    script = """
import torch, torch.nn.functional as F
import nas.native, nas.mixture
from nas.depthwise import depthwise_conv2d
assert not nas.native.available()
assert not nas.mixture.takes(torch.ones(1, 1), [torch.randn(1, 8, 2, 2).contiguous(memory_format=torch.channels_last)], [])
torch.manual_seed(0)
x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
w = torch.randn(4, 1, 5, 5, requires_grad=True)
a = torch.autograd.grad(F.conv2d(x, w, None, 1, 2, 1, 4).sum(), (x, w))
b = torch.autograd.grad(depthwise_conv2d(x, w, 1, 2, 1).sum(), (x, w))
assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-5) for p, q in zip(a, b))
print("fallback ok")
"""
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "NAS_KERNEL_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "fallback ok" in run.stdout
    assert "C kernels not built" in run.stderr
    assert not list((tmp_path / "cache").glob("*.so"))
