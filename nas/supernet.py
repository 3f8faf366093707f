"""The continuous relaxation: MixedOp, the search cell, the supernet, and the architecture
parameters (docs/science.md §1.3-1.4, §5.2-5.3, §5.8).

As in the DARTS code, the architecture weights are passed into `forward` rather than hidden in the
network, so the relaxation is visible where it happens:

    arch = Architecture(space, target, edge_params=True)
    logits = supernet(images, arch())

`Architecture` holds alpha (one tensor per level) and beta (one vector per edge group that has
to choose), separate from the supernet's weights so that each has its own optimiser.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .fused import FusedCell
from .ops import FactorizedReduce, GlobalAverage, ReLUConvBN, build_op
from .space import EdgeGroup, SearchSpace, Target


@contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 convolutions and matrix products without TF32 inside the block (CUDA's default for
    cuDNN convolutions on Ampere and later is TF32)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        matmul = torch.backends.cuda.matmul
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
    else:  # PyTorch before the fp32_precision settings
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class ArchWeights(NamedTuple):
    """What the supernet's forward needs per level: op weights (edges x ops) and edge weights
    (edges,), or None where every edge has weight 1 (methods without edge parameters)."""

    ops: Sequence[torch.Tensor]
    edges: Sequence[torch.Tensor | None]


def sharpen(alpha: torch.Tensor) -> torch.Tensor:
    """The DA2S sharpening f(t) = 2t for t >= -0.5, (2t)^3 below; continuous at -0.5."""
    doubled = 2.0 * alpha
    return torch.where(doubled >= -1.0, doubled, doubled.pow(3))


def clip_beta(beta: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """g(t) = min(t, clip), with zero gradient at and above the cap, as in the DA2S code."""
    return torch.where(beta < clip, beta, torch.full_like(beta, clip))


class MixedOp(nn.Module):
    """One edge of the supernet: sum over ops of softmax(alpha)_o * o(x)."""

    def __init__(self, ops: Sequence[str], channels: int, stride: int):
        super().__init__()
        self.ops = nn.ModuleList(build_op(name, channels, stride, affine=False, search=True) for name in ops)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class SearchCell(nn.Module):
    def __init__(self, space: SearchSpace, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.space = space
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_pp, c, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(c_pp, c, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(c_p, c, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(MixedOp(space.ops, c, 2 if reduction and i < 2 else 1) for _, i in space.edges)
        self.fused: FusedCell | None = None  # set by Supernet.set_fused

    def forward(
        self,
        s0: torch.Tensor,
        s1: torch.Tensor,
        op_weights: torch.Tensor,
        edge_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(s0, s1, op_weights, edge_weights)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(self.space.nodes):
            total = 0
            for e in self.space.node_edges(node):
                out = self.edges[e](states[self.space.edges[e][1]], op_weights[e])
                total = total + (out if edge_weights is None else edge_weights[e] * out)
            states.append(total)
        return torch.cat(states[2:], dim=1)


class Supernet(nn.Module):
    """Stem, `space.cells` search cells (reductions at 1/3 and 2/3, channels doubling there),
    global pooling and a linear classifier. Cell i uses the weights of level `level_of_cell[i]`."""

    def __init__(self, space: SearchSpace, channels: int = 16, num_classes: int = 10, stem_multiplier: int = 3):
        super().__init__()
        self.space = space
        c_stem = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(3, c_stem, 3, padding=1, bias=False), nn.BatchNorm2d(c_stem))
        c_pp, c_p, c = c_stem, c_stem, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        for index in range(space.cells):
            reduction = space.is_reduction(index)
            if reduction:
                c *= 2
            self.cells.append(SearchCell(space, c_pp, c_p, c, reduction, reduction_prev))
            reduction_prev = reduction
            c_pp, c_p = c_p, space.nodes * c
        self.global_pooling = GlobalAverage()
        self.classifier = nn.Linear(c_p, num_classes)
        self.memory_format = torch.contiguous_format
        self.autocast_dtype: torch.dtype | None = None

    def set_fused(self, fused: bool) -> Supernet:
        """Use the fused forward (nas.fused: the edges of a node computed together) or the plain
        per-op one. Both compute the same function with the same parameters."""
        for cell in self.cells:
            cell.fused = FusedCell(cell) if fused else None
        return self

    def set_memory_format(self, memory_format: torch.memory_format) -> Supernet:
        """channels_last or contiguous_format, for the weights and every input."""
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)

    def set_autocast(self, dtype: torch.dtype | None) -> Supernet:
        """Run the forward under torch.autocast with `dtype` (bfloat16 on GPUs); logits stay float32."""
        self.autocast_dtype = dtype
        return self

    @contextmanager
    def full_precision(self) -> Iterator[Supernet]:
        """Forward passes in IEEE float32 inside the block, whatever `set_autocast` chose and with
        TF32 off (the second-order architect: its finite differences are below the resolution of
        bf16 and of TF32's 10-bit mantissa)."""
        saved, self.autocast_dtype = self.autocast_dtype, None
        try:
            with ieee_float32():
                yield self
        finally:
            self.autocast_dtype = saved

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor, weights: ArchWeights) -> torch.Tensor:
        # No cast cache: each weight is used once per forward, and a captured step (nas/graphs.py)
        # must not keep casts made outside the graph.
        enabled = self.autocast_dtype is not None
        with torch.autocast(x.device.type, self.autocast_dtype, enabled=enabled, cache_enabled=False):
            s0 = s1 = self.stem(self.prepare(x))
            for cell, level in zip(self.cells, self.space.level_of_cell):
                s0, s1 = s1, cell(s0, s1, weights.ops[level], weights.edges[level])
            logits = self.classifier(self.global_pooling(s1))
        return logits.float() if self.autocast_dtype is not None else logits


