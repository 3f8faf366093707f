"""Search: the objects of one supernet search, built from its config and restored from a checkpoint,
and what it does: an epoch of steps (docs/science.md §2.3: an architecture update on a validation
batch, then a weight update on a training batch) with its measurements, its state for a checkpoint,
and the discretization and derivation of what it learned (§5.1, D14). nas/search.py runs it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import metrics as m
from .architect import Architect
from .data import SearchData, batches, stream_generator
from .discretize import BoundSupernet, accuracy
from .genotype import Genotype, derive_genotype
from .graphs import GraphedStep, StaticStep
from .losses import warmup_epoch
from .runtime import Diverged, PhaseClock, check_layout, cosine_lr, progress_bar
from .settings import SearchConfig, arch_lr_scale, lr_scale_capped_message
from .space import SearchSpace, Target
from .supernet import Architecture, Supernet

log = logging.getLogger(__name__)


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
    # The step as a CUDA graph (runtime.cuda_graphs, nas/graphs.py); None: the eager step.
    graphed: GraphedStep | None = None

    @classmethod
    def build(cls, config: SearchConfig, steps_per_epoch: int, num_classes: int, device: torch.device) -> Search:
        torch.manual_seed(config.seed)
        space = config.space()
        target = config.resolved_target(space)
        supernet = Supernet(space, config.model.channels, num_classes, config.model.stem_multiplier).to(device)
        runtime = config.runtime
        supernet.set_fused(runtime.fused)
        memory_format = runtime.memory_format(device)
        generator = torch.Generator().manual_seed(config.seed)
        arch = Architecture(space, target, config.alpha, config.beta, config.edge_params, generator).to(device)
        if memory_format == torch.channels_last:  # on CUDA: only where its gradients are the contiguous ones
            size = config.data.resolution
            check_layout(supernet, lambda net, x: net(x, arch()), (3, size, size), device)
        supernet.set_memory_format(memory_format)
        supernet.set_autocast(runtime.autocast_dtype(device))
        if runtime.compile:
            supernet.compile()
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
        search = cls(
            config, space, target, supernet, arch, weight_optimizer, arch_optimizer, architect, alpha_lr, beta_lr, scale
        )
        if runtime.graphed_step(device, config.order):
            search.graphed = GraphedStep(StaticStep(search))
        return search

    def epoch(self, data: SearchData, epoch: int, progress: bool = False) -> tuple[dict[str, Any], PhaseClock]:
        """One epoch (docs/science.md §2.3): the steps, then the supernet and discretized accuracy on
        the evaluation set and the diagnostics of D7; its record and the seconds per phase."""
        config = self.config
        epoch_started = time.perf_counter()
        lr = cosine_lr(epoch, config.epochs, config.weights.lr, config.weights.lr_min)
        for group in self.weight_optimizer.param_groups:
            group["lr"] = lr
        alpha_lr = 0.0 if epoch < warmup_epoch(config.alpha.warmup, config.epochs) else self.alpha_lr
        self.arch_optimizer.param_groups[0]["lr"] = alpha_lr
        loss_weights = config.loss.weights_at(epoch, config.epochs)
        # Wall time per phase; each phase ends by reading a value from the device, so on a GPU
        # the times are those of the work itself, not of queueing it.
        clock = PhaseClock()
        if self.graphed is not None:
            self.graphed.check_state()
        stats = _train_epoch(self, data, epoch, lr, loss_weights, progress)
        clock.lap("train")
        with torch.no_grad():
            bound = BoundSupernet(self.supernet, self.arch())
        valid_acc, valid_loss = accuracy(bound, data.eval)
        clock.lap("eval")
        genotype = derive_genotype(self.arch)
        discretized_acc = m.discretized_accuracy(self.supernet, genotype, bound.arch_weights, data.eval)
        clock.lap("discretize")
        diagnostics = m.architecture_diagnostics(self.arch, genotype)
        clock.lap("diagnostics")
        record = {
            "epoch": epoch,
            m.LR: lr,
            m.ALPHA_LR: alpha_lr,
            m.BETA_LR: self.beta_lr if self.arch.betas else 0.0,
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
        return record, clock

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
        """One search step (docs/science.md §2.3): the architecture step, then the weight step.
        The weights' learning rate is the optimiser's (`Search.epoch` sets it); `lr` is the virtual
        step's in second order."""
        if self.graphed is not None:
            arch_lrs = [group["lr"] for group in self.arch_optimizer.param_groups]
            self.graphed.controls.set(self.weight_optimizer.param_groups[0]["lr"], arch_lrs, loss_weights)
            return self.graphed(train_batch, valid_batch)
        info = self.architect.step(valid_batch, train_batch, loss_weights, lr, self.weight_optimizer)
        loss, logits = self.weight_step(train_batch)
        return loss, logits, info

    def load(self, state: Mapping[str, Any]) -> None:
        self.supernet.load_state_dict(state["supernet"])
        self.arch.load_state_dict(state["arch"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.arch_optimizer.load_state_dict(state["arch_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if self.graphed is not None:
            self.graphed.invalidate()  # the optimisers' states are new tensors


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
        raise Diverged(
            f"epoch {epoch}: {', '.join(bad)} became NaN or infinite (lr {lr:g}, arch lr scale {search.lr_scale:g})"
        )
    stats["loss_terms"] = {k: v.item() for k, v in terms.items()}
    return stats
