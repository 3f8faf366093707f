"""Genotypes: one discrete cell per level, derived under a target edge configuration.

Derivation (docs/science.md §3, §5.7, D2, D12): in every edge group of the target, the `keep` edges
with the largest strength are kept, and each kept edge takes its strongest op other than `none`.
An edge's strength is what the supernet multiplied its output by:

* without edge parameters (DARTS): the weight of its strongest non-`none` op, softmax(alpha);
* with beta (DA2S): its trained edge weight M * softmax(min(beta, 1)), ties (several betas at the
  cap) broken by raw beta, so that under the search's own target this is the reference's ranking
  on raw beta.

Remaining ties go to the lower edge index, as Python's stable sort does in the reference code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .ops import check_op
from .space import EdgeGroup, SearchSpace, Target
from .supernet import Architecture

FORMAT = "nas-genotype/1"


@dataclass(frozen=True)
class CellGenotype:
    """A discrete cell: for each intermediate node, its (op, input node) pairs; inputs 0 and 1 are
    the cell inputs, 2.. the intermediate nodes. A node with no pair outputs zeros."""

    nodes: tuple[tuple[tuple[str, int], ...], ...]
    concat: tuple[int, ...]
    reduction: bool = False

    @classmethod
    def from_pairs(
        cls, pairs: Sequence[Sequence[Any]], concat: Sequence[int], reduction: bool, per_node: int = 2
    ) -> CellGenotype:
        """From the DARTS flat list of (op, input), `per_node` pairs per node."""
        pairs = [(str(op), int(i)) for op, i in pairs]
        nodes = tuple(tuple(pairs[k : k + per_node]) for k in range(0, len(pairs), per_node))
        return cls(nodes, tuple(int(c) for c in concat), reduction)

    def edges(self) -> list[tuple[int, int, str]]:
        """(node index counted from 2, input, op) for every kept edge."""
        return [(j + 2, i, op) for j, node in enumerate(self.nodes) for op, i in node]

    def count(self, op: str) -> int:
        return sum(1 for _, _, name in self.edges() if name == op)

    def check(self, path: str = "genotype") -> None:
        for j, node in enumerate(self.nodes):
            for op, i in node:
                check_op(op, path)
                if not 0 <= i < j + 2:
                    raise ConfigError(path, [op, i], f"node {j + 2} can only take inputs 0 to {j + 1}")
        for c in self.concat:
            if not 2 <= c < len(self.nodes) + 2:
                raise ConfigError(path, list(self.concat), f"concat indices must be 2 to {len(self.nodes) + 1}")

    def describe(self) -> str:
        return " | ".join(", ".join(f"{op}<-{i}" for op, i in node) or "zero" for node in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reduction": self.reduction,
            "nodes": [[[op, i] for op, i in node] for node in self.nodes],
            "concat": list(self.concat),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "genotype") -> CellGenotype:
        try:
            nodes = tuple(tuple((str(op), int(i)) for op, i in node) for node in data["nodes"])
            cell = cls(nodes, tuple(int(c) for c in data["concat"]), bool(data.get("reduction", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                path, data, f"expected {{'nodes': [[[op, input], ...], ...], 'concat': [...]}} ({err})"
            ) from None
        cell.check(path)
        return cell


@dataclass
class Genotype:
    """One cell description per level of the search (docs/science.md D1): `normal`/`reduce`
    for shared alpha, five stage levels for multi-level search, one per cell for `cell`."""

    levels: dict[str, CellGenotype]
    alpha_sharing: str = "global"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def normal(self) -> CellGenotype:
        return next(cell for cell in self.levels.values() if not cell.reduction)

    @property
    def reduce(self) -> CellGenotype:
        return next(cell for cell in self.levels.values() if cell.reduction)

    def skip_counts(self) -> dict[str, int]:
        return {name: cell.count("skip_connect") for name, cell in self.levels.items()}

    def describe(self) -> str:
        return "\n".join(f"{name}: {cell.describe()}" for name, cell in self.levels.items())

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": FORMAT,
            "alpha_sharing": self.alpha_sharing,
            "levels": {name: cell.to_dict() for name, cell in self.levels.items()},
        }
        if self.meta:
            data["meta"] = self.meta
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "genotype") -> Genotype:
        """Reads this project's form, or the DARTS form {normal, normal_concat, reduce, reduce_concat}."""
        if "levels" in data:
            levels = {
                str(name): CellGenotype.from_dict(cell, f"{path}.levels.{name}")
                for name, cell in data["levels"].items()
            }
            return cls(levels, str(data.get("alpha_sharing", "global")), dict(data.get("meta", {})))
        if "normal" in data and "reduce" in data:
            levels = {
                "normal": CellGenotype.from_pairs(data["normal"], data.get("normal_concat", range(2, 6)), False),
                "reduce": CellGenotype.from_pairs(data["reduce"], data.get("reduce_concat", range(2, 6)), True),
            }
            for name, cell in levels.items():
                cell.check(f"{path}.{name}")
            return cls(levels, "global")
        raise ConfigError(path, sorted(data), "expected a genotype with 'levels' or with 'normal' and 'reduce'")

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Genotype:
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError("genotype", str(path), f"is not valid JSON: {err}") from None


