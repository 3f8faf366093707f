"""The Ray Tune trainable: one trial = one full `nas.run_search`, a thin adapter.

Every epoch goes to Ray (its metrics, and the epoch's checkpoint, so that a trial whose process
dies is retried from it) and to the trial's MLflow run. The last epoch is reported once, together
with the discretization metrics, the derived network's size and the genotype: the trial's result.
A search that diverges (NaN) ends its trial with that reason instead of being retried: it would
diverge again.

Each epoch is in the run once: its metrics go to MLflow, then its checkpoint to Ray; a trial run
again from an earlier checkpoint (its process, node or driver lost in between) computes that epoch
again but does not log it again (the run holds it), and the epochs of a restored checkpoint whose
metrics never arrived (queued while MLflow was away when the process died) are sent from its history.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from nas.metrics import (
    FINAL_METRICS,
    PARAMS,
    SUPERNET_ACC,
    VALID_ACC,
    derived_metric_name,
    derived_params,
    epoch_metrics,
    split_derived,
)
from nas.runtime import CHECKPOINT, EpochEvent, load_checkpoint
from nas.search import SearchDiverged, run_search
from nas.settings import SearchConfig, arch_lr_scale, steps_per_epoch

from .accelerators import effective_precision
from .config import method_label, trial_search
from .job import TrackedJob, TrialOutcome
from .names import (
    COLOUR_TAG,
    DERIVED_TARGETS_TAG,
    NOTE_TAG,
    method_colour,
    mlflow_metrics,
    mlflow_name,
    report_names,
)
from .presentation import trial_note
from .tracking import params_of


@dataclass
class TrialSettings:
    """What every trial of a sweep needs besides its sampled parameters (picklable)."""

    sweep: str
    search: dict[str, Any]  # fixed settings, data root resolved to an absolute path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None
    objectives: tuple[str, ...]
    cpus: float = 1.0
    method_label: str | None = None
    gpus: float = 0.0  # reserved per trial: 0 hides CUDA from the trial
    faults: str = ""  # faults to inject (tuning/job.py), from the driver's NAS_FAULT


# The metric every epoch logs: its steps in the run say which epochs the run holds.
EPOCH_MARKER = mlflow_name(VALID_ACC)


def trial_name(method: str, config: SearchConfig, trial_id: str) -> str:
    target = config.resolved_target().slug()
    slug = re.sub(r"[^0-9A-Za-z.=]+", "-", method).strip("-")
    return f"{slug}-{target}-seed{config.seed}-{trial_id}"


def _report(metrics: Mapping[str, Any], checkpoint_file: Path | None, extra: Path | None = None) -> None:
    """tune.report with a checkpoint directory holding `checkpoint_file` (and `extra`, moved in)."""
    files = [f for f in (checkpoint_file, extra) if f is not None and f.exists()]
    if not files:
        tune.report(dict(metrics))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            shutil.copy2(f, Path(tmp) / f.name)
        tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(tmp))
    if extra is not None:
        extra.unlink(missing_ok=True)  # it lives on in the checkpoint, where the driver replays it


def _restore_checkpoint(out_dir: Path) -> None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as saved:
        shutil.copy2(Path(saved) / CHECKPOINT, out_dir / CHECKPOINT)


def _epoch_mlflow_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """An epoch of a checkpoint's history as its MLflow metrics, as on_epoch logged them."""
    return mlflow_metrics(epoch_metrics(record), tuple(record["loss_terms"]))


def _stored_result(run) -> dict[str, Any]:
    """The result of a trial whose run FINISHED before (from its MLflow run), as it reported it."""
    data = run.client.get_run(run.run_id).data
    stored = report_names(data.metrics)
    result = {k: v for k, v in stored.items() if split_derived(k)[0] in FINAL_METRICS}
    if SUPERNET_ACC in result:
        result[VALID_ACC] = result[SUPERNET_ACC]
    with tempfile.TemporaryDirectory() as tmp:
        genotype = Path(run.client.download_artifacts(run.run_id, "genotype.json", tmp)).read_text()
    return TrialOutcome(run.run_id, json.dumps(json.loads(genotype))).report(result)


def _final_metrics(result) -> tuple[dict[str, float], list[tuple[str, str, dict[str, float]]]]:
    """The trial's final metrics (its target's, and each further target's under `name@slug`,
    docs/science.md D14), and (target, slug, metrics) per further target."""
    final = {k: v for k, v in result.metrics.items() if k in FINAL_METRICS}
    final[PARAMS] = float(derived_params(result.genotype))
    derived = []
    for derivation in result.derivations:
        metrics = {k: v for k, v in derivation.metrics.items() if k in FINAL_METRICS}
        metrics[PARAMS] = float(derived_params(derivation.genotype))
        derived.append((derivation.target, derivation.slug, metrics))
        final.update({derived_metric_name(k, derivation.slug): v for k, v in metrics.items()})
    return final, derived


