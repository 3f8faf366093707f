"""The mixed outputs of a fused source's edges in one pass (nas/fused.py), on the CPU.

For the E edges leaving one node, with the node's state h and the op weights w (E, ops):

    out_e = sum over the shared ops k of w[e, k] * s_k  +  sum over the conv ops m of t_{e, m}

where s_k is an op output that every edge shares (identity, max-pool + BN, avg-pool + BN:
(B, C, H, W)) and t_{e, m} a conv op's output for edge e that comes out of its BN already
weighted. Built from PyTorch's elementwise ops, this is one pass over the (B, H, W, E, C) output
per term forward, and two per shared term backward (one for the gradient of s_k, one for that of
w), each of them a broadcast over a channel axis of 8 to 64 that vectorises poorly; at the small
search configs' sizes these passes took a tenth of the search step. The C kernels of
nas/cpu_kernels.c write every output element once and read the output gradient once.

`mix` takes float32 channels-last tensors on the CPU outside autocast, where the kernels are
built (nas/native.py); everything else takes the PyTorch form, which computes the same sums in
the same order up to floating-point reassociation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import native

enabled = True  # False: the PyTorch form everywhere (bench/search_step.py compares the two)


def _pixels_last(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) channels-last -> its (B*H*W, C) view."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


class _Mixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, shape, shared_count, *tensors):
        shared, terms = tensors[:shared_count], tensors[shared_count:]
        weights = weights.contiguous()
        flat = [_pixels_last(s) for s in shared]
        out = native.mixture_forward(weights, flat, [t.reshape(-1, *t.shape[-2:]) for t in terms])
        ctx.save_for_backward(weights, *shared)
        ctx.shared_count = shared_count
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad):
        weights, *shared = ctx.saved_tensors
        count = ctx.shared_count
        need_shared = any(ctx.needs_input_grad[3 : 3 + count])
        need_weights = ctx.needs_input_grad[0]
        grad = grad.contiguous()
        flat = [_pixels_last(s) for s in shared]
        grads, grad_weights = native.mixture_backward(
            grad.view(-1, *grad.shape[-2:]), weights, flat, need_shared, need_weights
        )
        grad_shared = [None] * count
        if grads is not None:
            b, c, h, w = shared[0].shape
            grad_shared = [g.view(b, h, w, c).permute(0, 3, 1, 2) for g in grads]
        grad_terms = [grad if needed else None for needed in ctx.needs_input_grad[3 + count :]]
        return (grad_weights, None, None, *grad_shared, *grad_terms)


def takes(weights: torch.Tensor, shared: Sequence[torch.Tensor], terms: Sequence[torch.Tensor]) -> bool:
    """Whether `mix` runs the C kernels for these tensors (`weights`: the mixture weights, or the
    tensor they are taken from, on the same device and of the same dtype)."""
    tensors = [weights, *shared, *terms]
    if not (enabled and shared):
        return False
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and all(s.is_contiguous(memory_format=torch.channels_last) and s.dim() == 4 for s in shared)
        and all(t.is_contiguous() and t.dim() == 5 for t in terms)
        and not torch.is_autocast_enabled("cpu")
        and native.available()
    )


def mix(weights: torch.Tensor, shared: Sequence[torch.Tensor], terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_k weights[:, k] * shared[k] + sum(terms) as (B, H, W, E, C), for weights (E, K), shared
    (B, C, H, W) channels-last and terms (B, H, W, E, C), where `takes(weights, shared, terms)`."""
    b, c, h, w = shared[0].shape
    shape = (b, h, w, weights.shape[0], c)
    # The kernels trust these shapes (they read through raw pointers).
    if weights.shape != (shape[3], len(shared)) or any(s.shape != (b, c, h, w) for s in shared):
        raise ValueError(f"mixture: weights {tuple(weights.shape)} and shared terms do not match")
    if any(t.shape != shape for t in terms):
        raise ValueError(f"mixture: per-edge terms {[tuple(t.shape) for t in terms]}, expected {shape}")
    return _Mixture.apply(weights, shape, len(shared), *shared, *terms)