def _darts(normal: list, reduce: list) -> Genotype:
    return Genotype(
        {
            "normal": CellGenotype.from_pairs(normal, range(2, 6), False),
            "reduce": CellGenotype.from_pairs(reduce, range(2, 6), True),
        }
    )


# Published cells (their repositories' genotypes.py): DARTS first and second order (quark0/darts),
# P-DARTS (chenxin061/pdarts), PC-DARTS searched on CIFAR-10 and on ImageNet (yuhuixu1993/PC-DARTS).
PUBLISHED: dict[str, Genotype] = {
    "darts_v1": _darts(
        [("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
         ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    ),
    "darts_v2": _darts(
        [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
         ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    ),
    "pdarts": _darts(
        [("skip_connect", 0), ("dil_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
         ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("dil_conv_5x5", 4)],
        [("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
         ("max_pool_3x3", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1), ("dil_conv_5x5", 3)],
    ),
    "pc_darts_cifar": _darts(
        [("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
         ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
        [("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
         ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
    ),
    "pc_darts_imagenet": _darts(
        [("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 0), ("skip_connect", 1),
         ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("dil_conv_5x5", 4)],
        [("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 1),
         ("sep_conv_3x3", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_3x3", 3)],
    ),
}  # fmt: skip


def resolve_genotype(spec: str | os.PathLike) -> Genotype:
    """A published genotype by name, a genotype JSON file, or a search's output directory."""
    text = str(spec)
    if text in PUBLISHED:
        return PUBLISHED[text]
    path = Path(text)
    if path.is_dir():
        for name in ("genotype.json", "result.json"):
            if (path / name).exists():
                data = json.loads((path / name).read_text(encoding="utf-8"))
                return Genotype.from_dict(data.get("genotype", data), str(path / name))
        raise ConfigError("GENOTYPE", text, "is a directory without genotype.json or result.json")
    if path.is_file():
        return Genotype.load(path)
    raise ConfigError(
        "GENOTYPE",
        text,
        f"expected a published name ({', '.join(PUBLISHED)}), a genotype JSON file or a search's output directory",
    )


def select_edges(
    groups: Sequence[EdgeGroup], strength: Sequence[float], tie_break: Sequence[float] | None = None
) -> list[int]:
    """Kept edge indices, in order of decreasing strength within each group."""
    kept: list[int] = []
    for group in groups:
        ranked = sorted(
            group.edges,
            key=lambda e: (-strength[e], -(tie_break[e] if tie_break is not None else 0.0), e),
        )
        kept.extend(ranked[: group.keep])
    return kept


def derive_cell(
    space: SearchSpace,
    groups: Sequence[EdgeGroup],
    op_weights: torch.Tensor,
    edge_strength: torch.Tensor | None = None,
    tie_break: torch.Tensor | None = None,
    reduction: bool = False,
) -> CellGenotype:
    """The discrete cell for one level. `op_weights` (edges x ops) choose each edge's op (never
    `none`) and, when `edge_strength` is None, rank the edges too."""
    weights = op_weights.detach().double().cpu()
    candidates = [k for k, name in enumerate(space.ops) if name != "none"]
    best_value, best_index = weights[:, candidates].max(dim=1)
    strength = best_value if edge_strength is None else edge_strength.detach().double().cpu()
    ties = None if tie_break is None else tie_break.detach().double().cpu().tolist()
    kept = select_edges(groups, strength.tolist(), ties)
    nodes: list[list[tuple[str, int]]] = [[] for _ in range(space.nodes)]
    for e in kept:
        node, source = space.edges[e]
        nodes[node].append((space.ops[candidates[int(best_index[e])]], source))
    concat = tuple(range(2, space.nodes + 2))
    return CellGenotype(tuple(tuple(node) for node in nodes), concat, reduction)


def derive_genotype(arch: Architecture, target: Target | None = None) -> Genotype:
    """The genotype of `arch` under `target` (default: the target it was searched with)."""
    target = target or arch.target
    space = arch.space
    levels = {}
    with torch.no_grad():
        op_weights = arch.op_weights()
        for index, level in enumerate(space.levels):
            strength = tie_break = None
            if arch.edge_params:
                strength = arch.level_edge_weights(index)
                if strength is not None:
                    tie_break = torch.ones_like(strength) * float("inf")
                    for group, slot in arch.beta_groups(index):
                        tie_break[list(group.edges)] = arch.betas[slot].detach()
            levels[level.name] = derive_cell(
                space, target.groups(index), op_weights[index], strength, tie_break, level.reduction
            )
    return Genotype(levels, space.alpha_sharing, {"target": target.describe()})
