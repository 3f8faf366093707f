"""The sweep's space as an Optuna define-by-run function, and its sampler.

Parameters are suggested in the order the YAML lists them, so a `when` condition can refer to any
parameter above it (or to a fixed setting under `search:`). The space is an object, not a closure:
Ray's OptunaSearch pickles it with the study when it saves the sweep's state.

A grid that is not a product of its choices (`when`, a folded target) is a list of points: Optuna's
grid sampler goes through their indices (`grid_point`) and each trial gets its point's fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

from nas.config import flatten_mapping

from .config import GRID_POINT, ParamSpec, SweepConfig


class SpaceSampler:
    def __init__(
        self, space: Mapping[str, ParamSpec], fixed: Mapping[str, Any], points: list[dict[str, Any]] | None = None
    ):
        self.space = dict(space)
        self.fixed = flatten_mapping(fixed)
        self.points = points

    @classmethod
    def for_sweep(cls, sweep: SweepConfig) -> SpaceSampler:
        points = sweep.grid_points() if sweep.sampler_type() == "grid" and not sweep.grid_is_product() else None
        return cls(sweep.space, sweep.search, points)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any] | None:
        if self.points is not None:
            index = trial.suggest_categorical(GRID_POINT, list(range(len(self.points))))
            return dict(self.points[index])
        values: dict[str, Any] = {}
        for name, spec in self.space.items():
            if spec.when and not all(_lookup(key, values, self.fixed) == want for key, want in spec.when.items()):
                continue
            values[name] = suggest(trial, name, spec)
        return None


def _lookup(key: str, sampled: Mapping[str, Any], fixed: Mapping[str, Any]) -> Any:
    return sampled[key] if key in sampled else fixed.get(key)


def suggest(trial: optuna.Trial, name: str, spec: ParamSpec) -> Any:
    kind = spec.kind()
    if kind == "categorical":
        return trial.suggest_categorical(name, list(spec.choices))
    if kind == "int":
        return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(name, float(spec.low), float(spec.high), step=spec.step, log=spec.log)


def make_sampler(sweep: SweepConfig) -> optuna.samplers.BaseSampler:
    seed = sweep.sampler.seed
    kind = sweep.sampler_type()
    if kind == "grid" and not sweep.grid_is_product():
        return optuna.samplers.GridSampler({GRID_POINT: list(range(sweep.grid_size()))}, seed=seed)
    if kind == "grid":
        return optuna.samplers.GridSampler(sweep.grid(), seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)
