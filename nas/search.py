"""run_search: one full supernet search, from data to discretized accuracy.

    config = SearchConfig.resolve(preset="da2s", overrides=["epochs=10", "target=3 of 14"])
    result = run_search(config, out_dir="runs/da2s")

Per epoch (docs/science.md §2.3): for each training batch, an architecture step on a validation batch,
then a weight step (SGD, gradient norm clipped) on the training batch; then the supernet accuracy
on the evaluation set and the diagnostics of docs/science.md D7. Callbacks receive each epoch's record;
with an output directory every epoch also writes a checkpoint, and running again on the directory
resumes from it. At the end: the genotype for the target and the discretized accuracies.
"""

from __future__ import annotations

import json
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

from . import metrics as m
from .architect import Architect
from .config import ConfigError
from .data import SearchData, batches, make_search_data, stream_generator
from .discretize import BoundSupernet, accuracy
from .environment import environment
from .genotype import Genotype, derive_genotype
from .losses import warmup_epoch
from .runtime import (
    CHECKPOINT,
    RESULT,
    Diverged,
    EpochEvent,
    PhaseClock,
    check_resumable,
    cosine_lr,
    load_checkpoint,
    progress_bar,
    resolve_device,
    save_atomic,
)
from .settings import RESUME_FREE, SearchConfig, arch_lr_scale, lr_scale_capped_message
from .space import SearchSpace, Target
from .supernet import Architecture, Supernet

log = logging.getLogger(__name__)


# A search's divergence (a loss, alpha or beta NaN or infinite): the one divergence error of nas/.
SearchDiverged = Diverged


@dataclass
class Derivation:
    """A search's genotype under one target and its discretization metrics, the same as the final
    ones of a search under that target where the target does not shape the search (D14)."""

    target: str  # Target.describe()
    slug: str  # Target.slug(): the directory derive/<slug>/ and the metric suffix @<slug>
    genotype: Genotype
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "slug": self.slug, "genotype": self.genotype.to_dict(), "metrics": self.metrics}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Derivation:
        return cls(data["target"], data["slug"], Genotype.from_dict(data["genotype"]), dict(data["metrics"]))


