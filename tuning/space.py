"""The Optuna side of a sweep: its space as a define-by-run function, its sampler, and the searcher
that Ray Tune asks for trials.

Parameters are suggested in the order the YAML lists them, so a `when` condition can refer to any
parameter above it (or to a fixed setting under `search:`). The space is an object, not a closure:
Ray's OptunaSearch pickles it with the study when it saves the sweep's state.

A grid that is not a product of its choices (`when`, a folded target) is a list of points: Optuna's
grid sampler goes through their indices (`grid_point`) and each trial gets its point's fields.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune.search.optuna import OptunaSearch

from nas.config import flatten_mapping

from .config import GRID_POINT, ParamSpec, SweepConfig
from .storage import Storage


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
        size = sweep.sampler.population_size
        return NSGAIISampler(seed=seed, **({"population_size": size} if size else {}))
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable: Ray saves the sweep's searcher (and the study and sampler
    in it) by pickling it, and Optuna >= 5.1 gives its genetic samplers a `threading.Lock`, which
    cannot be pickled. The pickled state leaves the lock out and a restored sampler makes a new one.

    The population is not in the sampler: each trial's generation is a system attribute of the trial
    in the study (the journal), so the sampler's cache of it is dropped with the lock and rebuilt from
    the study on first use: a resumed sweep continues its generations. The class keeps Optuna's own
    attribute names (a subclass would otherwise get keys of its own name), so a study started by
    Optuna's class, or read by it, sees the same generations."""

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k != "_thread_lock"}
        if "_cached_study_id" in state:
            state["_cached_study_id"] = None  # the generation cache is rebuilt from the study
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


# Optuna names the generation and parent keys after the class (__init_subclass__); keep its own.
for _key in ("_GENERATION_KEY", "_PARENT_CACHE_KEY_PREFIX"):
    if hasattr(optuna.samplers.NSGAIISampler, _key):
        setattr(NSGAIISampler, _key, getattr(optuna.samplers.NSGAIISampler, _key))


class SweepSearch(OptunaSearch):
    """OptunaSearch that gives Optuna only final results. Without an Optuna pruner the per-epoch
    values would be unused (early stopping is the Tune scheduler's job), and final-only objectives
    such as discretized accuracy after BN recalibration have no per-epoch value.

    With `mirror`, every change of the study's journal is copied there (the sweep's storage) before
    Ray can save a state that refers to it, so that a new driver can resume the sweep."""

    def __init__(self, *args, journal: str | None = None, mirror: Storage | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.journal, self.mirror = journal, mirror

    def _mirror(self) -> None:
        if getattr(self, "mirror", None) is not None and self.journal and os.path.exists(self.journal):
            self.mirror.upload(self.journal)

    def suggest(self, trial_id: str):
        suggestion = super().suggest(trial_id)
        self._mirror()
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        super().on_trial_complete(trial_id, result, error)
        self._mirror()


def make_searcher(sweep: SweepConfig, journal: Path, mirror: Storage | None = None) -> SweepSearch:
    """The sweep's searcher: its space, its sampler and its study, which lives in the journal file
    `journal` (readable with optuna.load_study(study_name=NAME, storage=JournalStorage(
    JournalFileBackend(PATH)))), copied to `mirror` after every change where that is given."""
    objectives = sweep.objectives()
    multi = len(objectives) > 1
    return SweepSearch(
        journal=str(journal),
        mirror=mirror,
        space=SpaceSampler.for_sweep(sweep),
        study_name=sweep.name,
        storage=JournalStorage(JournalFileBackend(str(journal))),
        metric=[o.metric for o in objectives] if multi else objectives[0].metric,
        mode=[o.mode for o in objectives] if multi else objectives[0].mode,
        sampler=make_sampler(sweep),
    )
