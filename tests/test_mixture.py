"""The edge mixture's C kernels (nas/mixture.py) against the same sums in float64."""

from __future__ import annotations

import pytest
import torch

import nas.mixture as mixture
from nas import native

CL = torch.channels_last


def _c_kernels_or_skip():
    if not native.available():
        pytest.skip("no C compiler here: the C kernels are not built (the PyTorch form is used)")


def _reference(weights, shared, terms):
    """The mixture in float64 from PyTorch's ops: (B, H, W, E, C)."""
    out = sum(t.double() for t in terms) if terms else 0
    for k, s in enumerate(shared):
        out = out + s.double().permute(0, 2, 3, 1).unsqueeze(3) * weights[:, k].double().view(1, 1, 1, -1, 1)
    return out


@pytest.mark.parametrize("channels", [8, 16, 29])  # 29 = 16 + 8 + 5: every block width of the kernels
@pytest.mark.parametrize(("edges", "shared_count", "term_count"), [(4, 3, 4), (3, 2, 0), (1, 1, 2)])
@pytest.mark.parametrize("threads", [1, 2])
def test_mixture_and_its_gradients_equal_the_float64_ones(
    channels, edges, shared_count, term_count, threads, monkeypatch
):
    _c_kernels_or_skip()
    monkeypatch.setattr(native, "PARALLEL_WORK", 0)  # split even these small sizes over the threads
    torch.manual_seed(0)
    b, h, w, c = 3, 5, 7, channels  # 105 pixels: shares of unequal size, several 64-pixel blocks
    weights = torch.randn(edges, shared_count, requires_grad=True)
    shared = [torch.randn(b, c, h, w).contiguous(memory_format=CL).requires_grad_() for _ in range(shared_count)]
    terms = [torch.randn(b, h, w, edges, c, requires_grad=True) for _ in range(term_count)]
    assert mixture.takes(weights, shared, terms)
    grad = torch.randn(b, h, w, edges, c)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = mixture.mix(weights, shared, terms)
        got = torch.autograd.grad(out, [weights, *shared, *terms], grad)
    finally:
        torch.set_num_threads(saved)
    inputs = [weights, *shared, *terms]
    expected_out = _reference(weights, shared, terms)
    expected = torch.autograd.grad(expected_out, inputs, grad.double())
    assert out.shape == (b, h, w, edges, c) and out.dtype == torch.float32
    assert (out.double() - expected_out).abs().max() <= 1e-5 * expected_out.abs().max()
    for g, e, x in zip(got, expected, inputs):
        assert g.shape == x.shape and g.dtype == torch.float32
        assert (g.double() - e).abs().max() <= 1e-5 * e.abs().max()
    for g in got[1 : 1 + shared_count]:
        assert g.is_contiguous(memory_format=CL)  # the layout of the rest of the backward pass


def test_mixture_by_hand():
    """Two edges, one channel, one pixel: out_e = w[e, 0] * 2 + w[e, 1] * 3 + t_e."""
    _c_kernels_or_skip()
    weights = torch.tensor([[1.0, 10.0], [0.5, -1.0]], requires_grad=True)
    shared = [torch.full((1, 1, 1, 1), 2.0, requires_grad=True), torch.full((1, 1, 1, 1), 3.0, requires_grad=True)]
    term = torch.tensor([100.0, 200.0]).view(1, 1, 1, 2, 1).requires_grad_()
    out = mixture.mix(weights, shared, [term])
    assert out.flatten().tolist() == [1 * 2 + 10 * 3 + 100, 0.5 * 2 - 1 * 3 + 200]
    gw, g0, g1, gt = torch.autograd.grad(out, [weights, *shared, term], torch.tensor([1.0, 4.0]).view(1, 1, 1, 2, 1))
    assert gw.tolist() == [[2.0, 3.0], [8.0, 12.0]]  # grad_e * s_k
    assert g0.item() == 1 * 1.0 + 4 * 0.5 and g1.item() == 1 * 10.0 + 4 * -1.0  # sum_e grad_e * w[e, k]
    assert gt.flatten().tolist() == [1.0, 4.0]


def test_fixed_weights_give_the_same_input_gradients():
    """The weight step holds the mixture weights fixed: the kernel skips their gradient."""
    _c_kernels_or_skip()
    torch.manual_seed(1)
    shared = [torch.randn(2, 8, 4, 4).contiguous(memory_format=CL).requires_grad_() for _ in range(2)]
    weights = torch.randn(3, 2)
    out = mixture.mix(weights, shared, [])
    assert out.grad_fn is not None
    grads = torch.autograd.grad(out.sum(), shared)
    expected = torch.autograd.grad(_reference(weights, shared, []).sum(), shared)
    assert all(torch.allclose(g, e, rtol=1e-5, atol=1e-6) for g, e in zip(grads, expected))


def test_other_tensors_take_the_pytorch_form():
    _c_kernels_or_skip()
    x = torch.randn(2, 8, 4, 4)  # contiguous (NCHW), not channels-last
    w = torch.randn(3, 1)
    assert mixture.takes(w, [x.contiguous(memory_format=CL)], [])
    assert not mixture.takes(w, [x], [])
    assert not mixture.takes(w, [x.double().contiguous(memory_format=CL)], [])
    assert not mixture.takes(w.double(), [x.contiguous(memory_format=CL)], [])
    mixture.enabled = False
    try:
        assert not mixture.takes(w, [x.contiguous(memory_format=CL)], [])
    finally:
        mixture.enabled = True


def test_shapes_that_do_not_match_are_refused():
    _c_kernels_or_skip()
    s = torch.randn(2, 8, 4, 4).contiguous(memory_format=CL)
    with pytest.raises(ValueError, match="weights"):
        mixture.mix(torch.randn(3, 2), [s], [])  # two weights per edge, one shared term
    with pytest.raises(ValueError, match="per-edge terms"):
        mixture.mix(torch.randn(3, 1), [s], [torch.randn(2, 4, 4, 2, 8)])  # 2 edges, not 3
