"""SweepConfig: a sweep YAML as validated objects, checked before Ray starts.

    name: table4                      # MLflow experiment and Ray experiment directory
    search: {preset: da2s, epochs: 12, model: {channels: 8}}   # fixed nas.SearchConfig fields
    space:                            # Optuna, one entry per dotted SearchConfig field
      preset: {choices: [darts, da2s]}
      target: {choices: ["[2, 2, 2, 2]", "3 of 14"], fold: true}   # grid only: see ParamSpec.fold
      loss.op_entropy.weight: {low: 0.01, high: 0.3, log: true, when: {preset: da2s}}
    objective: {metric: discretized_acc, mode: max}     # or a list: multi-objective
    sampler: {type: tpe, seed: 0}     # tpe | nsga2 | grid | random
    scheduler: {type: asha, grace_period: 2}            # none | asha (on supernet valid_acc)
    num_samples: 16
    concurrency: 2
    resources: {cpu: 1, gpu: 0.5}     # per trial
    storage: runs/ray                 # Ray results: a path, a shared filesystem or s3://, gs://
    storage_options: {endpoint: http://minio:9000, region: us-east-1}   # S3-compatible stores

Every value a trial can receive is checked here with nas.SearchConfig, so a bad op name, a target
that does not fit the cell or a negative weight stops the sweep before any trial starts, with the
path of the offending entry (e.g. `space.target.choices[2]`).
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nas.config import ConfigError, apply_overrides, flatten_mapping, from_dict, load_yaml, set_dotted, to_dict
from nas.metrics import EVAL_SET_METRICS
from nas.settings import SearchConfig

from .sections import (  # noqa: F401 (the sections are read from here too)
    CREDENTIAL_KEYS,
    EvalResourcesConfig,
    EvaluateConfig,
    MlflowConfig,
    Objective,
    ResourcesConfig,
    SamplerConfig,
    SchedulerConfig,
    StorageOptions,
)
from .storage import check_storage_text

# The one parameter Optuna samples in a grid that is not a product: the index of the trial's point
# in SweepConfig.grid_points(); the point's fields come with it (tuning.space.SpaceSampler).
GRID_POINT = "grid_point"


@dataclass
class ParamSpec:
    """One dimension of the Optuna space. `choices` make it categorical; otherwise `low`/`high`
    (with `log` or `step`) make it a float, or an int when `type: int`. `when` makes it conditional:
    it is sampled only if every listed field (sampled earlier, or fixed) has the listed value.

    `fold` (the `target` of a grid only): a trial whose search the target does not shape (no edge
    parameters: DARTS, multi-level) searches once, under the first choice, and is derived under the
    others (`derive_targets`), which gives each the result of its own search (docs/science.md D14);
    other trials search once per choice."""

    type: Literal["float", "int", "categorical"] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    when: dict[str, Any] | None = None
    fold: bool = False

    def validate(self, path: str) -> None:
        kind = self.kind()
        if self.fold and (kind != "categorical" or not path.endswith(".target")):
            raise ConfigError(f"{path}.fold", True, "only the categorical `target` of a grid can be folded")
        if kind == "categorical":
            if not self.choices:
                raise ConfigError(f"{path}.choices", self.choices, "needs at least one value")
            for i, choice in enumerate(self.choices):
                if not (choice is None or isinstance(choice, (bool, int, float, str))):
                    raise ConfigError(
                        f"{path}.choices[{i}]",
                        choice,
                        "must be a number, string, boolean or null (write a target as '[2, 2, 2, 2]')",
                    )
            return
        for name in ("low", "high"):
            if getattr(self, name) is None:
                raise ConfigError(f"{path}.{name}", None, f"a {kind} parameter needs low and high (or give choices)")
        if self.low > self.high:
            raise ConfigError(f"{path}.low", self.low, f"must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ConfigError(f"{path}.low", self.low, "must be > 0 with log: true")
        if self.log and self.step is not None:
            raise ConfigError(f"{path}.step", self.step, "cannot be combined with log: true")
        if kind == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ConfigError(f"{path}.low", self.low, "an int parameter needs integer low and high")

    def kind(self) -> str:
        if self.type is not None:
            return self.type
        return "categorical" if self.choices is not None else "float"

    def values(self) -> list[Any]:
        """Values to check against SearchConfig: every choice, or the ends of the range."""
        if self.kind() == "categorical":
            return list(self.choices)
        if self.kind() == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


@dataclass
class SweepConfig:
    name: str = "sweep"
    description: str = ""
    search: dict[str, Any] = field(default_factory=dict)
    space: dict[str, ParamSpec] = field(default_factory=dict)
    objective: Objective | tuple[Objective, ...] = field(default_factory=Objective)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Trials to run; with the grid sampler, defaults to the size of the grid.
    num_samples: int | None = field(default=None, metadata={"min": 1})
    concurrency: int = field(default=1, metadata={"min": 1})
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    # How often a trial whose process dies is retried (from its last epoch checkpoint).
    max_failures: int = field(default=2, metadata={"min": 0})
    # Ray results and every file that must outlive a node: a local path (one machine), a path on a
    # filesystem every node mounts at the same place (NFS, EFS), or an s3:// or gs:// URI.
    storage: str = "runs/ray"
    storage_options: StorageOptions = field(default_factory=StorageOptions)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    # How the report names a trial's method, e.g. "{alpha_sharing}, H={loss.op_entropy.weight}";
    # fields in braces are dotted SearchConfig fields. Default: the preset's name.
    method_label: str | None = None
    evaluate: EvaluateConfig | None = None
    # A sweep whose Optuna sampler, scheduler or evaluation stage ranks trials by accuracies measured
    # on the CIFAR-10 test set (data.eval_split `test`, the `auto` split at full data) is refused,
    # unless this says so on purpose: the test images would then choose the architecture whose
    # test error is reported.
    select_on_test_set: bool = False

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Iterable[str] = ()) -> SweepConfig:
        data = apply_overrides(load_yaml(str(path)), overrides)
        data.setdefault("name", Path(path).stem)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepConfig:
        options = data.get("storage_options") if isinstance(data, Mapping) else None
        for key in options if isinstance(options, Mapping) else ():
            if str(key).lower() in CREDENTIAL_KEYS:
                raise ConfigError(
                    f"storage_options.{key}",
                    "***",
                    "credentials never go in the sweep file: each node finds its own (an instance profile, the "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables, or ~/.aws/credentials)",
                )
        tracking = data.get("mlflow") if isinstance(data, Mapping) else None
        uri = tracking.get("tracking_uri") if isinstance(tracking, Mapping) else None
        if isinstance(uri, str) and "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
            raise ConfigError(
                "mlflow.tracking_uri",
                uri.split("://", 1)[0] + "://***@" + uri.split("@", 1)[1],
                "credentials never go in the sweep file: every node finds its own in MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD or ~/.mlflow/credentials",
            )
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    # ------------------------------------------------------------------ checks
    def validate(self, path: str = "") -> None:
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise ConfigError(
                "name",
                self.name,
                "expected a plain name (no slashes): it names the MLflow experiment and the results directory",
            )
        check_storage_text(self.storage)
        objectives = self.objectives()
        if not objectives:
            raise ConfigError("objective", [], "needs at least one metric")
        for i, objective in enumerate(objectives):
            objective.validate(f"objective[{i}]" if isinstance(self.objective, tuple) else "objective")
        sampler = self.sampler_type()
        if sampler == "grid":
            for key, spec in self.space.items():
                if spec.kind() != "categorical":
                    raise ConfigError(
                        f"space.{key}",
                        {k: v for k, v in to_dict(spec).items() if v not in (None, False)},
                        "the grid sampler needs categorical parameters",
                    )
                folded = [k for k in spec.when or {} if k in self.space and self.space[k].fold]
                if folded:
                    raise ConfigError(
                        f"space.{key}.when", spec.when, f"cannot depend on {folded[0]}, which `fold` folds per trial"
                    )
            size = self.grid_size()
            if self.num_samples is None:
                self.num_samples = size
            elif self.num_samples != size:
                raise ConfigError(
                    "num_samples",
                    self.num_samples,
                    f"the grid has {size} points; leave num_samples out or set it to {size}",
                )
        elif any(spec.fold for spec in self.space.values()):
            raise ConfigError("space.target.fold", True, f"needs the grid sampler (sampler.type: grid), not {sampler}")
        if sampler == "nsga2" and len(objectives) < 2:
            raise ConfigError("sampler.type", "nsga2", "NSGA-II is for several objectives; use tpe for one")
        if self.sampler.population_size is not None and sampler != "nsga2":
            raise ConfigError(
                "sampler.population_size", self.sampler.population_size, f"is NSGA-II's; not used by {sampler}"
            )
        if self.num_samples is None:
            raise ConfigError("num_samples", None, "how many trials to run (an integer >= 1)")
        if not self.space:
            raise ConfigError(
                "space",
                {},
                "needs at least one parameter (use the grid sampler with one choice for a single configuration)",
            )
        self.check_search_configs()
        self.check_selection_split()
        if self.evaluate is not None:
            if self.evaluate.by is None:
                self.evaluate.by, self.evaluate.mode = objectives[0].metric, self.evaluate.mode or objectives[0].mode
            self.evaluate.mode = self.evaluate.mode or "max"
        if self.method_label:
            try:
                method_label(self.method_label, self.base_search().to_dict())
            except KeyError as err:
                raise ConfigError("method_label", self.method_label, f"names no SearchConfig field {err}") from None

    def objectives(self) -> tuple[Objective, ...]:
        return self.objective if isinstance(self.objective, tuple) else (self.objective,)

    def sampler_type(self) -> str:
        if self.sampler.type is not None:
            return self.sampler.type
        return "nsga2" if len(self.objectives()) > 1 else "tpe"

    def grid(self) -> dict[str, list[Any]]:
        return {key: list(spec.choices) for key, spec in self.space.items()}

    def grid_is_product(self) -> bool:
        """Whether the grid's trials are every combination of the choices (no `when`, no `fold`)."""
        return not any(spec.when or spec.fold for spec in self.space.values())

    def grid_size(self) -> int:
        if self.grid_is_product():
            return math.prod(len(values) for values in self.grid().values())
        return len(self.grid_points())

    def grid_points(self) -> list[dict[str, Any]]:
        """The grid's trials, each its sampled fields: every combination of the choices, a `when`
        field only where its condition holds, and a folded `target` as one trial under the first
        choice with `derive_targets` (the others) where the target does not shape the search.
        Resolved once (each point checked against SearchConfig), again only if the settings change."""
        key = (copy.deepcopy(self.search), copy.deepcopy(to_dict(self.space)))
        kept = self.__dict__.get("_grid_points")
        if kept is None or kept[0] != key:
            kept = self._grid_points = (key, self._resolve_grid_points())
        return [dict(point) for point in kept[1]]

    def _resolve_grid_points(self) -> list[dict[str, Any]]:
        fixed = flatten_mapping(self.search)
        holds = lambda spec, point: all(  # noqa: E731
            (point[k] if k in point else fixed.get(k)) == v for k, v in (spec.when or {}).items()
        )
        points: list[dict[str, Any]] = [{}]
        for key, spec in self.space.items():
            if not spec.fold:
                points = [q for p in points for q in ([{**p, key: c} for c in spec.choices] if holds(spec, p) else [p])]
        for key, spec in self.space.items():
            if spec.fold:
                unfolded = []
                for p in points:
                    if not holds(spec, p):
                        unfolded.append(p)
                        continue
                    for i, choice in enumerate(spec.choices):
                        self._check_point({**p, key: choice}, f"space.{key}.choices[{i}]")
                    first = {**p, key: spec.choices[0]}
                    if self.resolve_trial(first).search_uses_target():
                        unfolded += [{**p, key: c} for c in spec.choices]
                    else:
                        unfolded.append(
                            {**first, "derive_targets": list(spec.choices[1:])} if len(spec.choices) > 1 else first
                        )
                points = unfolded
        return points

    def trial_search_dict(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return trial_search(self.search, params)

    def resolve_trial(self, params: Mapping[str, Any]) -> SearchConfig:
        return SearchConfig.resolve(file=self.trial_search_dict(params))

    def max_epochs(self) -> int:
        """The most epochs any trial can run: `search.epochs`, or the largest value the space can
        give `epochs` (ASHA's last rung)."""
        epochs = self.base_search().epochs
        spec = self.space.get("epochs")
        if spec is not None:
            values = spec.choices if spec.choices is not None else (spec.high,)
            epochs = max([epochs, *(int(v) for v in values if v is not None)])
        return epochs

    def base_search(self) -> SearchConfig:
        """The fixed settings (`search:`) as a SearchConfig, resolved once; the driver reads the
        epochs, the levels and the method label from it. Not to be changed by the caller."""
        kept = self.__dict__.get("_base_search")
        if kept is None or kept[0] != self.search:
            kept = self._base_search = (copy.deepcopy(self.search), self.resolve_trial({}))
        return kept[1]

    def check_search_configs(self) -> None:
        """Every fixed setting, and every value each space entry can take, against SearchConfig."""
        try:
            self.base_search()
        except ConfigError as err:
            raise ConfigError(f"search.{err.field}", err.value, err.allowed) from None
        if self.sampler_type() == "grid" and self.grid_size() <= 64:
            for point in self.grid_points():
                self._check_point(point)
            return
        for key, spec in self.space.items():
            for i, value in enumerate(spec.values()):
                where = f"space.{key}.choices[{i}]" if spec.kind() == "categorical" else f"space.{key}"
                # A conditional parameter is checked in the setting its condition requires.
                self._check_point({**(spec.when or {}), key: value}, where)

    def selections(self) -> list[tuple[str, str]]:
        """(field, metric) of every place the sweep ranks or stops trials by a metric measured on the
        search's evaluation images: Optuna's objectives (tpe, nsga2), ASHA, `evaluate.top`."""
        found = []
        if self.sampler_type() in ("tpe", "nsga2"):
            objectives = self.objectives()
            many = isinstance(self.objective, tuple)
            found += [
                (f"objective[{i}].metric" if many else "objective.metric", o.metric) for i, o in enumerate(objectives)
            ]
        if self.scheduler.type != "none":
            found.append(("scheduler.metric", self.scheduler.metric))
        if self.evaluate is not None and self.evaluate.top is not None:
            found.append(("evaluate.by", self.evaluate.by or self.objectives()[0].metric))
        return [(field, metric) for field, metric in found if metric in EVAL_SET_METRICS]

    def check_selection_split(self) -> None:
        """No trial is ranked by accuracies on the test set unless `select_on_test_set` says so."""
        selections = self.selections()
        if not selections or self.select_on_test_set:
            return
        data = [self.base_search().data]
        for key, spec in self.space.items():
            if key.startswith("data.") or key == "preset":
                data += [self.resolve_trial({key: value}).data for value in spec.values()]
        if any(d.dataset == "cifar10" and d.eval_split == "test" for d in data):
            field, metric = selections[0]
            raise ConfigError(
                field,
                metric,
                "is measured on the CIFAR-10 test set here (data.eval_split test, which `auto` chooses when a "
                "search uses all 50,000 training images) and would choose the architectures on the images their "
                "test error is reported on; hold training images out for it (search.data.subset: 45000 leaves "
                "5,000 for data.eval_split: holdout), or set select_on_test_set: true to do it on purpose",
            )

    def _check_point(self, params: Mapping[str, Any], where: str | None = None) -> None:
        try:
            self.resolve_trial(params)
        except ConfigError as err:
            key = err.field.split("[")[0]
            location = where or (f"space.{key}" if key in self.space else f"search.{err.field}")
            raise ConfigError(location, params.get(key, err.value), err.allowed) from None


def trial_search(search: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The nas search settings of a trial: the fixed ones with the sampled dotted keys set."""
    data = copy.deepcopy(dict(search))
    for key, value in params.items():
        if key != GRID_POINT:
            set_dotted(data, key, value)
    return data


_FIELD = re.compile(r"\{([A-Za-z0-9_.]+)\}")


def method_label(template: str | None, config: Mapping[str, Any]) -> str:
    """The method name of a trial: `template` with {dotted.field} replaced by its value, or the
    preset's name (else "custom")."""
    if not template:
        return str(config.get("preset") or "custom")
    flat = flatten_mapping(config)
    return _FIELD.sub(lambda m: str(flat[m.group(1)]), template)
