"""The discretized network built from the trained supernet, and its accuracy without fine-tuning
(docs/science.md §5.1 and D4). nas.metrics turns these into the reported metrics.

Each kept edge computes only its chosen op, with the supernet's trained op module; dropped edges
contribute exactly zero (they are not computed); stem, preprocessing and classifier are the
supernet's. Kept edges carry an edge weight: the one the method trained (DA2S: M * softmax(min(beta,
1)); 1 without edge parameters) or 1 for every kept edge (the convention of the retrained network).
Accuracy is measured in eval mode with the stored BN statistics, and again after BN recalibration
(running statistics re-estimated by forward passes in train mode, no gradient).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet, batches, stream_generator
from .genotype import CellGenotype, Genotype
from .supernet import Supernet


@dataclass(frozen=True)
class KeptEdge:
    edge: int
    op: int
    source: int
    weight: float


def kept_edges(supernet: Supernet, cell: CellGenotype, edge_weights: torch.Tensor | None) -> list[list[KeptEdge]]:
    """Per intermediate node, its kept edges as indices into the supernet cell."""
    space = supernet.space
    nodes = []
    for j, node in enumerate(cell.nodes):
        start = space.node_edges(j).start
        kept = []
        for op, source in node:
            edge = start + source
            weight = 1.0 if edge_weights is None else float(edge_weights[edge])
            kept.append(KeptEdge(edge, space.ops.index(op), source, weight))
        nodes.append(kept)
    return nodes


class DiscretizedNetwork(nn.Module):
    """The supernet restricted to a genotype. Shares (does not copy) the supernet's modules."""

    def __init__(
        self, supernet: Supernet, genotype: Genotype, edge_weights: Sequence[torch.Tensor | None] | None = None
    ):
        super().__init__()
        space = supernet.space
        if list(genotype.levels) != list(space.level_names):
            raise ValueError(
                f"genotype levels {list(genotype.levels)} do not match the supernet's {list(space.level_names)}"
            )
        self.supernet = supernet
        self.choices = [
            kept_edges(supernet, cell, None if edge_weights is None else edge_weights[level])
            for level, cell in enumerate(genotype.levels.values())
        ]

    def _cell(self, cell, s0: torch.Tensor, s1: torch.Tensor, nodes: list[list[KeptEdge]]) -> torch.Tensor:
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        n, c, h, w = states[1].shape
        if cell.reduction:
            h, w = (h + 1) // 2, (w + 1) // 2
        zeros = states[1].new_zeros(n, c, h, w)  # the output of a node without inputs
        for kept in nodes:
            total = zeros
            for k in kept:
                out = cell.edges[k.edge].ops[k.op](states[k.source])
                total = total + (out if k.weight == 1.0 else k.weight * out)
            states.append(total)
        return torch.cat(states[2:], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.supernet
        s0 = s1 = net.stem(net.prepare(x))
        for cell, level in zip(net.cells, net.space.level_of_cell):
            s0, s1 = s1, self._cell(cell, s0, s1, self.choices[level])
        return net.classifier(net.global_pooling(s1))


class BoundSupernet(nn.Module):
    """The supernet with fixed architecture weights, as a plain image -> logits module."""

    def __init__(self, supernet: Supernet, arch_weights):
        super().__init__()
        self.supernet = supernet
        self.arch_weights = arch_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.supernet(x, self.arch_weights)


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageSet, batch_size: int = 256) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `model` on `data`, in eval mode."""
    was_training = model.training
    model.eval()
    # Sums stay on the device until the end: one synchronisation per pass, not two per batch.
    correct = torch.zeros((), dtype=torch.long, device=data.labels.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.labels.device)
    for images, labels in batches(data, batch_size, torch.Generator(), augment=False, shuffle=False):
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        correct += (logits.argmax(1) == labels).sum()
    model.train(was_training)
    return 100.0 * correct.item() / len(data), loss_sum.item() / len(data)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batch_iter: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replaces every BN's running statistics by their cumulative average over the batches."""
    norms = _batchnorms(model)
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for images, _ in batch_iter:
        model(images)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    model.eval()


class _SavedBN:
    """Restores every BN buffer of a module on exit (recalibration must not leak into the supernet)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in _batchnorms(self.model)]
        return self

    def __exit__(self, *exc):
        for bn, state in zip(_batchnorms(self.model), self.saved):
            bn.load_state_dict(state)
        return False


def recalibrated_accuracy(
    model: nn.Module,
    supernet: Supernet,
    eval_set: ImageSet,
    recal_set: ImageSet,
    recal_batches: int = 20,
    batch_size: int = 64,
    seed: int = 0,
) -> float:
    """Accuracy (%) of `model` (built on `supernet`'s modules) after BN recalibration on
    `recal_batches` augmented batches of `recal_set`; the supernet's BN statistics are restored."""
    with _SavedBN(supernet):
        stream = batches(recal_set, batch_size, stream_generator(seed, 0, 7), augment=True, cycle=True)
        recalibrate_bn(model, (b for _, b in zip(range(recal_batches), stream)))
        acc, _ = accuracy(model, eval_set)
    return acc
