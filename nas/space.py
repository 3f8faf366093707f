"""The search space: candidate ops, cell DAG, cell layout, levels (alpha groups) and targets.

A cell has 2 input nodes and `nodes` intermediate nodes; intermediate node j (0-based) takes an
edge from every earlier node, so it has j + 2 inputs. Edges are numbered node by node in input
order (0-1, 2-4, 5-8, 9-13 for 4 nodes). docs/science.md §1.2, §1.5, §3.2, D1 and D2.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from .config import ConfigError
from .ops import check_op

# How cells share alpha (and beta): one level per cell type, per stage, or per cell.
AlphaSharing = Literal["global", "stage", "cell"]
# A target as configs write it: `[2, 2, 2, 2]`, `3 of 14`, or a mapping per cell type or level
# (Target.parse reads it, Target.to_spec writes it).
TargetSpec = Any
ALPHA_SHARING: tuple[str, ...] = typing.get_args(AlphaSharing)


@dataclass(frozen=True)
class Level:
    """One group of cells that shares an alpha (and beta): the paper's "level"."""

    name: str
    reduction: bool
    cells: tuple[int, ...]


@dataclass(frozen=True)
class SearchSpace:
    ops: tuple[str, ...]
    nodes: int = 4
    cells: int = 8
    alpha_sharing: str = "global"

    def __post_init__(self) -> None:
        for op in self.ops:
            check_op(op)
        if len(set(self.ops)) != len(self.ops):
            raise ConfigError("ops", list(self.ops), "lists an op twice")
        if len([op for op in self.ops if op != "none"]) < 1:
            raise ConfigError("ops", list(self.ops), "needs at least one op other than 'none'")
        if self.alpha_sharing not in ALPHA_SHARING:
            raise ConfigError("alpha_sharing", self.alpha_sharing, f"expected one of {', '.join(ALPHA_SHARING)}")

    @property
    def num_ops(self) -> int:
        return len(self.ops)

    @cached_property
    def edges(self) -> tuple[tuple[int, int], ...]:
        """(intermediate node index, input node index) per edge; inputs 0, 1 are the cell inputs."""
        return tuple((j, i) for j in range(self.nodes) for i in range(j + 2))

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    def node_edges(self, node: int) -> range:
        """Edge indices entering intermediate node `node` (0-based)."""
        start = node * (node + 3) // 2
        return range(start, start + node + 2)

    @cached_property
    def reduction_cells(self) -> tuple[int, ...]:
        return tuple(sorted({self.cells // 3, 2 * self.cells // 3}))

    def is_reduction(self, cell: int) -> bool:
        return cell in self.reduction_cells

    @cached_property
    def levels(self) -> tuple[Level, ...]:
        cells = range(self.cells)
        if self.alpha_sharing == "global":
            return (
                Level("normal", False, tuple(c for c in cells if not self.is_reduction(c))),
                Level("reduce", True, tuple(c for c in cells if self.is_reduction(c))),
            )
        if self.alpha_sharing == "cell":
            return tuple(Level(f"cell{c}", self.is_reduction(c), (c,)) for c in cells)
        # "stage": each run of normal cells between reductions is one level, each reduction another.
        levels: list[Level] = []
        run: list[int] = []
        stage = 1
        for c in cells:
            if self.is_reduction(c):
                if run:
                    levels.append(Level(f"normal{stage}", False, tuple(run)))
                    run = []
                levels.append(Level(f"reduce{stage}", True, (c,)))
                stage += 1
            else:
                run.append(c)
        if run:
            levels.append(Level(f"normal{stage}", False, tuple(run)))
        return tuple(levels)

    @cached_property
    def level_of_cell(self) -> tuple[int, ...]:
        index = {}
        for li, level in enumerate(self.levels):
            for c in level.cells:
                index[c] = li
        return tuple(index[c] for c in range(self.cells))

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.levels)

    def level_index(self, name: str) -> int:
        return self.level_names.index(name)


@dataclass(frozen=True)
class EdgeGroup:
    """Edges among which `keep` are kept: one node's inputs (per-node target) or a whole cell."""

    edges: tuple[int, ...]
    keep: int

    @property
    def size(self) -> int:
        return len(self.edges)

    @property
    def needs_choice(self) -> bool:
        return self.keep < self.size


_PER_CELL = re.compile(r"^\s*(\d+)\s*(?:of|/)\s*(\d+)\s*$")
_PER_NODE = re.compile(r"^\s*\[?\s*(\d+(?:\s*,\s*\d+)*)\s*,?\s*\]?\s*$")
TARGET_FORMS = "a per-node list such as [2, 2, 2, 2] or a per-cell count such as '3 of 14'"


@dataclass(frozen=True)
class CellTarget:
    """Target edge configuration of one cell: kept inputs per node, or K kept edges of the cell."""

    per_node: tuple[int, ...] | None = None
    per_cell: int | None = None

    @classmethod
    def parse(cls, spec: Any, space: SearchSpace, path: str) -> CellTarget:
        if isinstance(spec, CellTarget):
            target = spec
        elif isinstance(spec, (list, tuple)):
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in spec):
                raise ConfigError(path, spec, f"expected {TARGET_FORMS}")
            target = cls(per_node=tuple(spec))
        elif isinstance(spec, str) and (match := _PER_CELL.match(spec)):
            keep, total = int(match.group(1)), int(match.group(2))
            if total != space.num_edges:
                raise ConfigError(
                    path,
                    spec,
                    f"a cell with {space.nodes} nodes has {space.num_edges} edges; use 'K of {space.num_edges}'",
                )
            target = cls(per_cell=keep)
        elif isinstance(spec, str) and (match := _PER_NODE.match(spec)):
            target = cls(per_node=tuple(int(k) for k in match.group(1).split(",")))
        else:
            raise ConfigError(path, spec, f"expected {TARGET_FORMS}")
        target.check(space, path)
        return target

    def check(self, space: SearchSpace, path: str) -> None:
        if self.per_node is not None:
            if len(self.per_node) != space.nodes:
                raise ConfigError(
                    path, list(self.per_node), f"expected one count per intermediate node ({space.nodes} of them)"
                )
            for j, keep in enumerate(self.per_node):
                if not 1 <= keep <= j + 2:
                    raise ConfigError(
                        path, list(self.per_node), f"node {j} has {j + 2} inputs; its count must be 1 to {j + 2}"
                    )
        elif self.per_cell is not None:
            if not 1 <= self.per_cell <= space.num_edges:
                raise ConfigError(path, f"{self.per_cell} of {space.num_edges}", f"K must be 1 to {space.num_edges}")
        else:
            raise ConfigError(path, None, f"expected {TARGET_FORMS}")

    def groups(self, space: SearchSpace) -> tuple[EdgeGroup, ...]:
        if self.per_node is not None:
            return tuple(EdgeGroup(tuple(space.node_edges(j)), keep) for j, keep in enumerate(self.per_node))
        return (EdgeGroup(tuple(range(space.num_edges)), self.per_cell),)

    def kept_edges(self, space: SearchSpace) -> int:
        return sum(g.keep for g in self.groups(space))

    def describe(self, space: SearchSpace) -> str:
        if self.per_node is not None:
            return "[" + ", ".join(str(k) for k in self.per_node) + "]"
        return f"{self.per_cell} of {space.num_edges}"


@dataclass(frozen=True)
class Target:
    """The target edge configuration of every level. One object drives the edge-count loss, the
    beta layout and the derivation, so they cannot disagree (docs/science.md §3.2)."""

    space: SearchSpace
    cells: tuple[CellTarget, ...]  # one per level, in level order

    @classmethod
    def parse(cls, spec: Any, space: SearchSpace, path: str = "target") -> Target:
        """`spec`: one cell target for every level, or a mapping from `normal` / `reduce` (cell
        types) and level names to cell targets; a level name wins over its cell type."""
        if isinstance(spec, Target):
            return spec
        if isinstance(spec, Mapping):
            allowed = ("normal", "reduce", *space.level_names)
            for key in spec:
                if key not in allowed:
                    raise ConfigError(
                        f"{path}.{key}", spec[key], f"unknown level; allowed: {', '.join(dict.fromkeys(allowed))}"
                    )
            cells = []
            for level in space.levels:
                kind = "reduce" if level.reduction else "normal"
                key = level.name if level.name in spec else kind
                if key not in spec:
                    raise ConfigError(
                        f"{path}.{kind}", None, f"missing: give a target for the {kind} cells or for level {level.name}"
                    )
                cells.append(CellTarget.parse(spec[key], space, f"{path}.{key}"))
            return cls(space, tuple(cells))
        cell = CellTarget.parse(spec, space, path)
        return cls(space, tuple(cell for _ in space.levels))

    def for_level(self, level: int) -> CellTarget:
        return self.cells[level]

    def groups(self, level: int) -> tuple[EdgeGroup, ...]:
        return self.cells[level].groups(self.space)

    def describe(self) -> str:
        texts = [cell.describe(self.space) for cell in self.cells]
        if len(set(texts)) == 1:
            return texts[0]
        return "; ".join(f"{level.name}: {text}" for level, text in zip(self.space.levels, texts))

    def slug(self) -> str:
        """A short file-name-safe form, e.g. `2-2-2-2` or `3of14`."""
        return re.sub(r"[^0-9A-Za-z]+", "-", self.describe().replace(" of ", "of")).strip("-")

    def to_spec(self) -> Any:
        """A plain value that `Target.parse` reads back to an equal target."""
        texts = {level.name: cell for level, cell in zip(self.space.levels, self.cells)}
        if len(set(self.cells)) == 1:
            return _cell_spec(self.cells[0], self.space)
        return {name: _cell_spec(cell, self.space) for name, cell in texts.items()}


def _cell_spec(cell: CellTarget, space: SearchSpace) -> Any:
    return list(cell.per_node) if cell.per_node is not None else cell.describe(space)
