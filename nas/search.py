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

from . import metrics as m
from .config import ConfigError
from .data import SearchData, make_search_data
from .environment import environment
from .genotype import Genotype, derive_genotype
from .runtime import (
    CHECKPOINT,
    RESULT,
    Diverged,
    EpochEvent,
    RunDirectory,
    load_checkpoint,
    resolve_device,
)
from .searcher import Derivation, Search
from .settings import RESUME_FREE, SearchConfig, lr_scale_capped_message
from .space import SearchSpace, Target

log = logging.getLogger(__name__)


# A search's divergence (a loss, alpha or beta NaN or infinite): the one divergence error of nas/.
SearchDiverged = Diverged


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


def _finished_result(run_dir: RunDirectory, config: SearchConfig) -> SearchResult | None:
    """The stored result of a search that already ran to its end in the run's directory, if any."""
    stored = run_dir.stored_result()
    if stored is None or not (run_dir.path / CHECKPOINT).exists() or len(stored["history"]) != config.epochs:
        return None
    wanted = [t.describe() for t in config.resolved_derive_targets()]
    if [d["target"] for d in stored.get("derivations", [])] != wanted:
        return None  # the final epoch's checkpoint derives them again
    log.info("resuming %s: the search is finished; its result is in %s", run_dir.path, run_dir.path / RESULT)
    return SearchResult.from_dict(stored, run_dir.path)


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
    run_dir = RunDirectory(Path(out_dir) if out_dir is not None else None, config.to_dict(), RESUME_FREE, "search")
    if resume and (finished := _finished_result(run_dir, config)) is not None:
        return finished
    device = resolve_device(config.device)
    data = (data or make_search_data(config.data)).to(device)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    search = Search.build(config, steps_per_epoch, data.num_classes, device)
    history: list[dict[str, Any]] = []
    start = 1
    if run_dir.path is not None:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        state = run_dir.saved_state(device) if resume else None
        if state is not None:
            search.load(state)
            history, start = list(state["history"]), state["epoch"] + 1
            log.info("resuming %s after epoch %d", run_dir.path, state["epoch"])
        (run_dir.path / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    log.info(
        "search: %s, %s, target %s, %d steps/epoch, arch lr scale %.4g",
        config.method(), data.describe(), search.target.describe(), steps_per_epoch, search.lr_scale,
    )  # fmt: skip
    for epoch in range(start, config.epochs + 1):
        record, clock = search.epoch(data, epoch, progress)
        history.append(record)
        log.info(
            "epoch %d/%d  train %.2f%%  supernet %.2f%%  discretized %.2f%%  arch CE %.3f  skips %s  %.1fs",
            epoch, config.epochs, record[m.TRAIN_ACC], record[m.VALID_ACC], record[m.DISCRETIZED_ACC],
            record[m.ARCH_CE], record[m.SKIP_CONNECT], record[m.SECONDS],
        )  # fmt: skip
        event = EpochEvent(epoch, config.epochs, record, m.epoch_metrics(record), None)
        # the callbacks' lap is in result.json's history; the checkpoint's copy ends before it
        run_dir.end_epoch(event, lambda epoch=epoch: search.state(epoch, history), callbacks, clock)
    result = _final_result(search, data, history, steps_per_epoch, device, started)
    result.out_dir = run_dir.path
    if run_dir.path is not None:
        for derivation in result.derivations:
            write_derivation(run_dir.path, derivation, config.epochs, search.space, artifacts)
    result.info["seconds"] = time.perf_counter() - started
    run_dir.write_result(result.to_dict())
    if run_dir.path is not None and artifacts:
        write_artifacts(run_dir.path, result.genotype, history, search.space)
    return result


def _final_result(
    search: Search, data: SearchData, history: list[dict[str, Any]], steps_per_epoch: int, device: torch.device,
    started: float,
) -> SearchResult:  # fmt: skip
    """The search's genotype under its target and its discretization metrics, then those under
    each further target (docs/science.md D14)."""
    config = search.config
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
    result = SearchResult(config, history, genotype, metrics, info)
    log.info(
        "done: supernet %.2f%%, discretized %.2f%% (drop %.2f), after BN recalibration %.2f%%; genotype\n%s",
        metrics[m.SUPERNET_ACC], metrics[m.DISCRETIZED_ACC], metrics[m.DROP], metrics[m.DISCRETIZED_BN_RECAL_ACC],
        genotype.describe(),
    )  # fmt: skip
    for target in config.resolved_derive_targets(search.space):
        derivation = search.derive(target, data, supernet_metrics=metrics)  # the supernet's own are the same
        result.derivations.append(derivation)
        log.info(
            "derived under %s: discretized %.2f%% (drop %.2f); genotype\n%s",
            derivation.target, derivation.metrics[m.DISCRETIZED_ACC], derivation.metrics[m.DROP],
            derivation.genotype.describe(),
        )  # fmt: skip
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
