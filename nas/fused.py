"""The fused forward of a search cell: every edge leaving one node is computed at once.

The plain forward (`SearchCell.forward`) follows the DARTS code: for every edge, every op on its
own input, weighted and summed. Most of that work repeats itself: all edges leaving node i see the
same input h_i, so the ReLU that starts every conv op, the pooling ops (and the BN after them,
whose batch statistics are then identical) and the identity are the same for all of them, and
`none` contributes exactly zero. Here, for each source node:

* `none` is skipped; ReLU(h), max-pool + BN, avg-pool + BN and the identity are computed once;
* each conv op of the E outgoing edges becomes one grouped convolution over h repeated E times
  (depthwise with E*C groups, pointwise with E groups), with the edges' weights concatenated, and
  one BN over the E*C channels whose running statistics are written back to the edges' BNs;
* the mixture sum_o w_eo * o_e(h) is taken for all E edges together; for a conv op the weight
  w_eo is the affine weight of its last BN (a BN without affine parameters of its own), so the
  multiplication and, in the architecture step, the gradient of w_eo come out of the BN's own
  forward and backward passes instead of passes over the op's output of their own; on the CPU
  the rest of the mixture (the shared terms, weighted per edge, plus the conv terms) is one pass
  forward and one backward (nas/mixture.py).

The parameters stay those of the per-edge modules, so checkpoints, the discretized network and the
plain forward all share them, and both forwards compute the same function: the same values up to
floating-point reassociation, the same BN running statistics, the same gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import mixture
from .depthwise import depthwise_conv2d
from .ops import DilConv, FactorizedReduce, Identity, SepConv, even_pixels, is_channels_last, odd_pixels


def repeat_channels(x: torch.Tensor, times: int) -> torch.Tensor:
    """x (B, C, H, W) -> (B, times*C, H, W) = [x, x, ...] along channels, in x's memory format."""
    if times == 1:
        return x
    if is_channels_last(x):
        b, c, h, w = x.shape
        nhwc = x.permute(0, 2, 3, 1).unsqueeze(3).expand(b, h, w, times, c).reshape(b, h, w, times * c)
        return nhwc.permute(0, 3, 1, 2)
    return x.repeat(1, times, 1, 1)


def batch_norm(x: torch.Tensor, norms: Sequence[nn.BatchNorm2d], scale: torch.Tensor | None = None) -> torch.Tensor:
    """The non-affine BNs `norms` (one per block of channels of x, in order) applied as one; in
    training mode their running statistics are updated exactly as each would update its own.
    `scale` (one number per BN) multiplies each block's output: BN's own affine weight does it in
    the same pass, forward and backward, so a mixture weight costs no pass of its own."""
    first = norms[0]
    if len(norms) == 1 and scale is None:
        return first(x)
    weight = None if scale is None else scale.repeat_interleave(first.num_features)
    mean = torch.cat([bn.running_mean for bn in norms])
    var = torch.cat([bn.running_var for bn in norms])
    training = first.training
    momentum = first.momentum
    if training and momentum is None:  # cumulative average, as nn.BatchNorm2d does
        momentum = 1.0 / float(first.num_batches_tracked + 1)
    y = F.batch_norm(x, mean, var, weight, None, training, momentum if training else 0.0, first.eps)
    if training:
        with torch.no_grad():
            size = first.num_features
            torch._foreach_copy_([bn.running_mean for bn in norms], list(mean.split(size)))
            torch._foreach_copy_([bn.running_var for bn in norms], list(var.split(size)))
            torch._foreach_add_([bn.num_batches_tracked for bn in norms], 1)
    return y


def shared_batch_norm(x: torch.Tensor, norms: Sequence[nn.BatchNorm2d]) -> torch.Tensor:
    """BNs that all see the same input x (the BN after a pooling op of every edge of a source):
    computed once, with every BN's running statistics updated to the same values."""
    y = norms[0](x)
    if norms[0].training and len(norms) > 1:
        with torch.no_grad():
            for bn in norms[1:]:
                bn.running_mean.copy_(norms[0].running_mean)
                bn.running_var.copy_(norms[0].running_var)
                bn.num_batches_tracked.copy_(norms[0].num_batches_tracked)
    return y


