"""EvalConfig: the protocol of an evaluation (docs/science.md §4), the published ones by default.

The defaults are the published protocols: CIFAR-10 with 20 cells, C=36, 600 epochs, batch 96, SGD
0.025 with cosine annealing to 0, cutout 16, auxiliary head 0.4, drop path 0.2 (identity ops
exempt, ramped linearly), gradient clipping 5, all 50k training images, the 10k test set; ImageNet
(mobile setting) with 14 cells, C=48, 250 epochs, batch 128, SGD 0.1 decayed 0.97 per epoch, weight
decay 3e-5, label smoothing 0.1, 224x224 crops. Every part can be overridden for short runs.
As in the reference code, the learning-rate schedule steps at the start of each epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import config as cfg
from .config import ConfigError
from .ops import check_even_channels
from .runtime import RuntimeConfig, cosine_lr

MOBILE_MACS = 600e6  # the ImageNet mobile setting's limit on multiply-adds
CIFAR_SIZES = (32, 16, 8)  # 16 and 8: average-pooled, as the search data at data.resolution
# Fields that change where and how fast, not what, an evaluation computes; a resumed evaluation
# may differ in them.
RESUME_FREE = (
    "data.root",
    "data.download",
    "data.workers",
    "device",
    "runtime.fused",
    "runtime.compile",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PROTOCOLS: dict[str, dict[str, Any]] = {
    "cifar10": {},  # EvalConfig's defaults
    "imagenet": {
        "epochs": 250,
        "layers": 14,
        "channels": 48,
        "batch_size": 128,
        "lr": 0.1,
        "lr_schedule": "step",
        "lr_gamma": 0.97,
        "weight_decay": 3e-5,
        "drop_path": 0.0,
        "cutout": 0,
        "label_smoothing": 0.1,
        "image_size": 224,
    },
}


@dataclass
class EvalDataConfig:
    root: str | None = None
    download: bool = True
    subset: int | None = field(default=None, metadata={"min": 1})  # training images (CIFAR-10)
    test_subset: int | None = field(default=None, metadata={"min": 1})
    workers: int = field(default=4, metadata={"min": 0})  # ImageNet loader processes
    # Generated CIFAR-like images instead of CIFAR-10 (nas.data.synthetic_cifar): tests, demos.
    synthetic: bool = False


@dataclass
class EvalConfig:
    dataset: Literal["cifar10", "imagenet"] = "cifar10"
    epochs: int = field(default=600, metadata={"min": 1})
    layers: int = field(default=20, metadata={"min": 3, "max": 200})
    channels: int = field(default=36, metadata={"min": 2})
    # The global batch: with W data-parallel workers each computes batch_size / W of it (nas/distributed.py).
    batch_size: int = field(default=96, metadata={"min": 1})
    lr: float = field(default=0.025, metadata={"gt": 0.0})
    # `linear`: lr x batch_size / the protocol's batch (a larger global batch, a larger rate).
    lr_scaling: Literal["none", "linear"] = "none"
    # The first epochs' rate rises linearly to the schedule's: epoch e <= warmup_epochs takes e / warmup_epochs of it.
    warmup_epochs: int = field(default=0, metadata={"min": 0})
    lr_schedule: Literal["cosine", "step"] = "cosine"
    lr_min: float = field(default=0.0, metadata={"min": 0.0})
    lr_gamma: float = field(default=0.97, metadata={"gt": 0.0, "max": 1.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    weight_decay: float = field(default=3e-4, metadata={"min": 0.0})
    grad_clip: float | None = field(default=5.0, metadata={"gt": 0.0})
    auxiliary: bool = True
    auxiliary_weight: float = field(default=0.4, metadata={"min": 0.0})
    drop_path: float = field(default=0.2, metadata={"min": 0.0, "max": 0.9})
    cutout: int = field(default=16, metadata={"min": 0})
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    image_size: int = field(default=32, metadata={"min": 8})
    seed: int = 0
    # With data-parallel workers: BatchNorm statistics over the whole global batch (synchronised) or
    # over each worker's part. Unset: synchronised when a worker's part is smaller than the protocol's
    # batch, so that statistics always span at least that many images (docs/science.md D15).
    sync_bn: bool | None = None
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def validate(self, path: str = "") -> None:
        check_even_channels(self.channels, "channels")
        if self.dataset == "cifar10" and self.image_size not in CIFAR_SIZES:
            raise ConfigError(
                "image_size",
                self.image_size,
                "CIFAR-10 images are 32x32; 16 and 8 average-pool them (the reduced scale of docs/science.md §8)",
            )
        if self.dataset == "cifar10" and self.auxiliary and self.image_size != 32:
            raise ConfigError(
                "auxiliary",
                True,
                f"false at image_size {self.image_size}: the auxiliary head pools the 8x8 maps of 32x32 input",
            )
        if self.dataset == "cifar10" and self.cutout > self.image_size // 2:
            raise ConfigError(
                "cutout",
                self.cutout,
                f"at most half of image_size {self.image_size} (the protocol's 16 of 32); 0 turns cutout off",
            )

    @classmethod
    def resolve(
        cls,
        dataset: str | None = None,
        file: str | os.PathLike | Mapping[str, Any] | None = None,
        overrides: Iterable[str] = (),
        data_root: str | None = None,
    ) -> EvalConfig:
        """The dataset's protocol, then the YAML file (path or mapping), then `--set` overrides."""
        raw = cfg.file_with_overrides(file, overrides)
        dataset = dataset or raw.get("dataset", "cifar10")
        if dataset not in PROTOCOLS:
            raise ConfigError("dataset", dataset, f"expected one of {', '.join(PROTOCOLS)}")
        merged = cfg.deep_merge({**PROTOCOLS[dataset], "dataset": dataset}, raw)
        merged["dataset"] = dataset
        if data_root:
            merged.setdefault("data", {})["root"] = data_root
        return cfg.from_dict(cls, merged)

    def to_dict(self) -> dict[str, Any]:
        return cfg.to_dict(self)

    def protocol_batch(self) -> int:
        return PROTOCOLS[self.dataset].get("batch_size", EvalConfig.batch_size)

    def peak_lr(self) -> float:
        """The schedule's starting rate: `lr`, scaled with the global batch under `lr_scaling: linear`."""
        if self.lr_scaling == "linear":
            return self.lr * self.batch_size / self.protocol_batch()
        return self.lr

    def synchronised_bn(self, workers: int) -> bool:
        """Whether BatchNorm is synchronised over `workers` data-parallel workers (see `sync_bn`)."""
        if workers <= 1:
            return False
        return self.sync_bn if self.sync_bn is not None else self.batch_size / workers < self.protocol_batch()

    @property
    def num_classes(self) -> int:
        return 1000 if self.dataset == "imagenet" else 10


def epoch_lr(config: EvalConfig, epoch: int) -> float:
    """The learning rate of 1-based `epoch` (schedules step at each epoch's start, as in quark0/darts);
    during a warm-up, epoch / warmup_epochs of it (docs/science.md §4.3)."""
    peak = config.peak_lr()
    if config.lr_schedule == "cosine":
        lr = cosine_lr(epoch, config.epochs, peak, config.lr_min)
    else:
        lr = peak * config.lr_gamma**epoch
    return lr * min(1.0, epoch / config.warmup_epochs) if config.warmup_epochs else lr