def search_trial(params: dict[str, Any], settings: TrialSettings) -> None:
    """One trial: one full search, tracked (tuning/job.py), reporting every epoch to Ray Tune."""
    started = time.perf_counter()
    overhead = 0.0  # seconds spent on tracking and reporting, not on the search (bench/sweep_overhead.py)
    # Ray logs every checkpoint it stores; the driver's progress lines say what a user needs.
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    trial_id = tune.get_context().get_trial_id()
    # Fail fast on an unreachable MLflow server: TrackedRun queues and retries without blocking training.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    config = SearchConfig.resolve(file=trial_search(settings.search, params))
    out_dir = Path(tune.get_context().get_trial_dir()) / "search"
    job = TrackedJob("trial", "trial_id", trial_id, settings.tracking_uri, settings.experiment_id,
                     settings.parent_run_id, out_dir, marker=EPOCH_MARKER, faults=settings.faults)  # fmt: skip
    threads = job.claim(settings.gpus, settings.cpus, config.device)
    _restore_checkpoint(out_dir)
    method = method_label(settings.method_label, config.to_dict())
    extras = {
        "method": method,
        "target": config.resolved_target().describe(),
        "trial_id": trial_id,
        "threads": threads,
        "arch_lr_scale_effective": round(arch_lr_scale(config, steps_per_epoch(config)), 6),
        **({} if job.problem else effective_precision(config.device, config.runtime)),
    }
    tags = {"sweep": settings.sweep, COLOUR_TAG: method_colour(method)}
    if job.open(trial_name(method, config, trial_id), params_of(config.to_dict(), extras), tags):
        # Finished before the driver lost track of it (a driver killed between two snapshots of
        # the sweep's state): report that result instead of searching again.
        _report(_stored_result(job.run), None)
        return
    if (out_dir / CHECKPOINT).exists():  # epochs whose metrics were lost after their checkpoint was stored
        job.resend(load_checkpoint(out_dir / CHECKPOINT)["history"], _epoch_mlflow_metrics)
    last: dict[str, Any] = {}

    def on_epoch(event: EpochEvent) -> None:
        nonlocal overhead
        tick = time.perf_counter()
        job.epoch(mlflow_metrics(event.metrics, tuple(event.record["loss_terms"])), event.epoch)
        metrics = {**event.metrics, "epoch": event.epoch, TrialOutcome.key("run_id"): job.run_id}
        if event.epoch == event.epochs:
            last.update(metrics)  # reported with the final metrics, as one result
        else:
            _report(metrics, event.checkpoint_path)
        overhead += time.perf_counter() - tick

    overhead += time.perf_counter() - started  # set-up: config, MLflow run
    try:
        search_started, overhead_before = time.perf_counter(), overhead
        result = run_search(config, out_dir, callbacks=[on_epoch])
        search_seconds = time.perf_counter() - search_started - (overhead - overhead_before)
    except SearchDiverged as err:
        pending = job.fail(err, diverged=True)
        nan = {name: math.nan for name in settings.objectives}
        outcome = TrialOutcome(job.run_id, diverged=True, failure=str(err), pending=pending)
        _report(outcome.report(nan), None, job.pending_file if pending else None)
        return
    except Exception as err:
        job.fail(err)
        raise
    tick = time.perf_counter()
    final, pending = _finish(job, result, method, last, out_dir, search_seconds)
    overhead += time.perf_counter() - tick
    outcome = TrialOutcome(job.run_id, json.dumps(result.genotype.to_dict()), pending=pending)
    report = outcome.report({**last, **final, "overhead_seconds": overhead})  # without the last checkpoint copy
    _report(report, out_dir / CHECKPOINT, job.pending_file if pending else None)


def _finish(
    job: TrackedJob, result, method: str, last: Mapping[str, Any], out_dir: Path, search_seconds: float
) -> tuple[dict, int]:
    """A finished search's final metrics, artifacts, cells and description on its run, which ends
    FINISHED; (the final metrics, the calls left pending)."""
    config = result.config
    final, derived = _final_metrics(result)
    final["search_seconds"] = search_seconds
    # The last epoch already logged the supernet and discretized accuracies and the drop at this
    # step, under the same names; only what differs is logged.
    logged = mlflow_metrics(last)
    job.run.log_final({k: v for k, v in mlflow_metrics(final).items() if logged.get(k) != v}, config.epochs)
    job.run.log_artifacts(out_dir)
    cells = {level: f"cells/cell_{level}.png" for level in result.genotype.levels}
    for level, path in cells.items():  # the compare view's image grid shows the trials' cells side by side
        job.run.log_image(out_dir / path, f"cell_{level}", config.epochs)
    note = trial_note(
        job.run_id, method, result.info["target"], config.seed, final, result.genotype.describe(), cells, derived
    )
    tags = {"genotype": result.genotype.describe(), "target": result.info["target"], "method": method, NOTE_TAG: note}
    if derived:
        tags[DERIVED_TARGETS_TAG] = json.dumps({slug: text for text, slug, _ in derived})
    return final, job.finish(tags)
