"""The Ray Tune trainable: one trial = one full `nas.run_search`, a thin adapter.

Every epoch goes to Ray (its metrics, and the epoch's checkpoint, so that a trial whose process
dies is retried from it) and to the trial's MLflow run. The last epoch is reported once, together
with the discretization metrics, the derived network's size and the genotype: the trial's result.
A search that diverges (NaN) ends its trial with that reason instead of being retried: it would
diverge again.
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
    split_derived,
)
from nas.runtime import CHECKPOINT, EpochEvent
from nas.search import SearchDiverged, run_search
from nas.settings import SearchConfig, arch_lr_scale, steps_per_epoch

from .accelerators import AcceleratorError, claim_accelerators, effective_precision
from .config import method_label, trial_search
from .names import COLOUR_TAG, DERIVED_TARGETS_TAG, NOTE_TAG, method_colour, mlflow_metrics, report_names
from .presentation import trial_note
from .threads import place_threads
from .tracked_run import PENDING_FILE, TrackedRun
from .tracking import environment_tags, params_of


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


def _end_run(run, status: str, out_dir: Path) -> tuple[int, Path | None]:
    """Ends the MLflow run; what the store did not take (it is unreachable) goes to a pending file."""
    if run.finish(status):
        return 0, None
    pending = out_dir / PENDING_FILE
    count = run.save_pending(pending)
    logging.getLogger(__name__).warning(
        "MLflow unreachable: %d calls saved to %s for the driver to replay", count, pending
    )
    return count, pending


def _restore_checkpoint(out_dir: Path) -> None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as saved:
        shutil.copy2(Path(saved) / CHECKPOINT, out_dir / CHECKPOINT)


def _stored_result(run) -> dict[str, Any]:
    data = run.client.get_run(run.run_id).data
    stored = report_names(data.metrics)
    result = {k: v for k, v in stored.items() if split_derived(k)[0] in FINAL_METRICS}
    if SUPERNET_ACC in result:
        result[VALID_ACC] = result[SUPERNET_ACC]
    with tempfile.TemporaryDirectory() as tmp:
        genotype = Path(run.client.download_artifacts(run.run_id, "genotype.json", tmp)).read_text()
    return {**result, "genotype": json.dumps(json.loads(genotype)), "mlflow_run_id": run.run_id, "diverged": 0.0}


def search_trial(params: dict[str, Any], settings: TrialSettings) -> None:
    started = time.perf_counter()
    overhead = 0.0  # seconds spent on tracking and reporting, not on the search (bench/sweep_overhead.py)
    # Ray logs every checkpoint it stores; the driver's progress lines say what a user needs.
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    # Fail fast on an unreachable MLflow server: TrackedRun queues and retries without blocking training.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    config = SearchConfig.resolve(file=trial_search(settings.search, params))
    try:
        claim_accelerators(settings.gpus, config.device)  # before anything initialises CUDA
        problem = None
    except AcceleratorError as err:
        problem = err  # raised once the trial's MLflow run holds it
    threads = place_threads(settings.cpus)  # the trial's share of the machine's cores
    out_dir = Path(context.get_trial_dir()) / "search"
    _restore_checkpoint(out_dir)

    run = TrackedRun(settings.tracking_uri, settings.experiment_id, settings.parent_run_id, "trial_id", trial_id)
    method = method_label(settings.method_label, config.to_dict())
    extras = {
        "method": method,
        "target": config.resolved_target().describe(),
        "trial_id": trial_id,
        "threads": threads,
        "arch_lr_scale_effective": round(arch_lr_scale(config, steps_per_epoch(config)), 6),
        **({} if problem else effective_precision(config.device, config.runtime)),
    }
    run.open(
        trial_name(method, config, trial_id),
        params_of(config.to_dict(), extras),
        {"sweep": settings.sweep, "kind": "trial", COLOUR_TAG: method_colour(method), **environment_tags()},
    )
    if problem is not None:
        run.set_tags({"failure": f"{type(problem).__name__}: {problem}"})
        _end_run(run, "FAILED", out_dir)
        raise problem
    if run.status == "FINISHED":
        # Finished before the driver lost track of it (a driver killed between two snapshots of
        # the sweep's state): report that result instead of searching again.
        _report(_stored_result(run), None)
        return
    last: dict[str, Any] = {}

    def on_epoch(event: EpochEvent) -> None:
        nonlocal overhead
        tick = time.perf_counter()
        run.log_epoch(mlflow_metrics(event.metrics, tuple(event.record["loss_terms"])), event.epoch)
        metrics = {**event.metrics, "epoch": event.epoch, "mlflow_run_id": run.run_id}
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
        run.set_tags({"failure": str(err), "diverged": "true"})
        pending, pending_file = _end_run(run, "FAILED", out_dir)
        nan = {name: math.nan for name in settings.objectives}
        report = {**nan, "diverged": 1.0, "failure": str(err), "mlflow_run_id": run.run_id, "mlflow_pending": pending}
        _report(report, None, pending_file)
        return
    except Exception as err:
        run.set_tags({"failure": f"{type(err).__name__}: {err}"})
        _end_run(run, "FAILED", out_dir)
        raise

    final = {k: v for k, v in result.metrics.items() if k in FINAL_METRICS}
    final[PARAMS] = float(derived_params(result.genotype))
    # Further targets (docs/science.md D14): the same metrics under `name@slug`.
    derived = []
    for derivation in result.derivations:
        metrics = {k: v for k, v in derivation.metrics.items() if k in FINAL_METRICS}
        metrics[PARAMS] = float(derived_params(derivation.genotype))
        derived.append((derivation.target, derivation.slug, metrics))
        final.update({derived_metric_name(k, derivation.slug): v for k, v in metrics.items()})
    final["search_seconds"] = search_seconds
    tick = time.perf_counter()
    # The last epoch already logged the supernet and discretized accuracies and the drop at this
    # step, under the same names; only what differs is logged.
    logged = mlflow_metrics(last)
    run.log_final({k: v for k, v in mlflow_metrics(final).items() if logged.get(k) != v}, config.epochs)
    run.log_artifacts(out_dir)
    cells = {level: f"cells/cell_{level}.png" for level in result.genotype.levels}
    for level, path in cells.items():  # the compare view's image grid shows the trials' cells side by side
        run.log_image(out_dir / path, f"cell_{level}", config.epochs)
    note = trial_note(
        run.run_id, method, result.info["target"], config.seed, final, result.genotype.describe(), cells, derived
    )
    tags = {"genotype": result.genotype.describe(), "target": result.info["target"], "method": method, NOTE_TAG: note}
    if derived:
        tags[DERIVED_TARGETS_TAG] = json.dumps({slug: text for text, slug, _ in derived})
    run.set_tags(tags)
    pending, pending_file = _end_run(run, "FINISHED", out_dir)
    overhead += time.perf_counter() - tick
    report = {
        **last,
        **final,
        "genotype": json.dumps(result.genotype.to_dict()),
        "diverged": 0.0,
        "mlflow_pending": pending,
        "overhead_seconds": overhead,  # without the last report's checkpoint copy
    }
    report.setdefault("mlflow_run_id", run.run_id)
    _report(report, out_dir / CHECKPOINT, pending_file)