def check_beta_swap(space: SearchSpace, target: Target, edge_params: bool) -> None:
    """`beta.swap_bug` (the released DA2S code feeds beta_reduce to normal cells and vice versa)
    exists only with one normal and one reduction level, beta, and one target for both."""
    if space.alpha_sharing != "global" or not edge_params:
        raise ConfigError("beta.swap_bug", True, "exists only with alpha_sharing: global and edge_params: true")
    if target.cells[0] != target.cells[1]:
        raise ConfigError("beta.swap_bug", True, "needs the same target for normal and reduction cells")


@dataclass
class AlphaConfig:
    init_std: float = field(default=1e-3, metadata={"min": 0.0})
    # DA2S's f(alpha): doubles the logits, and cubes them below -0.5.
    sharpen: bool = False
    lr: float = field(default=3e-4, metadata={"min": 0.0})
    # Alpha's learning rate is 0 before epoch round(warmup * epochs) (DA2S: epoch 8 of 50).
    warmup: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})


@dataclass
class BetaConfig:
    init_noise: float = field(default=1e-4, metadata={"min": 0.0})
    clip: float | None = 1.0
    lr: float = field(default=3e-4, metadata={"min": 0.0})
    # Reproduces the released DA2S code, which feeds beta_reduce to normal cells and vice versa.
    swap_bug: bool = False


class Architecture(nn.Module):
    """Alpha per level and, with `edge_params`, beta per edge group that has to choose.

    Beta of a group of M edges that keeps K starts at K/M (plus noise); the edge weights are
    M * softmax(min(beta, clip)), which are all 1 at the start and about M/K for the kept edges at
    convergence (docs/science.md §5.3, §5.8). Groups that keep all their edges have no beta.
    """

    def __init__(
        self,
        space: SearchSpace,
        target: Target,
        alpha: AlphaConfig | None = None,
        beta: BetaConfig | None = None,
        edge_params: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        alpha, beta = alpha or AlphaConfig(), beta or BetaConfig()
        self.space = space
        self.target = target
        self.edge_params = edge_params
        self.sharpen_alpha = alpha.sharpen
        self.beta_clip = beta.clip
        self.beta_swap_bug = beta.swap_bug
        if beta.swap_bug:
            check_beta_swap(space, target, edge_params)
        shape = (space.num_edges, space.num_ops)
        self.alphas = nn.ParameterList(
            nn.Parameter(alpha.init_std * torch.randn(shape, generator=generator)) for _ in space.levels
        )
        self.betas = nn.ParameterList()
        # beta_slots[level][g] is the index into self.betas of group g's beta, or None.
        self.beta_slots: list[list[int | None]] = []
        for level in range(len(space.levels)):
            slots: list[int | None] = []
            for group in target.groups(level):
                if edge_params and group.needs_choice:
                    init = group.keep / group.size + beta.init_noise * torch.randn(group.size, generator=generator)
                    slots.append(len(self.betas))
                    self.betas.append(nn.Parameter(init))
                else:
                    slots.append(None)
            self.beta_slots.append(slots)

    def alpha_logits(self, level: int) -> torch.Tensor:
        alpha = self.alphas[level]
        return sharpen(alpha) if self.sharpen_alpha else alpha

    def op_weights(self) -> list[torch.Tensor]:
        return [F.softmax(self.alpha_logits(level), dim=-1) for level in range(len(self.alphas))]

    def clipped_beta(self, slot: int) -> torch.Tensor:
        beta = self.betas[slot]
        return beta if self.beta_clip is None else clip_beta(beta, self.beta_clip)

    def beta_groups(self, level: int) -> list[tuple[EdgeGroup, int]]:
        """(group, beta index) for the groups of `level` that have a beta."""
        groups = self.target.groups(level)
        return [(g, slot) for g, slot in zip(groups, self.beta_slots[level]) if slot is not None]

    def level_edge_weights(self, level: int) -> torch.Tensor | None:
        """Trained edge weight of every edge of `level` (no swap applied), or None if all are 1."""
        if not any(slot is not None for slot in self.beta_slots[level]):
            return None
        device = self.alphas[level].device
        parts = []
        for group, slot in zip(self.target.groups(level), self.beta_slots[level]):
            if slot is None:
                parts.append(torch.ones(group.size, device=device))
            else:
                parts.append(group.size * F.softmax(self.clipped_beta(slot), dim=-1))
        # Groups are in edge order (per-node groups partition the edges; a per-cell group is all).
        return torch.cat(parts)

    def edge_weights(self) -> list[torch.Tensor | None]:
        weights = [self.level_edge_weights(level) for level in range(len(self.alphas))]
        if self.beta_swap_bug:
            # The released DA2S code feeds beta_reduce to normal cells and beta_normal to reduction
            # cells (docs/science.md §5.3, D5); reproduced only on request.
            weights = weights[::-1]
        return weights

    def forward(self) -> ArchWeights:
        return ArchWeights(self.op_weights(), self.edge_weights())

    def alpha_parameters(self) -> list[nn.Parameter]:
        return list(self.alphas)

    def beta_parameters(self) -> list[nn.Parameter]:
        return list(self.betas)
