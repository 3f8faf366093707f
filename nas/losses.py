"""Architecture regularisers and their weight schedules (docs/science.md §5.4-5.5, §5.9, §6.2).

The architecture loss of a search is

    L_val = CE + sum over terms t of  weight_t * schedule_t(epoch) * term_t(alpha, beta)

with the terms `op_entropy` (entropy of every edge's op weights, summed over edges and levels),
`edge_entropy` (entropy of every edge group's softmax(min(beta, 1))) and `edge_count`
((sum of the positive clipped betas - K)^2 per edge group). The DA2S code's loss
`CE + 0.1 * l(e) * [log_(e) * H_alpha + 4 * (0.2 * count + H_beta)]` is the three terms with weights
0.1, 0.4 and 0.08 and schedules `linear*log_`, `linear`, `linear` (presets.py).

Schedules are functions of the 1-based epoch e and the configured number of epochs EP, built so
that they keep their shape in a shorter search and equal the reference's at EP = 50: the
warm-up epoch is W = round(warmup * EP) (8 at EP = 50 with the default 0.16), and the time scales of
`exp` and `sigmoid` are fractions of EP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .config import ConfigError
from .supernet import Architecture

LOSS_TERMS = ("op_entropy", "edge_entropy", "edge_count")
SCHEDULE_FACTORS = ("const", "linear", "log", "exp", "step", "sigmoid")
# The reference's warm-up epoch E = 8 of EP = 50.
DEFAULT_WARMUP = 0.16


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """-sum p log p along `dim`, with 0 log 0 = 0 (sharpened logits can underflow to p = 0)."""
    return -torch.special.xlogy(p, p).sum(dim)


def level_scales(arch: Architecture, weighting: str = "cells") -> list[float]:
    """The factor of each level's share of a term. `sum`: 1 for every level, so levels of shared
    alpha count once per level (5 stage levels get 5 edges' worth of pressure per edge position where
    global sharing gets 2). `cells`: the level's cells over the cells of its type (normal or
    reduction), so every cell type gets the same total pressure however finely it is shared; with
    global sharing both factors are 1 and the loss is the reference's (docs/science.md §6.2)."""
    levels = arch.space.levels
    if weighting == "sum":
        return [1.0] * len(levels)
    per_type = {kind: sum(len(lv.cells) for lv in levels if lv.reduction == kind) for kind in (False, True)}
    return [len(lv.cells) / per_type[lv.reduction] for lv in levels]


def op_entropy(arch: Architecture, weighting: str = "cells") -> torch.Tensor:
    """Sum over levels and edges of H(softmax(f(alpha_edge))): on the same (sharpened) op weights
    that the forward pass uses; each level's sum scaled by `level_scales`."""
    scales = level_scales(arch, weighting)
    return sum(scale * entropy(w).sum() for scale, w in zip(scales, arch.op_weights()))


def edge_entropy(arch: Architecture, weighting: str = "cells") -> torch.Tensor:
    """Sum over edge groups with beta of H(softmax(min(beta, 1))), each level scaled by `level_scales`."""
    terms = []
    for level, scale in enumerate(level_scales(arch, weighting)):
        for _, slot in arch.beta_groups(level):
            terms.append(scale * entropy(F.softmax(arch.clipped_beta(slot), dim=-1)))
    return torch.stack(terms).sum() if terms else _zero(arch)


def edge_count_loss(arch: Architecture, weighting: str = "cells") -> torch.Tensor:
    """Sum over edge groups with beta of (sum of positive min(beta, 1) - K)^2: drives exactly K
    clipped betas to the cap and the rest below zero. Each level scaled by `level_scales`."""
    terms = []
    for level, scale in enumerate(level_scales(arch, weighting)):
        for group, slot in arch.beta_groups(level):
            b = arch.clipped_beta(slot)
            positive = torch.where(b > 0, b, torch.zeros_like(b)).sum()
            terms.append(scale * (positive - group.keep) ** 2)
    return torch.stack(terms).sum() if terms else _zero(arch)


def _zero(arch: Architecture) -> torch.Tensor:
    return arch.alphas[0].new_zeros(())


TERM_FUNCTIONS = {"op_entropy": op_entropy, "edge_entropy": edge_entropy, "edge_count": edge_count_loss}


def warmup_epoch(warmup: float, epochs: int) -> int:
    """The 1-based warm-up epoch W for a warm-up given as a fraction of the epochs."""
    return max(1, math.floor(warmup * epochs + 0.5))


