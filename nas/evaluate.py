"""run_evaluation: train a derived architecture from scratch (docs/science.md §4), on one process or
on data-parallel ranks (§4.3), with its protocol (nas/eval_config.py) and data (nas/eval_data.py).

    config = EvalConfig.resolve("cifar10", overrides=["epochs=20", "layers=8", "channels=16"])
    result = run_evaluation(PUBLISHED["darts_v2"], config, out_dir="runs/eval/darts_v2")
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import metrics as m
from .distributed import Group, broadcast_buffers, sync_batchnorm
from .environment import environment
from .eval_config import (  # noqa: F401 (EvalConfig and the protocols are read from here too)
    CIFAR_SIZES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MOBILE_MACS,
    PROTOCOLS,
    RESUME_FREE,
    EvalConfig,
    EvalDataConfig,
    epoch_lr,
)
from .eval_data import make_eval_data
from .genotype import Genotype
from .network import EvalNetwork, count_macs, count_parameters
from .runtime import (
    RESULT,
    Diverged,
    EpochEvent,
    RunDirectory,
    check_layout,
    progress_bar,
    resolve_device,
)

log = logging.getLogger(__name__)


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
    run_dir = RunDirectory(out, config.to_dict(), RESUME_FREE, "evaluation")
    stored = run_dir.stored_result() if resume else None
    stored = group.broadcast(stored if stored is not None and len(stored["history"]) == config.epochs else None)
    if stored is not None:
        if group.leader:
            log.info("evaluation in %s is finished; its result is in %s", out, out / RESULT)
        return EvalResult(
            config, stored["history"], stored["metrics"], stored["info"], out, stored.get("environment", {})
        )

    model, info = _network(genotype, config, device, group)
    data = data or make_eval_data(config, device, group)
    optimizer = torch.optim.SGD(
        model.parameters(), config.peak_lr(), momentum=config.momentum, weight_decay=config.weight_decay
    )
    history, start = _resume(run_dir, resume, model, optimizer, config, group)
    earlier = sum(record.get(m.SECONDS, 0.0) for record in history)  # the epochs run before a resume
    net = _replicated(model, device, group)
    for epoch in range(start, config.epochs + 1):
        record = _epoch(model, net, optimizer, data, config, epoch, group, progress)
        history.append(record)
        rng = group.gather(torch.get_rng_state())
        if not group.leader:
            continue
        log.info(
            "epoch %d/%d  train %.2f%%  test error %.2f%% (top-5 %.2f%%)  %.1fs",
            epoch, config.epochs, record[m.TRAIN_ACC], record[m.TEST_TOP1_ERROR], record[m.TEST_TOP5_ERROR], record[m.SECONDS],
        )  # fmt: skip
        state = lambda epoch=epoch, rng=rng: {  # noqa: E731
            "format": 1, "epoch": epoch, "config": config.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "history": history, "torch_rng": rng[0], "torch_rng_ranks": rng,
        }  # fmt: skip
        metrics = {k: float(v) for k, v in record.items() if k != "epoch"}
        run_dir.end_epoch(EpochEvent(epoch, config.epochs, record, metrics, None), state, callbacks)

    last = history[-1] if history else {}
    metrics = {
        m.TEST_TOP1_ERROR: last.get(m.TEST_TOP1_ERROR, math.nan),
        m.TEST_TOP5_ERROR: last.get(m.TEST_TOP5_ERROR, math.nan),
        m.PARAMS: float(info["params"]),
        m.MACS: float(info["macs"]),
    }
    info["seconds"] = earlier + time.perf_counter() - started
    result = EvalResult(config, history, metrics, info, out)
    run_dir.write_result(result.to_dict())
    return result


def _network(
    genotype: Genotype, config: EvalConfig, device: torch.device, group: Group
) -> tuple[torch.nn.Module, dict]:
    """The evaluation network on `device` (BatchNorm synchronised where D15 says so), and the
    result's info about it."""
    torch.manual_seed(config.seed)
    model = network_for(genotype, config)
    params = count_parameters(model)
    macs = count_macs(model, config.image_size)
    memory_format = config.runtime.memory_format(device, "evaluate")
    if memory_format == torch.channels_last:  # on CUDA: only where its gradients are the contiguous ones
        check_layout(model, lambda net, x: net(x)[0], (3, config.image_size, config.image_size), device)
    synchronised = config.synchronised_bn(group.world)
    if synchronised:
        model = sync_batchnorm(model, device)
    model = model.to(device).to(memory_format=memory_format)
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
    if group.leader:
        if not info["mobile_setting_ok"]:
            log.warning("%.0fM multiply-adds: above the ImageNet mobile setting's 600M", macs / 1e6)
        log.info(
            "evaluating: %d cells, C=%d, %.2fM params, %.0fM multiply-adds, %d epochs, batch %d%s",
            config.layers, config.channels, params / 1e6, macs / 1e6, config.epochs, config.batch_size,
            f" over {group.world} workers ({config.batch_size / group.world:g} each, BatchNorm "
            f"{'synchronised' if synchronised else 'per worker'})" if group.parallel else "",
        )  # fmt: skip
    return model, info


def _resume(
    run_dir: RunDirectory, resume: bool, model, optimizer: torch.optim.Optimizer, config: EvalConfig, group: Group
) -> tuple[list[dict[str, Any]], int]:
    """(history, first epoch to train): the checkpoint's, read by rank 0 and sent to every rank, or
    a fresh start (each rank's drop-path stream seeded, rank 0's the one-process stream)."""
    state = group.broadcast(run_dir.saved_state() if resume else None)
    if state is None:
        if group.rank > 0:
            torch.manual_seed(config.seed * 1_000_003 + group.rank)
        return [], 1
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _restore_rng(state, config, group)
    if group.leader:
        log.info("resuming %s after epoch %d", run_dir.path, state["epoch"])
    return list(state["history"]), state["epoch"] + 1


def _replicated(model: torch.nn.Module, device: torch.device, group: Group) -> torch.nn.Module:
    """The model as its ranks train it: DistributedDataParallel with several, the model with one."""
    if not group.parallel:
        return model
    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, **_NO_BUFFER_SYNC)


def _epoch(model, net, optimizer, data, config: EvalConfig, epoch: int, group: Group, progress: bool) -> dict[str, Any]:
    """One epoch: its learning rate and drop path, the SGD steps, then the test set; its record."""
    epoch_started = time.perf_counter()
    device = next(model.parameters()).device
    lr = epoch_lr(config, epoch)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    model.drop_path_prob = config.drop_path * (epoch - 1) / config.epochs
    memory_format = config.runtime.memory_format(device, "evaluate")
    autocast = config.runtime.autocast_dtype(device, "evaluate")
    train_loss, train_acc = _train_epoch(net, optimizer, data, config, epoch, autocast, memory_format, group, progress)
    if not math.isfinite(train_loss):
        raise Diverged(f"epoch {epoch}: the training loss became {train_loss}")
    broadcast_buffers(model, group)  # with BatchNorm per replica: rank 0's statistics, tested and saved
    top1, top5, test_loss = test_accuracy(model, data, group)
    return {
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
