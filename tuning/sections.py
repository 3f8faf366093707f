"""The sections of a sweep file besides its search settings and space (tuning/config.py): the
objectives, the sampler and scheduler, the resources per trial, the evaluation stage, the storage's
options and the MLflow store. Each checks itself when built (nas.config.from_dict)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from nas.config import ConfigError
from nas.eval_config import EvalConfig
from nas.metrics import DISCRETIZED_ACC, EPOCH_METRICS, FINAL_METRICS, VALID_ACC


@dataclass
class Objective:
    metric: str = DISCRETIZED_ACC
    mode: Literal["max", "min"] = "max"

    def validate(self, path: str) -> None:
        known = tuple(dict.fromkeys((*FINAL_METRICS, *EPOCH_METRICS)))
        if self.metric not in known:
            raise ConfigError(f"{path}.metric", self.metric, f"expected one of {', '.join(known)}")


@dataclass
class SamplerConfig:
    # Default: tpe for one objective, nsga2 for several.
    type: Literal["tpe", "nsga2", "grid", "random"] | None = None
    seed: int | None = 0
    # NSGA-II's generation size (Optuna's default: 50). Its first generation is random sampling, so a
    # sweep of fewer trials than two generations never selects: set it to a fraction of num_samples.
    population_size: int | None = field(default=None, metadata={"min": 2})


@dataclass
class SchedulerConfig:
    type: Literal["none", "asha"] = "none"
    metric: str = VALID_ACC
    mode: Literal["max", "min"] = "max"
    grace_period: int = field(default=1, metadata={"min": 1})
    reduction_factor: float = field(default=3.0, metadata={"gt": 1.0})

    def validate(self, path: str) -> None:
        if self.type == "asha" and self.metric not in EPOCH_METRICS:
            raise ConfigError(
                f"{path}.metric", self.metric, f"ASHA needs a per-epoch metric: one of {', '.join(EPOCH_METRICS)}"
            )


@dataclass
class ResourcesConfig:
    cpu: float = field(default=1.0, metadata={"gt": 0.0})
    gpu: float = field(default=0.0, metadata={"min": 0.0})

    def validate(self, path: str) -> None:
        if self.gpu > 1 and not float(self.gpu).is_integer():
            raise ConfigError(f"{path}.gpu", self.gpu, "a trial takes a fraction of one GPU or a whole number of GPUs")


@dataclass
class EvalResourcesConfig(ResourcesConfig):
    """Per evaluation worker; `workers` > 1 trains data-parallel (Ray Train, DistributedDataParallel:
    NCCL on GPUs, gloo on CPUs), one GPU per worker where GPUs are asked for."""

    workers: int = field(default=1, metadata={"min": 1})

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.workers > 1 and self.gpu and self.gpu != 1:
            raise ConfigError(
                f"{path}.gpu",
                self.gpu,
                f"a data-parallel worker drives one GPU: use gpu: 1 (or 0) with {self.workers} workers, "
                "and more workers for more GPUs",
            )


@dataclass
class EvaluateConfig:
    """The evaluation stage: after the search trials, train the derived architectures from scratch."""

    top: int | None = field(default=None, metadata={"min": 1})  # the best k trials; null: all finished
    by: str | None = None  # the metric ranking the trials (default: the first objective)
    mode: Literal["max", "min"] | None = None
    datasets: tuple[Literal["cifar10", "imagenet"], ...] = ("cifar10",)
    resources: EvalResourcesConfig = field(default_factory=EvalResourcesConfig)
    settings: dict[str, Any] = field(default_factory=dict)  # nas.evaluate.EvalConfig fields
    # Training seeds: each architecture is trained once per seed (training noise measured beside the
    # architectures' differences). Unset: once, with settings.seed.
    seeds: tuple[int, ...] | None = None

    def training_seeds(self) -> tuple[int | None, ...]:
        """The seeds to train each architecture with; None: the protocol's (settings.seed)."""
        return self.seeds or (None,)

    def validate(self, path: str) -> None:
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"{path}.seeds", list(self.seeds), "a list of distinct training seeds, or leave it out")
        if self.seeds is not None and "seed" in self.settings:
            raise ConfigError(
                f"{path}.settings.seed", self.settings["seed"], f"give the training seeds in {path}.seeds"
            )

        if self.by is not None and self.by not in (*FINAL_METRICS, *EPOCH_METRICS):
            raise ConfigError(f"{path}.by", self.by, f"expected one of {', '.join(FINAL_METRICS)}")
        if not self.datasets:
            raise ConfigError(f"{path}.datasets", [], "name at least one of cifar10, imagenet")
        for dataset in self.datasets:
            try:
                config = EvalConfig.resolve(dataset, self.settings)
            except ConfigError as err:
                raise ConfigError(f"{path}.settings.{err.field}", err.value, err.allowed) from None
            if config.batch_size < self.resources.workers:
                raise ConfigError(
                    f"{path}.settings.batch_size",
                    config.batch_size,
                    f"the global batch is shared by the {self.resources.workers} data-parallel workers: "
                    "at least one image each",
                )


@dataclass
class StorageOptions:
    """Where an S3-compatible store is (else the standard AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
    AWS_REGION / AWS_DEFAULT_REGION variables). Credentials are never taken from the sweep file."""

    endpoint: str | None = None  # e.g. https://minio.internal:9000
    region: str | None = None
    # A path that every node, also those an autoscaler adds later, mounts at the same place, on a
    # filesystem whose type does not show it (nodes alive at the start are checked all the same).
    shared: bool = False

    def validate(self, path: str) -> None:
        if self.endpoint is not None and not re.match(r"^https?://[^/@\s]+/?$", self.endpoint):
            raise ConfigError(
                f"{path}.endpoint", self.endpoint, "expected http://HOST:PORT or https://HOST:PORT (no credentials)"
            )


CREDENTIAL_KEYS = ("access_key", "secret_key", "session_token", "aws_access_key_id", "aws_secret_access_key",
                   "key", "secret", "token", "password", "credentials")  # fmt: skip


@dataclass
class MlflowConfig:
    # `auto`: $MLFLOW_TRACKING_URI if set (the cluster's head sets it), else a sqlite store in
    # runs/mlflow.db under the working directory. Relative sqlite paths are made absolute.
    tracking_uri: str = "auto"
    experiment: str | None = None  # default: the sweep's name
