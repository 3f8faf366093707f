"""SearchConfig: everything one search depends on, from a plain dict (a YAML file, a sweep's
trial, `--set` overrides) to validated settings; and the schedules the settings imply.

    config = SearchConfig.resolve(preset="da2s", overrides=["epochs=10", "target=3 of 14"])

The defaults are the DARTS search settings; `nas.presets` holds the DA2S and multi-level
overlays (docs/science.md §2.6).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import config as cfg
from .config import ConfigError
from .data import CIFAR_TRAIN_SIZE, DataConfig
from .losses import LossConfig
from .ops import check_even_channels, op_list
from .presets import PRESETS
from .runtime import RuntimeConfig
from .space import AlphaSharing, SearchSpace, Target, TargetSpec
from .supernet import AlphaConfig, BetaConfig, check_beta_swap

# Architecture steps of the reference search: 50 epochs of ceil(25000 / 64) batches.
REFERENCE_ARCH_STEPS = 50 * math.ceil(25_000 / 64)
# The default cap of `arch_optim.lr_scale: auto` (docs/science.md D8).
AUTO_LR_SCALE_MAX = 100.0
# Fields that do not change what a search computes; a resumed search may differ in them.
RESUME_FREE = (
    "device",
    "data.root",
    "data.download",
    "runtime.fused",
    "runtime.channels_last",
    "runtime.amp",
    "runtime.compile",
    "runtime.cuda_graphs",
    "derive_targets",  # measured after the search; they do not change it
)


@dataclass
class ModelConfig:
    channels: int = field(default=16, metadata={"min": 2})
    cells: int = field(default=8, metadata={"min": 1, "max": 100})  # bounded: the space is built to validate
    nodes: int = field(default=4, metadata={"min": 1, "max": 16})
    stem_multiplier: int = field(default=3, metadata={"min": 1})


@dataclass
class ArchOptimConfig:
    betas: tuple[float, ...] = (0.5, 0.999)
    weight_decay: float = field(default=1e-3, metadata={"min": 0.0})
    # Multiplies the alpha and beta learning rates; `auto` = reference steps / this run's steps
    # (docs/science.md D8): a short search needs larger steps for alpha and beta to move.
    lr_scale: float | Literal["auto"] = 1.0
    # The most `auto` gives (D8): a search of a few steps would otherwise get a scale of thousands,
    # an Adam step of about one unit of alpha per step, and diverge. A number in lr_scale is not capped.
    lr_scale_auto_max: float = field(default=AUTO_LR_SCALE_MAX, metadata={"gt": 0.0})
    # Second order: the Hessian-vector product's central differences at w +- R v with
    # R = hvp_radius / ||v|| (docs/science.md §2.5); 0.01 is the reference's and measured the most
    # accurate of 1e-3 to 1e-2 in float32 and float64 alike (bench/hypergradient.py).
    hvp_radius: float = field(default=0.01, metadata={"gt": 0.0})

    def validate(self, path: str) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{path}.betas", list(self.betas), "expected two numbers in [0, 1)")
        if self.lr_scale != "auto" and self.lr_scale <= 0:
            raise ConfigError(f"{path}.lr_scale", self.lr_scale, "must be > 0 or 'auto'")


@dataclass
class WeightOptimConfig:
    """SGD of the supernet's weights (the `weights:` section of a config). Not to be confused with
    the architecture weights (softmax of alpha, edge weights of beta: ArchWeights) or the loss
    terms' weights (`loss_weights`, LossConfig.weights_at)."""

    lr: float = field(default=0.025, metadata={"gt": 0.0})
    lr_min: float = field(default=0.001, metadata={"min": 0.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    weight_decay: float = field(default=3e-4, metadata={"min": 0.0})
    grad_clip: float | None = field(default=5.0, metadata={"gt": 0.0})


@dataclass
class DiscretizeConfig:
    bn_recal_batches: int = field(default=20, metadata={"min": 1})


@dataclass
class SearchConfig:
    """Everything one search depends on. Defaults are the DARTS search settings."""

    preset: Literal["darts", "da2s", "multilevel"] | None = None
    seed: int = 2
    epochs: int = field(default=50, metadata={"min": 1})
    batch_size: int = field(default=64, metadata={"min": 2})
    order: Literal["first", "second"] = "first"
    ops: str | tuple[str, ...] = "darts"
    alpha_sharing: AlphaSharing = "global"
    edge_params: bool = False
    # As written (`[2, 2, 2, 2]`, `3 of 14`, per cell type or level); validate() stores its
    # canonical form, and resolved_target() the parsed Target.
    target: TargetSpec = (2, 2, 2, 2)
    # Further targets the finished search is derived and measured under (docs/science.md D14), as
    # if searched under each: only where the target does not shape the search (no edge parameters).
    derive_targets: tuple[TargetSpec, ...] = ()
    model: ModelConfig = field(default_factory=ModelConfig)
    alpha: AlphaConfig = field(default_factory=AlphaConfig)
    beta: BetaConfig = field(default_factory=BetaConfig)
    arch_optim: ArchOptimConfig = field(default_factory=ArchOptimConfig)
    weights: WeightOptimConfig = field(default_factory=WeightOptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    discretize: DiscretizeConfig = field(default_factory=DiscretizeConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # ----------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SearchConfig:
        return cfg.from_dict(cls, data)

    @classmethod
    def resolve(
        cls,
        preset: str | None = None,
        file: str | os.PathLike | Mapping[str, Any] | None = None,
        overrides: Iterable[str] = (),
        data_root: str | None = None,
    ) -> SearchConfig:
        """Preset defaults, then the YAML file (a path or a mapping), then `--set` overrides; the
        preset comes from the argument, else the file's `preset:`. `data_root` wins over data.root."""
        raw = cfg.file_with_overrides(file, overrides)
        preset = preset or raw.get("preset")
        if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
            raise ConfigError("preset", preset, f"expected one of {', '.join(PRESETS)}")
        merged = cfg.deep_merge(PRESETS.get(preset, {}), raw)
        if preset is not None:
            merged["preset"] = preset
        if data_root:
            merged.setdefault("data", {})["root"] = data_root
        return cls.from_dict(merged)

    def validate(self, path: str = "") -> None:
        """Relations between fields; the op list, the space and the target are checked by building
        them (nas.ops, SearchSpace, Target.parse), once: the objects are kept for the search."""
        self.op_names()
        check_even_channels(self.model.channels, "model.channels")
        target = self.resolved_target()
        self.target = target.to_spec()
        self._target = (self.target, target)
        extra: list[Target] = []
        for i, spec in enumerate(self.derive_targets):
            other = Target.parse(spec, target.space, f"derive_targets[{i}]")
            if other == target or other in extra:
                raise ConfigError(
                    f"derive_targets[{i}]", spec, "repeats the search's target or an earlier entry; list each once"
                )
            extra.append(other)
        if extra and self.search_uses_target():
            raise ConfigError(
                "derive_targets",
                [t.to_spec() for t in extra],
                "must be empty with edge_params: true: the target shapes such a search (beta's layout, the "
                "edge-count and edge-entropy terms), so deriving it under another target does not stand for a "
                "search under that target; search once per target, or re-derive explicitly with "
                "`python -m nas derive` (docs/science.md D14)",
            )
        self.derive_targets = tuple(t.to_spec() for t in extra)
        if not self.edge_params:
            for name in ("edge_entropy", "edge_count"):
                if getattr(self.loss, name).weight > 0:
                    raise ConfigError(
                        f"loss.{name}.weight",
                        getattr(self.loss, name).weight,
                        "needs edge_params: true (beta); set it to 0",
                    )
        if self.beta.swap_bug:
            check_beta_swap(target.space, target, self.edge_params)

    # ----------------------------------------------------------------- derived objects
    # The space and the target are built once and kept (as plain attributes, not fields: to_dict,
    # equality and pickling see the settings only); a changed field builds them anew.
    def op_names(self) -> tuple[str, ...]:
        return op_list(self.ops)

    def space(self) -> SearchSpace:
        key = (self.op_names(), self.model.nodes, self.model.cells, self.alpha_sharing)
        kept = self.__dict__.get("_space")
        if kept is None or kept[0] != key:
            kept = self._space = (key, SearchSpace(*key))
        return kept[1]

    def resolved_target(self, space: SearchSpace | None = None) -> Target:
        space = space or self.space()
        kept = self.__dict__.get("_target")
        if kept is not None and kept[0] == self.target and kept[1].space == space:
            return kept[1]
        target = Target.parse(self.target, space)
        self._target = (self.target, target)
        return target

    def resolved_derive_targets(self, space: SearchSpace | None = None) -> list[Target]:
        space = space or self.space()
        return [Target.parse(spec, space, f"derive_targets[{i}]") for i, spec in enumerate(self.derive_targets)]

    def search_uses_target(self) -> bool:
        """Whether the target changes what the search trains, not only how it is derived: it lays out
        beta and drives the edge terms, which exist only with edge parameters (docs/science.md D14)."""
        return self.edge_params

    def to_dict(self) -> dict[str, Any]:
        return cfg.to_dict(self)

    def method(self) -> str:
        """A short name of the method for tables: the preset, else a description of the fields."""
        if self.preset:
            return self.preset
        return ("beta" if self.edge_params else "alpha") + f"-{self.alpha_sharing}"


def steps_per_epoch(config: SearchConfig) -> int:
    """Weight steps per epoch that the config's data split gives (ceil(train images / batch))."""
    used = config.data.subset or CIFAR_TRAIN_SIZE
    return math.ceil(math.floor(config.data.train_portion * used) / config.batch_size)


def arch_lr_scale(config: SearchConfig, steps_per_epoch: int) -> float:
    """The factor on the alpha and beta learning rates: `arch_optim.lr_scale`, or for `auto` the
    reference's architecture steps over this search's, at most `arch_optim.lr_scale_auto_max`."""
    if config.arch_optim.lr_scale == "auto":
        return min(auto_lr_scale(config, steps_per_epoch), config.arch_optim.lr_scale_auto_max)
    return float(config.arch_optim.lr_scale)


def auto_lr_scale(config: SearchConfig, steps_per_epoch: int) -> float:
    """The reference's architecture steps over this search's, uncapped."""
    return REFERENCE_ARCH_STEPS / (config.epochs * steps_per_epoch)


def lr_scale_capped_message(config: SearchConfig, steps_per_epoch: int) -> str | None:
    """Why `auto` gives less than the step ratio, naming the field and the step counts; None if it does not."""
    if config.arch_optim.lr_scale != "auto":
        return None
    raw = auto_lr_scale(config, steps_per_epoch)
    cap = config.arch_optim.lr_scale_auto_max
    if raw <= cap:
        return None
    steps = config.epochs * steps_per_epoch
    return (
        f"arch_optim.lr_scale: auto would be {REFERENCE_ARCH_STEPS} reference steps / {steps} architecture steps "
        f"({config.epochs} epochs x {steps_per_epoch}) = {raw:.4g}; capped at arch_optim.lr_scale_auto_max = "
        f"{cap:g} (docs/science.md D8), so alpha and beta travel about {100 * cap / raw:.2g} % of the reference's "
        f"distance; give lr_scale a number to go beyond it"
    )