def _factor(name: str, e: int, ep: int, w: int) -> float:
    """One schedule factor at 1-based epoch e of ep; a trailing `_` is the warm-up variant."""
    if name.endswith("_"):
        base = name[:-1]
        # The reference's log_ starts at e == W (value 0); the other warm-up variants after W.
        if (e < w) if base == "log" else (e <= w):
            return 0.0
        span = ep - w
        if base == "const":
            return 1.0
        if base == "linear":
            return (e - w) / span if span > 0 else 1.0
        if base == "log":
            return math.log(e - w + 1) / math.log(span) if span > 1 else 1.0
        if base == "exp":
            return 2.0 ** ((e - ep) / (ep / 10))
        if base == "step":
            for quarter, value in ((1, 0.0), (2, 1 / 3), (3, 2 / 3)):
                if e < span * quarter / 4 + w:
                    return value
            return 1.0
        if base == "sigmoid":
            scale = 0.08 * ep
            return 1.0 / (1.0 + math.exp(-((e - w) / scale - span / (2 * scale))))
    else:
        if name == "const":
            return 1.0
        if name == "linear":
            return (e - 1) / (ep - 1) if ep > 1 else 1.0
        if name == "log":
            return math.log(e) / math.log(ep) if ep > 1 else 1.0
        if name == "exp":
            return 2.0 ** ((e - ep) / (ep / 10))
        if name == "step":
            for quarter, value in ((1, 0.0), (2, 1 / 3), (3, 2 / 3)):
                if e < ep * quarter / 4:
                    return value
            return 1.0
        if name == "sigmoid":
            scale = ep / 10
            return 1.0 / (1.0 + math.exp(-(e - ep / 2) / scale))
    raise ValueError(f"unknown schedule factor {name!r}")


def parse_schedule(spec: str, path: str) -> tuple[str, ...]:
    """`linear*log_` as ("linear", "log_"); names are checked (`sig` is short for `sigmoid`)."""
    factors = []
    for part in spec.split("*"):
        name = part.strip()
        warm = name.endswith("_")
        base = name[:-1] if warm else name
        base = "sigmoid" if base == "sig" else base
        if base not in SCHEDULE_FACTORS:
            raise ConfigError(
                path,
                spec,
                f"unknown schedule factor {name!r}; allowed: {', '.join(SCHEDULE_FACTORS)}, "
                "each with a trailing '_' for its warm-up variant, joined by '*'",
            )
        factors.append(base + "_" * warm)
    return tuple(factors)


@dataclass
class LossTerm:
    """One weighted regulariser: weight * product of schedule factors."""

    weight: float = field(default=0.0, metadata={"min": 0.0})
    schedule: str = "const"
    warmup: float = field(default=DEFAULT_WARMUP, metadata={"min": 0.0, "max": 1.0})

    def validate(self, path: str) -> None:
        parse_schedule(self.schedule, f"{path}.schedule")

    def weight_at(self, epoch: int, epochs: int) -> float:
        w = warmup_epoch(self.warmup, epochs)
        value = self.weight
        for f in parse_schedule(self.schedule, "schedule"):
            value *= _factor(f, epoch, epochs, w)
        return value


@dataclass
class LossConfig:
    op_entropy: LossTerm = field(default_factory=LossTerm)
    edge_entropy: LossTerm = field(default_factory=LossTerm)
    edge_count: LossTerm = field(default_factory=LossTerm)
    # How levels of shared alpha/beta add up in each term (`level_scales`, docs/science.md D13):
    # `cells` (the same pressure per cell type whatever the sharing) or `sum` (one full share per level).
    level_weighting: Literal["sum", "cells"] = "cells"

    def terms(self) -> dict[str, LossTerm]:
        return {name: getattr(self, name) for name in LOSS_TERMS}

    def weights_at(self, epoch: int, epochs: int) -> dict[str, float]:
        return {name: term.weight_at(epoch, epochs) for name, term in self.terms().items()}


def regularisers(
    arch: Architecture, weights: dict[str, float], level_weighting: str = "cells"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the terms whose weight is non-zero, and every term's raw value."""
    values = {name: fn(arch, level_weighting) for name, fn in TERM_FUNCTIONS.items()}
    total = _zero(arch)
    for name, value in values.items():
        if weights.get(name, 0.0):
            total = total + weights[name] * value
    return total, values
