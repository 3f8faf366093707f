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

import inspect
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
from torch.nn.parallel import DistributedDataParallel

from . import config as cfg
from . import metrics as m
from .config import ConfigError
from .data import (
    CIFAR_TRAIN_SIZE,
    batches,
    crop_flip_draws,
    cutout,
    cutout_draws,
    downsample,
    imagenet_folder,
    load_cifar10,
    normalize,
    random_crop_flip,
    stream_generator,
    synthetic_cifar,
)
from .distributed import Group, broadcast_buffers, sync_batchnorm
from .environment import environment
from .genotype import Genotype
from .network import EvalNetwork, count_macs, count_parameters
from .ops import check_even_channels
from .runtime import (
    CHECKPOINT,
    RESULT,
    Diverged,
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
    """The learning rate of 1-based `epoch` (schedules step at each epoch's start, as in quark0/darts);
    during a warm-up, epoch / warmup_epochs of it (docs/science.md §4.3)."""
    peak = config.peak_lr()
    if config.lr_schedule == "cosine":
        lr = cosine_lr(epoch, config.epochs, peak, config.lr_min)
    else:
        lr = peak * config.lr_gamma**epoch
    return lr * min(1.0, epoch / config.warmup_epochs) if config.warmup_epochs else lr


class _CifarData:
    """CIFAR-10 as tensors on the device; crop, flip and cutout on whole batches. Every rank draws the
    permutation and the augmentation of the whole global batch and takes its part (nas/distributed.py)."""

    def __init__(self, config: EvalConfig, device: torch.device, group: Group):
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
        self.test = downsample(test.take(torch.arange(len(test))[group.part(len(test))]), config.image_size).to(device)
        self.config, self.group = config, group

    def train_batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor, int]]:
        """(this rank's images, their labels, the global batch's size) per step."""
        g = stream_generator(self.config.seed, epoch, 0)
        order = torch.randperm(len(self.train), generator=g).to(self.train.images.device)
        size = self.config.image_size
        for start in range(0, len(order), self.config.batch_size):
            index = order[start : start + self.config.batch_size]
            part = self.group.part(len(index))
            offsets, flips = crop_flip_draws(len(index), g, size // 8)
            images = random_crop_flip(self.train.images[index[part]], None, size // 8, (offsets[:, part], flips[part]))
            images = normalize(images, torch.get_default_dtype())
            if self.config.cutout:
                rows, cols = cutout_draws(len(index), g, size, size)
                images = cutout(images, None, self.config.cutout, (rows[part], cols[part]))
            yield images, self.train.labels[index[part]], len(index)

    def test_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part of the test set."""
        return batches(self.test, 256, torch.Generator(), augment=False, shuffle=False, dtype=torch.get_default_dtype())

    def train_steps(self) -> int:
        return math.ceil(len(self.train) / self.config.batch_size)


class _GlobalBatches(torch.utils.data.Sampler):
    """Batches of indices: the global permutation of an epoch cut into global batches, this rank's part
    of each (all of it with one rank)."""

    def __init__(self, count: int, batch_size: int, group: Group, generator: torch.Generator | None):
        self.count, self.batch_size, self.group, self.generator = count, batch_size, group, generator

    def __iter__(self):
        order = torch.randperm(self.count, generator=self.generator) if self.generator else torch.arange(self.count)
        for start in range(0, self.count, self.batch_size):
            index = order[start : start + self.batch_size]
            yield index[self.group.part(len(index))].tolist()

    def __len__(self) -> int:
        return math.ceil(self.count / self.batch_size)


class _ImageNetData:
    """ImageNet through ImageFolder, with the DARTS augmentation, in loader processes (`data.workers`
    per rank), each rank loading its part of every global batch and of the validation set."""

    def __init__(self, config: EvalConfig, device: torch.device, group: Group):
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
        self.test = torch.utils.data.Subset(self.test, list(range(len(self.test)))[group.part(len(self.test))])
        self.config, self.device, self.group = config, device, group

    def _loader(self, dataset, sampler):
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=self.config.data.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )  # fmt: skip

    def train_batches(self, epoch: int):
        g = stream_generator(self.config.seed, epoch, 0)
        sampler = _GlobalBatches(len(self.train), self.config.batch_size, self.group, g)
        for step, (images, labels) in enumerate(self._loader(self.train, sampler)):
            count = min(self.config.batch_size, len(self.train) - step * self.config.batch_size)
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), count

    def test_batches(self):
        sampler = _GlobalBatches(len(self.test), self.config.batch_size, Group(), None)
        for images, labels in self._loader(self.test, sampler):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def train_steps(self) -> int:
        return math.ceil(len(self.train) / self.config.batch_size)


def make_eval_data(config: EvalConfig, device: torch.device, group: Group | None = None):
    group = group or Group.current()
    return (_ImageNetData if config.dataset == "imagenet" else _CifarData)(config, device, group)


@torch.no_grad()
def test_accuracy(model: EvalNetwork, data, group: Group | None = None) -> tuple[float, float, float]:
    """Top-1 and top-5 accuracy (%) and mean cross-entropy on the test set (each rank measures its
    part; the sums are added over the ranks)."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top-1, top-5, loss, images
    for images, labels in data.test_batches():
        logits, _ = model(images)
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.stack([
            (best[:, 0] == labels).sum(), (best == labels[:, None]).any(dim=1).sum(),
            F.cross_entropy(logits.float(), labels, reduction="sum"), torch.tensor(len(labels), device=device),
        ]).to(torch.float64)  # fmt: skip
    top1, top5, loss, n = (group or Group.current()).sum(sums).tolist()
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
    output directory, checkpoints every epoch and resumes from it.

    Inside a torch.distributed process group (nas/distributed.py: Ray Train, torchrun) every rank
    trains a replica on its part of each global batch of `batch_size`; rank 0 alone reads and writes
    `out_dir` and runs the callbacks, and every rank returns the same result."""
    started = time.perf_counter()
    group = Group.current()
    device = resolve_device(config.device)
    out = Path(out_dir) if out_dir is not None and group.leader else None
    stored = group.broadcast(_finished(out, config) if resume and out is not None else None)
    if stored is not None:
        if group.leader:
            log.info("evaluation in %s is finished; its result is in %s", out, out / RESULT)
        return EvalResult(
            config, stored["history"], stored["metrics"], stored["info"], out, stored.get("environment", {})
        )

    torch.manual_seed(config.seed)
    model = network_for(genotype, config)
    params = count_parameters(model)
    macs = count_macs(model, config.image_size)
    synchronised = config.synchronised_bn(group.world)
    if synchronised:
        model = sync_batchnorm(model, device)
    memory_format = config.runtime.memory_format(device, "evaluate")
    model = model.to(device).to(memory_format=memory_format)
    autocast = config.runtime.autocast_dtype(device, "evaluate")
    info = {
        "params": params,
        "macs": macs,
        "mobile_setting_ok": config.dataset != "imagenet" or macs <= MOBILE_MACS,
        "genotype": genotype.to_dict(),
        "device": str(device),
        "world_size": group.world,
        "global_batch": config.batch_size,
        "lr_peak": config.peak_lr(),
        "sync_bn": synchronised,
    }
    if not info["mobile_setting_ok"] and group.leader:
        log.warning("%.0fM multiply-adds: above the ImageNet mobile setting's 600M", macs / 1e6)
    data = data or make_eval_data(config, device, group)
    optimizer = torch.optim.SGD(
        model.parameters(), config.peak_lr(), momentum=config.momentum, weight_decay=config.weight_decay
    )
    history: list[dict[str, Any]] = []
    start = 1
    state = group.broadcast(_saved_state(out, config) if resume and out is not None else None)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _restore_rng(state, config, group)
        history, start = list(state["history"]), state["epoch"] + 1
        if group.leader:
            log.info("resuming %s after epoch %d", out, state["epoch"])
    elif group.rank > 0:  # drop path's draws: each replica its own stream, rank 0 the one-process stream
        torch.manual_seed(config.seed * 1_000_003 + group.rank)
    net = model
    if group.parallel:
        ids = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else None
        )
        net = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, **_NO_BUFFER_SYNC)
    if group.leader:
        log.info(
            "evaluating: %d cells, C=%d, %.2fM params, %.0fM multiply-adds, %d epochs, batch %d%s",
            config.layers, config.channels, params / 1e6, macs / 1e6, config.epochs, config.batch_size,
            f" over {group.world} workers ({config.batch_size / group.world:g} each, BatchNorm "
            f"{'synchronised' if synchronised else 'per worker'})" if group.parallel else "",
        )  # fmt: skip

    for epoch in range(start, config.epochs + 1):
        epoch_started = time.perf_counter()
        lr = epoch_lr(config, epoch)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        model.drop_path_prob = config.drop_path * (epoch - 1) / config.epochs
        train_loss, train_acc = _train_epoch(
            net, optimizer, data, config, epoch, autocast, memory_format, group, progress
        )
        if not math.isfinite(train_loss):
            raise Diverged(f"epoch {epoch}: the training loss became {train_loss}")
        broadcast_buffers(model, group)  # with BatchNorm per replica: rank 0's statistics, tested and saved
        top1, top5, test_loss = test_accuracy(model, data, group)
        record = {
            "epoch": epoch,
            m.LR: lr,
            m.DROP_PATH: model.drop_path_prob,
            m.TRAIN_LOSS: train_loss,
            m.TRAIN_ACC: train_acc,
            m.TEST_LOSS: test_loss,
            m.TEST_TOP1_ERROR: 100.0 - top1,
            m.TEST_TOP5_ERROR: 100.0 - top5,
            m.SECONDS: time.perf_counter() - epoch_started,
        }
        history.append(record)
        rng = group.gather(torch.get_rng_state())
        if not group.leader:
            continue
        log.info(
            "epoch %d/%d  train %.2f%%  test error %.2f%% (top-5 %.2f%%)  %.1fs",
            epoch, config.epochs, record[m.TRAIN_ACC], record[m.TEST_TOP1_ERROR], record[m.TEST_TOP5_ERROR], record[m.SECONDS],
        )  # fmt: skip
        checkpoint_path = None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            checkpoint_path = out / CHECKPOINT
            state = {
                "format": 1, "epoch": epoch, "config": config.to_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "history": history, "torch_rng": rng[0],
                "torch_rng_ranks": rng,
            }  # fmt: skip
            save_atomic(state, checkpoint_path)
        metrics = {k: float(v) for k, v in record.items() if k != "epoch"}
        for callback in callbacks:
            callback(EpochEvent(epoch, config.epochs, record, metrics, checkpoint_path))

    last = history[-1] if history else {}
    metrics = {
        m.TEST_TOP1_ERROR: last.get(m.TEST_TOP1_ERROR, math.nan),
        m.TEST_TOP5_ERROR: last.get(m.TEST_TOP5_ERROR, math.nan),
        m.PARAMS: float(params),
        m.MACS: float(macs),
    }
    info["seconds"] = time.perf_counter() - started
    result = EvalResult(config, history, metrics, info, out)
    if out is not None:
        (out / RESULT).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


# Buffers (BatchNorm statistics) are not sent from rank 0 before every forward pass: they are once an
# epoch (broadcast_buffers); the keyword changed name in PyTorch 2.12.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def _train_epoch(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data,
    config: EvalConfig,
    epoch: int,
    autocast: torch.dtype | None,
    memory_format: torch.memory_format,
    group: Group,
    progress: bool,
) -> tuple[float, float]:
    """One epoch of SGD steps on this rank's parts of the global batches: (mean loss, accuracy %)
    over every rank's images."""
    net.train()
    device = next(net.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # summed loss, correct, images
    bar = progress_bar(data.train_steps(), f"epoch {epoch}/{config.epochs}", progress and group.leader)
    for images, labels, count in data.train_batches(epoch):
        images = images.contiguous(memory_format=memory_format)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, autocast, enabled=autocast is not None):
            logits, aux = net(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing, reduction="sum")
            if aux is not None:
                loss = loss + config.auxiliary_weight * F.cross_entropy(
                    aux.float(), labels, label_smoothing=config.label_smoothing, reduction="sum"
                )
        (loss * group.loss_scale(count)).backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        optimizer.step()
        correct = (logits.detach().argmax(1) == labels).sum()
        sums += torch.stack([loss.detach(), correct, torch.tensor(len(labels), device=device)]).to(torch.float64)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    loss_sum, correct, seen = group.sum(sums).tolist()
    return loss_sum / seen, 100.0 * correct / seen


def _finished(out: Path, config: EvalConfig) -> dict[str, Any] | None:
    """The stored result.json of this evaluation if it is finished (with these settings)."""
    if not (out / RESULT).exists():
        return None
    stored = json.loads((out / RESULT).read_text())
    if _same_run(stored["config"], config) and len(stored["history"]) == config.epochs:
        return stored
    return None


def _saved_state(out: Path, config: EvalConfig) -> dict[str, Any] | None:
    checkpoint = out / CHECKPOINT
    if not checkpoint.exists():
        return None
    state = load_checkpoint(checkpoint, torch.device("cpu"))
    check_resumable(state["config"], config.to_dict(), RESUME_FREE, checkpoint, "evaluation")
    return state


def _restore_rng(state: Mapping[str, Any], config: EvalConfig, group: Group) -> None:
    """Each rank's random stream (drop path) where the checkpoint has one per rank of this group;
    a checkpoint of another number of ranks continues rank 0's and starts the others' afresh."""
    ranks = state.get("torch_rng_ranks") or [state["torch_rng"]]
    if len(ranks) == group.world:
        torch.set_rng_state(ranks[group.rank])
    elif group.leader:
        torch.set_rng_state(ranks[0])
        log.info(
            "checkpoint of %d workers resumed on %d: drop path draws afresh on the others", len(ranks), group.world
        )
    else:
        torch.manual_seed(config.seed * 1_000_003 + group.rank * 1_009 + int(state["epoch"]))