@dataclass
class SearchResult:
    config: SearchConfig
    history: list[dict[str, Any]]
    genotype: Genotype
    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    # Under `config.derive_targets`, in their order (docs/science.md D14).
    derivations: list[Derivation] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=environment)  # nas/environment.py

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], out_dir: Path | None = None) -> SearchResult:
        return cls(
            SearchConfig.from_dict(data["config"]),
            list(data["history"]),
            Genotype.from_dict(data["genotype"]),
            dict(data["metrics"]),
            dict(data.get("info", {})),
            out_dir,
            [Derivation.from_dict(d) for d in data.get("derivations", [])],
            dict(data.get("environment", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "target": self.genotype.meta.get("target"),
            "genotype": self.genotype.to_dict(),
            "metrics": self.metrics,
            "derivations": [d.to_dict() for d in self.derivations],
            "info": self.info,
            "environment": self.environment,
            "history": self.history,
        }

    def derived_metrics(self) -> dict[str, float]:
        """Every derivation's metrics under their flat names (`discretized_acc@3of14`, ...)."""
        return {m.derived_metric_name(k, d.slug): v for d in self.derivations for k, v in d.metrics.items()}


@dataclass
class Search:
    """The objects of one search, built from a config (and restored from a checkpoint), and its
    step: an architecture update on a validation batch, then a weight update on a training batch."""

    config: SearchConfig
    space: SearchSpace
    target: Target
    supernet: Supernet
    arch: Architecture
    weight_optimizer: torch.optim.SGD
    arch_optimizer: torch.optim.Adam
    architect: Architect
    alpha_lr: float
    beta_lr: float
    lr_scale: float

    @classmethod
    def build(cls, config: SearchConfig, steps_per_epoch: int, num_classes: int, device: torch.device) -> Search:
        torch.manual_seed(config.seed)
        space = config.space()
        target = config.resolved_target(space)
        supernet = Supernet(space, config.model.channels, num_classes, config.model.stem_multiplier).to(device)
        runtime = config.runtime
        supernet.set_fused(runtime.fused)
        supernet.set_memory_format(runtime.memory_format(device))
        supernet.set_autocast(runtime.autocast_dtype(device))
        if runtime.compile:
            supernet.compile()
        generator = torch.Generator().manual_seed(config.seed)
        arch = Architecture(space, target, config.alpha, config.beta, config.edge_params, generator).to(device)
        sgd = config.weights
        weight_optimizer = torch.optim.SGD(
            supernet.parameters(), lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay
        )
        scale = arch_lr_scale(config, steps_per_epoch)
        if (capped := lr_scale_capped_message(config, steps_per_epoch)) is not None:
            log.warning(capped)
        alpha_lr, beta_lr = config.alpha.lr * scale, config.beta.lr * scale
        groups = [{"params": arch.alpha_parameters(), "lr": alpha_lr}]
        if arch.beta_parameters():
            groups.append({"params": arch.beta_parameters(), "lr": beta_lr})
        # One Adam, alpha and beta as groups (the DA2S code), so alpha's lr can be 0 during
        # warm-up while Adam's moments still see its gradients.
        arch_optimizer = torch.optim.Adam(
            groups, betas=tuple(config.arch_optim.betas), weight_decay=config.arch_optim.weight_decay
        )
        architect = Architect(supernet, arch, arch_optimizer, config)
        return cls(
            config, space, target, supernet, arch, weight_optimizer, arch_optimizer, architect, alpha_lr, beta_lr, scale
        )

    def state(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": 1,
            "epoch": epoch,
            "config": self.config.to_dict(),
            "supernet": self.supernet.state_dict(),
            "arch": self.arch.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "arch_optimizer": self.arch_optimizer.state_dict(),
            "history": history,
            "torch_rng": torch.get_rng_state(),
        }

    def derive(
        self, target: Target, data: SearchData, supernet_metrics: Mapping[str, float] | None = None
    ) -> Derivation:
        """The genotype under `target` and its discretization metrics (with the convergence ones);
        `supernet_metrics` as for `nas.metrics.discretization_metrics`."""
        genotype = derive_genotype(self.arch, target)
        metrics = self.discretize(genotype, data, supernet_metrics)
        metrics.update(m.convergence_metrics(self.arch, genotype))
        return Derivation(target.describe(), target.slug(), genotype, metrics)

    def discretize(
        self, genotype: Genotype, data: SearchData, supernet_metrics: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Supernet and discretized accuracies of `genotype` on the evaluation set (docs/science.md D4)."""
        config = self.config
        return m.discretization_metrics(
            self.supernet, self.arch, genotype, data.eval, data.train,
            recal_batches=config.discretize.bn_recal_batches, batch_size=config.batch_size, seed=config.seed,
            supernet_metrics=supernet_metrics,
        )  # fmt: skip

    def weight_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on the training batch with alpha and beta fixed; returns (loss, logits)."""
        images, labels = batch
        self.weight_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            arch_weights = self.arch()
        logits = self.supernet(images, arch_weights)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        if self.config.weights.grad_clip is not None:
            # The optimiser's list of the supernet's parameters: no walk over the modules per step;
            # foreach: one call for all gradients (on the CPU too, where it is not the default).
            weights = self.weight_optimizer.param_groups[0]["params"]
            torch.nn.utils.clip_grad_norm_(weights, self.config.weights.grad_clip, foreach=True)
        self.weight_optimizer.step()
        return loss.detach(), logits.detach()

    def step(self, train_batch, valid_batch, loss_weights: dict[str, float], lr: float):
        """One search step (docs/science.md §2.3): the architecture step, then the weight step."""
        info = self.architect.step(valid_batch, train_batch, loss_weights, lr, self.weight_optimizer)
        loss, logits = self.weight_step(train_batch)
        return loss, logits, info

    def load(self, state: Mapping[str, Any]) -> None:
        self.supernet.load_state_dict(state["supernet"])
        self.arch.load_state_dict(state["arch"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.arch_optimizer.load_state_dict(state["arch_optimizer"])
        torch.set_rng_state(state["torch_rng"])


def _check_resumable(saved: Mapping[str, Any], config: SearchConfig, path: Path) -> None:
    check_resumable(saved, config.to_dict(), RESUME_FREE, path, "search")


def _finished_result(out: Path, config: SearchConfig) -> SearchResult | None:
    """The stored result of a search that already ran to its end in `out`, if any."""
    if not (out / RESULT).exists() or not (out / CHECKPOINT).exists():
        return None
    stored = json.loads((out / RESULT).read_text())
    _check_resumable(stored["config"], config, out / RESULT)
    if len(stored["history"]) != config.epochs:
        return None
    wanted = [t.describe() for t in config.resolved_derive_targets()]
    if [d["target"] for d in stored.get("derivations", [])] != wanted:
        return None  # the final epoch's checkpoint derives them again
    log.info("resuming %s: the search is finished; its result is in %s", out, out / RESULT)
    return SearchResult.from_dict(stored, out)


def _train_epoch(
    search: Search, data: SearchData, epoch: int, lr: float, loss_weights, progress: bool
) -> dict[str, float]:
    config = search.config
    arch = search.arch
    search.supernet.train()
    train_stream = batches(data.train, config.batch_size, stream_generator(config.seed, epoch, 0), augment=True)
    valid_stream = batches(
        data.valid, config.batch_size, stream_generator(config.seed, epoch, 1), augment=True, cycle=True
    )
    steps = math.ceil(len(data.train) / config.batch_size)
    device = data.train.images.device
    loss_sum = torch.zeros((), device=device)
    arch_ce_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    terms: dict[str, torch.Tensor] = {}
    bar = progress_bar(steps, f"epoch {epoch}/{config.epochs}", progress)
    for step, train_batch in enumerate(train_stream):
        loss, logits, info = search.step(train_batch, next(valid_stream), loss_weights, lr)
        labels = train_batch[1]
        n = len(labels)
        seen += n
        loss_sum += loss * n
        arch_ce_sum += info["arch_ce"] * n
        correct += (logits.argmax(1) == labels).sum()
        terms = {k: v for k, v in info.items() if k != "arch_ce"}
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100.0 * correct.item() / seen:.1f}")
    if bar is not None:
        bar.close()
    stats = {
        m.TRAIN_LOSS: (loss_sum / seen).item(),
        m.TRAIN_ACC: 100.0 * correct.item() / seen,
        m.ARCH_CE: (arch_ce_sum / seen).item(),
    }
    bad = [k for k, v in stats.items() if not math.isfinite(v)]
    bad += [f"alpha[{i}]" for i, a in enumerate(arch.alphas) if not torch.isfinite(a).all()]
    bad += [f"beta[{i}]" for i, b in enumerate(arch.betas) if not torch.isfinite(b).all()]
    if bad:
        raise SearchDiverged(
            f"epoch {epoch}: {', '.join(bad)} became NaN or infinite (lr {lr:g}, arch lr scale {search.lr_scale:g})"
        )
    stats["loss_terms"] = {k: v.item() for k, v in terms.items()}
    return stats


def write_artifacts(
    out_dir: Path, genotype: Genotype, history: Sequence[Mapping[str, Any]], space: SearchSpace
) -> None:
    """genotype.json, one drawing per cell level and the alpha / edge-weight evolution plots."""
    from .plots import draw_genotype, plot_alpha_evolution, plot_edge_weights

    genotype.save(out_dir / "genotype.json")
    draw_genotype(genotype, out_dir / "cells")
    if history:
        for level in space.level_names:
            plot_alpha_evolution(history, space.ops, level, space.nodes, out_dir / "plots" / f"alpha_{level}.png")
            if "edge_weights" in history[-1]:
                plot_edge_weights(history, level, space.nodes, out_dir / "plots" / f"edge_weights_{level}.png")


def run_search(
    config: SearchConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    data: SearchData | None = None,
    callbacks: Sequence[Callable[[EpochEvent], None]] = (),
    progress: bool = False,
    resume: bool = True,
    artifacts: bool = True,
) -> SearchResult:
    """Runs (or resumes, from `out_dir/checkpoint.pt`) one supernet search and measures its
    discretization; with `artifacts`, also writes the genotype, cell drawings and alpha / edge
    weight plots to `out_dir`. Raises SearchDiverged when a loss or alpha/beta stops being finite."""
    started = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is not None and (finished := _finished_result(out, config)) is not None:
        return finished
    device = resolve_device(config.device)
    data = (data or make_search_data(config.data)).to(device)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    search = Search.build(config, steps_per_epoch, data.num_classes, device)
    history: list[dict[str, Any]] = []
    start = 1
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = out / CHECKPOINT
        if resume and checkpoint.exists():
            state = load_checkpoint(checkpoint, device)
            _check_resumable(state["config"], config, checkpoint)
            search.load(state)
            history = list(state["history"])
            start = state["epoch"] + 1
            log.info("resuming %s after epoch %d", out, state["epoch"])
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    log.info(
        "search: %s, %s, target %s, %d steps/epoch, arch lr scale %.4g",
        config.method(),
        data.describe(),
        search.target.describe(),
        steps_per_epoch,
        search.lr_scale,
    )
    alpha_start = warmup_epoch(config.alpha.warmup, config.epochs)
    for epoch in range(start, config.epochs + 1):
        epoch_started = time.perf_counter()
        lr = cosine_lr(epoch, config.epochs, config.weights.lr, config.weights.lr_min)
        for group in search.weight_optimizer.param_groups:
            group["lr"] = lr
        alpha_lr = 0.0 if epoch < alpha_start else search.alpha_lr
        search.arch_optimizer.param_groups[0]["lr"] = alpha_lr
        loss_weights = config.loss.weights_at(epoch, config.epochs)
        # Wall time per phase; each phase ends by reading a value from the device, so on a GPU
        # the times are those of the work itself, not of queueing it.
        clock = PhaseClock()
        stats = _train_epoch(search, data, epoch, lr, loss_weights, progress)
        clock.lap("train")
        with torch.no_grad():
            bound = BoundSupernet(search.supernet, search.arch())
        valid_acc, valid_loss = accuracy(bound, data.eval)
        clock.lap("eval")
        genotype = derive_genotype(search.arch)
        discretized_acc = m.discretized_accuracy(search.supernet, genotype, bound.arch_weights, data.eval)
        clock.lap("discretize")
        diagnostics = m.architecture_diagnostics(search.arch, genotype)
        clock.lap("diagnostics")
        record = {
            "epoch": epoch,
            m.LR: lr,
            m.ALPHA_LR: alpha_lr,
            m.BETA_LR: search.beta_lr if search.arch.betas else 0.0,
            **stats,
            "loss_weights": loss_weights,
            m.VALID_ACC: valid_acc,
            m.VALID_LOSS: valid_loss,
            # trained edge weights, stored BN statistics: the final `discretized_acc` at the last epoch
            m.DISCRETIZED_ACC: discretized_acc,
            m.DROP: valid_acc - discretized_acc,
            **diagnostics,
            m.SECONDS: time.perf_counter() - epoch_started,
            "phase_seconds": clock.laps,
        }
        history.append(record)
        log.info(
            "epoch %d/%d  train %.2f%%  supernet %.2f%%  discretized %.2f%%  arch CE %.3f  skips %s  %.1fs",
            epoch,
            config.epochs,
            record[m.TRAIN_ACC],
            valid_acc,
            discretized_acc,
            record[m.ARCH_CE],
            record[m.SKIP_CONNECT],
            record[m.SECONDS],
        )
        checkpoint_path = None
        if out is not None:
            checkpoint_path = out / CHECKPOINT
            save_atomic(search.state(epoch, history), checkpoint_path)
            clock.lap("checkpoint")
        event = EpochEvent(epoch, config.epochs, record, m.epoch_metrics(record), checkpoint_path)
        for callback in callbacks:
            callback(event)
        if callbacks:
            clock.lap("callbacks")  # in result.json's history; the checkpoint's copy ends before it

    final_started = time.perf_counter()
    genotype = derive_genotype(search.arch)
    metrics = search.discretize(genotype, data)
    metrics.update(m.convergence_metrics(search.arch, genotype))
    info = {
        "final_metrics_seconds": time.perf_counter() - final_started,
        "target": search.target.describe(),
        "method": config.method(),
        "arch_lr_scale": search.lr_scale,
        "steps_per_epoch": steps_per_epoch,
        "data": data.describe(),
        "device": str(device),
        "seconds": time.perf_counter() - started,
    }
    if (capped := lr_scale_capped_message(config, steps_per_epoch)) is not None:
        info["arch_lr_scale_capped"] = capped
    if device.type == "cuda":
        info["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result = SearchResult(config, history, genotype, metrics, info, out)
    log.info(
        "done: supernet %.2f%%, discretized %.2f%% (drop %.2f), after BN recalibration %.2f%%; genotype\n%s",
        metrics[m.SUPERNET_ACC],
        metrics[m.DISCRETIZED_ACC],
        metrics[m.DROP],
        metrics[m.DISCRETIZED_BN_RECAL_ACC],
        genotype.describe(),
    )
    for target in config.resolved_derive_targets(search.space):
        derivation = search.derive(target, data, supernet_metrics=metrics)  # the supernet's own are the same
        result.derivations.append(derivation)
        log.info(
            "derived under %s: discretized %.2f%% (drop %.2f); genotype\n%s",
            derivation.target,
            derivation.metrics[m.DISCRETIZED_ACC],
            derivation.metrics[m.DROP],
            derivation.genotype.describe(),
        )
        if out is not None:
            write_derivation(out, derivation, config.epochs, search.space, artifacts)
    info["seconds"] = time.perf_counter() - started
    if out is not None:
        (out / RESULT).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        if artifacts:
            write_artifacts(out, genotype, history, search.space)
    return result


def write_derivation(out: Path, derivation: Derivation, epoch: int, space: SearchSpace, artifacts: bool = True) -> Path:
    """OUT/derive/<slug>/: result.json (target, epoch, genotype, metrics) and, with `artifacts`, the
    genotype and its cell drawings."""
    target_dir = out / "derive" / derivation.slug
    target_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "target": derivation.target,
        "epoch": epoch,
        "genotype": derivation.genotype.to_dict(),
        "metrics": derivation.metrics,
    }
    (target_dir / RESULT).write_text(json.dumps(result, indent=2) + "\n")
    if artifacts:
        write_artifacts(target_dir, derivation.genotype, [], space)
    return target_dir


def rederive(
    out_dir: str | os.PathLike,
    target: Any,
    *,
    data: SearchData | None = None,
    data_root: str | None = None,
    device: str | None = None,
) -> tuple[Genotype, dict[str, float]]:
    """The genotype of a finished (or checkpointed) search under another target, and its
    discretized accuracies, written to OUT_DIR/derive/<target>/. With beta, edges are ranked on
    their trained edge weights, which under a different target compares edges across nodes."""
    out = Path(out_dir)
    checkpoint = out / CHECKPOINT
    if not checkpoint.exists():
        raise ConfigError("DIR", str(out), f"holds no {CHECKPOINT}; give the output directory of a search")
    state = load_checkpoint(checkpoint)
    saved = dict(state["config"])
    if data_root:
        saved["data"] = {**saved.get("data", {}), "root": data_root}
    if device:
        saved["device"] = device
    config = SearchConfig.from_dict(saved)
    dev = resolve_device(config.device)
    data = (data or make_search_data(config.data)).to(dev)
    search = Search.build(config, math.ceil(len(data.train) / config.batch_size), data.num_classes, dev)
    search.load(state)
    new_target = Target.parse(target, search.space, "--target")
    genotype = derive_genotype(search.arch, new_target)
    metrics = search.discretize(genotype, data)
    derivation = Derivation(new_target.describe(), new_target.slug(), genotype, metrics)
    write_derivation(out, derivation, state["epoch"], search.space)
    return genotype, metrics
