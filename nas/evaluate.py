"""EvalConfig and run_evaluation: train a derived architecture from scratch (docs/science.md §4).

    config = EvalConfig.resolve("cifar10", overrides=["epochs=20", "layers=8", "channels=16"])
    result = run_evaluation(PUBLISHED["darts_v2"], config, out_dir="runs/eval/darts_v2")

The defaults are the published protocols: CIFAR-10 with 20 cells, C=36, 600 epochs, batch 96, SGD
0.025 with cosine annealing to 0, cutout 16, auxiliary head 0.4, drop path 0.2 (identity ops
exempt, ramped linearly), gradient clipping 5, all 50k training images, the 10k test set; ImageNet
(mobile setting) with 14 cells, C=48, 250 epochs, batch 128, SGD 0.1 decayed 0.97 per epoch, weight
decay 3e-5, label smoothing 0.1, 224x224 crops. Every part can be overridden for short runs.
As in the reference code, the learning-rate schedule steps at the start of each epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from . import config as cfg
from .config import ConfigError
from .data import (
    CIFAR_TRAIN_SIZE,
    batches,
    cutout,
    downsample,
    imagenet_folder,
    load_cifar10,
    normalize,
    random_crop_flip,
    stream_generator,
    synthetic_cifar,
)
from .environment import environment
from .genotype import Genotype
from .network import EvalNetwork, count_macs, count_parameters
from .ops import check_even_channels
from .runtime import (
    CHECKPOINT,
    RESULT,
    EpochEvent,
    RuntimeConfig,
    changed_settings,
    check_resumable,
    cosine_lr,
    load_checkpoint,
    progress_bar,
    resolve_device,
    save_atomic,
)

log = logging.getLogger(__name__)

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
    layers: int = field(default=20, metadata={"min": 3})
    channels: int = field(default=36, metadata={"min": 2})
    batch_size: int = field(default=96, metadata={"min": 1})
    lr: float = field(default=0.025, metadata={"gt": 0.0})
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

    @property
    def num_classes(self) -> int:
        return 1000 if self.dataset == "imagenet" else 10


@dataclass
class EvalResult:
    config: EvalConfig
    history: list[dict[str, Any]]
    metrics: dict[str, float]
    info: dict[str, Any]
    out_dir: Path | None = None
    environment: dict[str, str] = field(default_factory=environment)  # nas/environment.py

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "metrics": self.metrics,
            "info": self.info,
            "environment": self.environment,
            "history": self.history,
        }


def network_for(genotype: Genotype, config: EvalConfig) -> EvalNetwork:
    return EvalNetwork(genotype, config.channels, config.layers, config.num_classes, config.auxiliary, config.dataset)


def epoch_lr(config: EvalConfig, epoch: int) -> float:
    """The learning rate of 1-based `epoch` (schedules step at each epoch's start, as in quark0/darts)."""
    if config.lr_schedule == "cosine":
        return cosine_lr(epoch, config.epochs, config.lr, config.lr_min)
    return config.lr * config.lr_gamma**epoch


class _CifarData:
    """CIFAR-10 as tensors on the device; crop, flip and cutout on whole batches."""

    def __init__(self, config: EvalConfig, device: torch.device):
        if config.data.synthetic:
            train, test = synthetic_cifar(
                config.data.subset or CIFAR_TRAIN_SIZE, config.data.test_subset or 10_000, config.seed
            )
        else:
            train, test = load_cifar10(config.data.root, config.data.download)
        g = torch.Generator().manual_seed(config.seed)
        if config.data.subset:
            train = train.take(torch.randperm(len(train), generator=g)[: config.data.subset])
        if config.data.test_subset:
            test = test.take(torch.randperm(len(test), generator=g)[: config.data.test_subset])
        self.train = downsample(train, config.image_size).to(device)
        self.test = downsample(test, config.image_size).to(device)
        self.config = config

    def train_batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        g = stream_generator(self.config.seed, epoch, 0)
        order = torch.randperm(len(self.train), generator=g).to(self.train.images.device)
        for start in range(0, len(order), self.config.batch_size):
            index = order[start : start + self.config.batch_size]
            images = normalize(random_crop_flip(self.train.images[index], g, self.config.image_size // 8))
            if self.config.cutout:
                images = cutout(images, g, self.config.cutout)
            yield images, self.train.labels[index]

    def test_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return batches(self.test, 256, torch.Generator(), augment=False, shuffle=False)

    def train_steps(self) -> int:
        return math.ceil(len(self.train) / self.config.batch_size)


class _ImageNetData:
    """ImageNet through ImageFolder, with the DARTS augmentation, in loader processes."""

    def __init__(self, config: EvalConfig, device: torch.device):
        import torchvision.transforms as T

        root = config.data.root or os.environ.get("NAS_IMAGENET_ROOT") or "data/imagenet"
        size = config.image_size
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = T.Compose([
            T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2), T.ToTensor(), norm,
        ])  # fmt: skip
        test_tf = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
        self.train = imagenet_folder(root, "train", train_tf)
        self.test = imagenet_folder(root, "val", test_tf)
        g = torch.Generator().manual_seed(config.seed)
        if config.data.subset:
            self.train = torch.utils.data.Subset(
                self.train, torch.randperm(len(self.train), generator=g)[: config.data.subset].tolist()
            )
        if config.data.test_subset:
            self.test = torch.utils.data.Subset(
                self.test, torch.randperm(len(self.test), generator=g)[: config.data.test_subset].tolist()
            )
        self.config, self.device = config, device

    def _loader(self, dataset, shuffle: bool, epoch: int):
        g = stream_generator(self.config.seed, epoch, 0)
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.config.batch_size, shuffle=shuffle, generator=g,
            num_workers=self.config.data.workers, pin_memory=self.device.type == "cuda",
        )  # fmt: skip

    def train_batches(self, epoch: int):
        for images, labels in self._loader(self.train, True, epoch):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def test_batches(self):
        for images, labels in self._loader(self.test, False, 0):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def train_steps(self) -> int:
        return math.ceil(len(self.train) / self.config.batch_size)


def make_eval_data(config: EvalConfig, device: torch.device):
    return _ImageNetData(config, device) if config.dataset == "imagenet" else _CifarData(config, device)


@torch.no_grad()
def test_accuracy(model: EvalNetwork, data) -> tuple[float, float, float]:
    """Top-1 and top-5 accuracy (%) and mean cross-entropy on the test set."""
    model.eval()
    top1 = top5 = n = 0
    loss = 0.0
    for images, labels in data.test_batches():
        logits, _ = model(images)
        loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(dim=1).sum().item()
        n += len(labels)
    return 100.0 * top1 / n, 100.0 * top5 / n, loss / n


def _same_run(saved: Mapping[str, Any], config: EvalConfig) -> bool:
    """Whether a stored evaluation is this one (a finished one with other settings is run again)."""
    return not changed_settings(saved, config.to_dict(), RESUME_FREE)


def run_evaluation(
    genotype: Genotype,
    config: EvalConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    data=None,
    callbacks: Sequence[Callable[[EpochEvent], None]] = (),
    progress: bool = False,
    resume: bool = True,
) -> EvalResult:
    """Trains `genotype`'s evaluation network from scratch and measures its test error; with an
    output directory, checkpoints every epoch and resumes from it."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and resume and (out / RESULT).exists():
        stored = json.loads((out / RESULT).read_text())
        if _same_run(stored["config"], config) and len(stored["history"]) == config.epochs:
            log.info("evaluation in %s is finished; its result is in %s", out, out / RESULT)
            return EvalResult(
                config, stored["history"], stored["metrics"], stored["info"], out, stored.get("environment", {})
            )

    torch.manual_seed(config.seed)
    model = network_for(genotype, config)
    params = count_parameters(model)
    macs = count_macs(model, config.image_size)
    model = model.to(device)
    memory_format = config.runtime.memory_format(device, "evaluate")
    model = model.to(memory_format=memory_format)
    autocast = config.runtime.autocast_dtype(device, "evaluate")
    info = {
        "params": params,
        "macs": macs,
        "mobile_setting_ok": config.dataset != "imagenet" or macs <= MOBILE_MACS,
        "genotype": genotype.to_dict(),
        "device": str(device),
    }
    if not info["mobile_setting_ok"]:
        log.warning("%.0fM multiply-adds: above the ImageNet mobile setting's 600M", macs / 1e6)
    data = data or make_eval_data(config, device)
    optimizer = torch.optim.SGD(
        model.parameters(), config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    history: list[dict[str, Any]] = []
    start = 1
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = out / CHECKPOINT
        if resume and checkpoint.exists():
            state = load_checkpoint(checkpoint, device)
            check_resumable(state["config"], config.to_dict(), RESUME_FREE, checkpoint, "evaluation")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            history, start = list(state["history"]), state["epoch"] + 1
            log.info("resuming %s after epoch %d", out, state["epoch"])
    log.info(
        "evaluating: %d cells, C=%d, %.2fM params, %.0fM multiply-adds, %d epochs",
        config.layers,
        config.channels,
        params / 1e6,
        macs / 1e6,
        config.epochs,
    )

    for epoch in range(start, config.epochs + 1):
        epoch_started = time.perf_counter()
        lr = epoch_lr(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.drop_path_prob = config.drop_path * (epoch - 1) / config.epochs
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = progress_bar(data.train_steps(), f"epoch {epoch}/{config.epochs}", progress)
        for images, labels in data.train_batches(epoch):
            images = images.contiguous(memory_format=memory_format)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, autocast, enabled=autocast is not None):
                logits, aux = model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
                if aux is not None:
                    loss = loss + config.auxiliary_weight * F.cross_entropy(
                        aux.float(), labels, label_smoothing=config.label_smoothing
                    )
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += len(labels)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        train_loss = (loss_sum / seen).item()
        if not math.isfinite(train_loss):
            raise RuntimeError(f"epoch {epoch}: the training loss became {train_loss}")
        top1, top5, test_loss = test_accuracy(model, data)
        record = {
            "epoch": epoch,
            "lr": lr,
            "drop_path": model.drop_path_prob,
            "train_loss": train_loss,
            "train_acc": 100.0 * correct.item() / seen,
            "test_loss": test_loss,
            "test_top1_error": 100.0 - top1,
            "test_top5_error": 100.0 - top5,
            "seconds": time.perf_counter() - epoch_started,
        }
        history.append(record)
        log.info(
            "epoch %d/%d  train %.2f%%  test error %.2f%% (top-5 %.2f%%)  %.1fs",
            epoch, config.epochs, record["train_acc"], record["test_top1_error"], record["test_top5_error"], record["seconds"],
        )  # fmt: skip
        checkpoint_path = None
        if out is not None:
            checkpoint_path = out / CHECKPOINT
            state = {
                "format": 1, "epoch": epoch, "config": config.to_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "history": history, "torch_rng": torch.get_rng_state(),
            }  # fmt: skip
            save_atomic(state, checkpoint_path)
        metrics = {k: float(v) for k, v in record.items() if k != "epoch"}
        for callback in callbacks:
            callback(EpochEvent(epoch, config.epochs, record, metrics, checkpoint_path))

    last = history[-1] if history else {}
    metrics = {
        "test_top1_error": last.get("test_top1_error", math.nan),
        "test_top5_error": last.get("test_top5_error", math.nan),
        "params": float(params),
        "macs": float(macs),
    }
    info["seconds"] = time.perf_counter() - started
    result = EvalResult(config, history, metrics, info, out)
    if out is not None:
        (out / RESULT).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