def on_even_pixels(conv: nn.Conv2d) -> bool:
    """Whether a depthwise conv only reads even pixels: stride 2, dilation 2, padding k - 1 (the
    reduction cells' dil_conv). It then equals an undilated stride-1 conv with padding (k - 1) / 2
    of x[::2, ::2], which PyTorch's CPU kernels run ~10x faster, forward and backward."""
    k = conv.kernel_size[0]
    return conv.stride == (2, 2) and conv.dilation == (2, 2) and conv.padding == (k - 1, k - 1)


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d, subsampled: bool = False) -> torch.Tensor:
    """A depthwise conv with the geometry of `conv`; `subsampled`: x is already x[::2, ::2] of a
    conv for which `on_even_pixels` holds."""
    if subsampled:
        k = conv.kernel_size[0]
        return depthwise_conv2d(x, weight, 1, (k - 1) // 2, 1)
    return depthwise_conv2d(x, weight, conv.stride, conv.padding, conv.dilation)


def _dil_conv(
    x_rep: torch.Tensor,
    blocks: Sequence[DilConv],
    relu_done: bool,
    edges: int,
    subsampled: bool = False,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """E DilConv blocks (ReLU, depthwise, pointwise, BN) on x repeated E times, as grouped convs;
    block e's output times scale[e] where given."""
    if not relu_done:
        x_rep = F.relu(x_rep)
    w_dw = torch.cat([b[1].weight for b in blocks])
    y = depthwise_conv(x_rep, w_dw, blocks[0][1], subsampled)
    w_pw = torch.cat([b[2].weight for b in blocks])
    y = F.conv2d(y, w_pw, None, 1, 0, 1, edges)
    return batch_norm(y, [b[3] for b in blocks], scale)


def _factorized_reduce(x_relu: torch.Tensor, blocks: Sequence[FactorizedReduce]) -> torch.Tensor:
    b, _, _, _ = x_relu.shape
    edges = len(blocks)
    y1 = F.conv2d(even_pixels(x_relu), torch.cat([m.conv_1.weight for m in blocks]))
    y2 = F.conv2d(odd_pixels(x_relu), torch.cat([m.conv_2.weight for m in blocks]))
    half, h, w = y1.shape[1] // edges, y1.shape[2], y1.shape[3]
    if is_channels_last(y1):  # concatenated per edge in (B, H, W, E, 2*half), the channels-last order
        parts = [t.permute(0, 2, 3, 1).unflatten(3, (edges, half)) for t in (y1, y2)]
        y = torch.cat(parts, dim=4).flatten(3).permute(0, 3, 1, 2)
    else:
        y = torch.cat([y1.view(b, edges, half, h, w), y2.view(b, edges, half, h, w)], dim=2).view(
            b, 2 * half * edges, h, w
        )
    return batch_norm(y, [m.bn for m in blocks])


@dataclass
class _Source:
    """The edges leaving one node of the cell."""

    index: int  # the source node (0, 1: cell inputs; 2..: intermediate nodes)
    edges: list[int]  # edge indices, one per target node
    targets: list[int]  # intermediate node (0-based) each edge enters


class FusedCell:
    """Runs a SearchCell's forward with all edges of a source node fused (see module docstring).
    Holds references to the cell's modules only; it owns no parameters."""

    def __init__(self, cell):
        self.cell = cell
        space = cell.space
        self.ops = space.ops
        self.sources = []
        for src in range(space.nodes + 1):
            edges, targets = [], []
            for j in range(space.nodes):
                if src < j + 2:
                    edges.append(space.node_edges(j).start + src)
                    targets.append(j)
            self.sources.append(_Source(src, edges, targets))

    def _source_outputs(self, h: torch.Tensor, source: _Source, weights: torch.Tensor) -> list[torch.Tensor]:
        """The mixed outputs of the source's E edges, one (B, C, H', W') tensor per edge, weighted by
        `weights` (E, ops).

        The mixture is summed with an edge axis next to the channels: (B, H', W', E, C) for
        channels-last tensors, which is how a grouped conv's (B, E*C, H', W') output lies in memory,
        else (B, E, C, H', W'). Every term then has the same memory order; an elementwise op over
        terms whose orders differ runs about 10x slower on the CPU than one over matching terms."""
        cell = self.cell
        edges = len(source.edges)
        mixed = [cell.edges[e] for e in source.edges]
        nhwc = is_channels_last(h)
        edge_axis = 3 if nhwc else 1
        w_shape = [1] * 5
        w_shape[edge_axis] = edges

        def per_edge(y: torch.Tensor) -> torch.Tensor:  # (B, E*C, H', W') -> the mixture's layout
            return y.permute(0, 2, 3, 1).unflatten(3, (edges, -1)) if nhwc else y.unflatten(1, (edges, -1))

        def shared(y: torch.Tensor) -> torch.Tensor:  # (B, C, H', W') -> the same with an edge axis of 1
            return y.permute(0, 2, 3, 1).unsqueeze(3) if nhwc else y.unsqueeze(1)

        relu = F.relu(h)
        relu_rep = relu_even_rep = None
        shared_ops: list[tuple[int, torch.Tensor]] = []  # (op, its output (B, C, H', W'), the same for every edge)
        terms: list[torch.Tensor] = []  # the conv ops' outputs, already weighted (mixture layout)
        weighted: list[tuple[int, torch.Tensor]] = []  # other per-edge outputs (mixture layout), to weight
        for o, name in enumerate(self.ops):
            if name == "none":
                continue
            modules = [m.ops[o] for m in mixed]
            first = modules[0]
            if isinstance(first, Identity):
                shared_ops.append((o, h))
            elif isinstance(first, nn.Sequential) and isinstance(first[0], (nn.MaxPool2d, nn.AvgPool2d)):
                shared_ops.append((o, shared_batch_norm(first[0](h), [m[1] for m in modules])))
            elif isinstance(first, FactorizedReduce):
                weighted.append((o, per_edge(_factorized_reduce(relu, modules))))
            elif isinstance(first, (SepConv, DilConv)):
                # The mixture weight is the last BN's affine weight: the term comes out weighted.
                scale = weights[:, o]
                if relu_rep is None and not (isinstance(first, DilConv) and on_even_pixels(first[1])):
                    relu_rep = repeat_channels(relu, edges)
                if isinstance(first, SepConv):
                    y = _dil_conv(relu_rep, [m[0] for m in modules], True, edges)
                    y = _dil_conv(y, [m[1] for m in modules], False, edges, scale=scale)
                elif on_even_pixels(first[1]):
                    if relu_even_rep is None:  # subsampled once per source, before repeating
                        relu_even_rep = repeat_channels(even_pixels(relu), edges)
                    y = _dil_conv(relu_even_rep, modules, True, edges, subsampled=True, scale=scale)
                else:
                    y = _dil_conv(relu_rep, modules, True, edges, scale=scale)
                terms.append(per_edge(y))
            else:  # an op without a fused form: one call per edge
                weighted.append((o, per_edge(torch.cat([m(h) for m in modules], dim=1))))
        shared_outputs = [s for _, s in shared_ops]
        out = None
        if nhwc and mixture.takes(weights, shared_outputs, terms):
            out = mixture.mix(weights[:, [o for o, _ in shared_ops]], shared_outputs, terms)
        else:
            for o, s in shared_ops:
                w = weights[:, o].view(w_shape)
                out = shared(s) * w if out is None else torch.addcmul(out, shared(s), w)
            for y in terms:
                out = y if out is None else out + y
        for o, y in weighted:
            w = weights[:, o].view(w_shape)
            out = y * w if out is None else torch.addcmul(out, y, w)
        # unbind, not indexing: its backward stacks once instead of zero-filling E copies.
        if nhwc:
            return [y.permute(0, 3, 1, 2) for y in out.unbind(3)]
        return list(out.unbind(1))

    def __call__(
        self, s0: torch.Tensor, s1: torch.Tensor, op_weights: torch.Tensor, edge_weights: torch.Tensor | None
    ) -> torch.Tensor:
        cell = self.cell
        weights = op_weights if edge_weights is None else op_weights * edge_weights[:, None]
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        totals: list[torch.Tensor | int] = [0] * cell.space.nodes

        def emit(source: _Source) -> None:
            outs = self._source_outputs(states[source.index], source, weights[source.edges])
            for j, out in zip(source.targets, outs):
                totals[j] = totals[j] + out

        emit(self.sources[0])
        emit(self.sources[1])
        for j in range(cell.space.nodes):
            states.append(totals[j])
            if j + 2 < len(self.sources) and self.sources[j + 2].edges:
                emit(self.sources[j + 2])
        return torch.cat(states[2:], dim=1)
