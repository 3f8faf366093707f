"""The sweep's evaluation stage: after the search trials, the derived architectures of all of them
(or of the best k) are trained from scratch, one Ray task per trial and dataset, each tracked as an
MLflow child run of its trial's run (lineage: sweep -> trial -> evaluation).

An evaluation writes a checkpoint every epoch to the sweep's storage (directly on a filesystem;
uploaded after every epoch to an object store), so an evaluation retried on another node, or
resumed with the sweep, continues from its last epoch; one already finished is not run again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.evaluate import CHECKPOINT, RESULT, EvalConfig, run_evaluation
from nas.genotype import Genotype
from nas.runtime import EpochEvent

from .accelerators import AcceleratorError, claim_accelerators, effective_precision
from .config import SweepConfig
from .storage import Storage
from .threads import place_threads
from .tracking import PENDING_FILE, TrackedRun, environment_tags, params_of

log = logging.getLogger(__name__)


@dataclass
class EvaluationJob:
    eval_id: str
    trial_id: str
    trial_run_id: str
    dataset: str
    genotype: dict[str, Any]
    settings: dict[str, Any]
    store: Storage  # the evaluation's directory on the sweep's storage


@dataclass
class EvaluationSummary:
    eval_id: str
    trial_id: str
    dataset: str
    status: str
    metrics: dict[str, float]
    error: str | None = None


def select_trials(sweep: SweepConfig, trials: list) -> list:
    """Finished, non-diverged trials with a genotype; the best `top` by `by` if set."""
    stage = sweep.evaluate
    done = [t for t in trials if t.status == "TERMINATED" and "genotype" in t.metrics and "mlflow_run_id" in t.metrics]
    done = [
        t for t in done if isinstance(t.metrics.get(stage.by), (int, float)) and not math.isnan(t.metrics[stage.by])
    ]
    done.sort(key=lambda t: t.metrics[stage.by], reverse=stage.mode == "max")
    return done[: stage.top] if stage.top else done


@contextlib.contextmanager
def _working_dir(store: Storage) -> Iterator[Path]:
    """The evaluation's directory on this node: the storage itself on a filesystem; for an object
    store, a local copy of its checkpoint and result, removed afterwards."""
    if store.local_path is not None:
        store.local_path.mkdir(parents=True, exist_ok=True)
        yield store.local_path
        return
    local = Path(tempfile.mkdtemp(prefix="evaluation-"))
    try:
        for name in (CHECKPOINT, RESULT):
            (store / name).download(local / name)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _save_pending(run: TrackedRun, store: Storage, out_dir: Path) -> int:
    """What MLflow did not take, to the storage, where the driver replays it."""
    count = run.save_pending(out_dir / PENDING_FILE)
    if count and store.local_path is None:
        (store / PENDING_FILE).upload(out_dir / PENDING_FILE)
    return count


def evaluate_one(
    job: EvaluationJob, tracking_uri: str, experiment_id: str, sweep_name: str, gpus: float = 0.0, cpus: float = 1.0
) -> EvaluationSummary:
    """Runs inside a Ray task that reserved `cpus` CPUs and `gpus` GPUs: one evaluation, logged to
    its MLflow run."""
    with _working_dir(job.store) as out_dir:
        return _evaluate(job, tracking_uri, experiment_id, sweep_name, gpus, cpus, out_dir)


def _evaluate(
    job: EvaluationJob,
    tracking_uri: str,
    experiment_id: str,
    sweep_name: str,
    gpus: float,
    cpus: float,
    out_dir: Path,
) -> EvaluationSummary:
    import json

    config = EvalConfig.resolve(job.dataset, job.settings)
    try:
        claim_accelerators(gpus, config.device)  # before anything initialises CUDA
    except AcceleratorError as err:
        return EvaluationSummary(job.eval_id, job.trial_id, job.dataset, "FAILED", {}, f"AcceleratorError: {err}")
    threads = place_threads(cpus)  # the task's share of the node's cores, as a search trial's
    run = TrackedRun(tracking_uri, experiment_id, job.trial_run_id, "eval_id", job.eval_id)
    extras = {
        "trial_id": job.trial_id,
        "threads": threads,
        **effective_precision(config.device, config.runtime, "evaluate"),
    }
    params = params_of(config.to_dict(), extras)
    run.open(
        f"eval-{job.dataset}-{job.trial_id}",
        params,
        {"kind": "evaluation", "sweep": sweep_name, "dataset": job.dataset, **environment_tags()},
    )
    if run.status == "FINISHED":
        metrics = dict(run.client.get_run(run.run_id).data.metrics)
        return EvaluationSummary(job.eval_id, job.trial_id, job.dataset, "FINISHED", metrics)

    last: dict[str, float] = {}

    def on_epoch(event: EpochEvent) -> None:
        run.log_epoch(event.metrics, event.epoch)
        last.clear()
        last.update(event.metrics)
        if job.store.local_path is None and event.checkpoint_path is not None:
            (job.store / CHECKPOINT).upload(event.checkpoint_path)

    try:
        result = run_evaluation(Genotype.from_dict(job.genotype), config, out_dir, callbacks=[on_epoch])
    except Exception as err:
        run.set_tags({"failure": f"{type(err).__name__}: {err}"})
        if not run.finish("FAILED"):
            _save_pending(run, job.store, out_dir)
        return EvaluationSummary(job.eval_id, job.trial_id, job.dataset, "FAILED", {}, f"{type(err).__name__}: {err}")
    # The last epoch already logged its test errors at this step, with these values.
    run.log_final({k: v for k, v in result.metrics.items() if last.get(k) != v}, config.epochs)
    run.set_tags({"mobile_setting_ok": str(result.info["mobile_setting_ok"]).lower()})
    if job.store.local_path is None:
        (job.store / RESULT).upload(out_dir / RESULT)
    run.log_text((out_dir / RESULT).read_text(), RESULT)  # the node's copy may be gone when a replay sends it
    run.log_text(json.dumps(job.genotype, indent=2), "genotype.json")
    if not run.finish("FINISHED"):
        count = _save_pending(run, job.store, out_dir)
        return EvaluationSummary(
            job.eval_id, job.trial_id, job.dataset, "FINISHED", result.metrics, f"{count} MLflow calls pending"
        )
    return EvaluationSummary(job.eval_id, job.trial_id, job.dataset, "FINISHED", result.metrics)


def run_evaluation_stage(
    sweep: SweepConfig, trials: list, experiment_dir: Storage, tracking_uri: str, experiment_id: str
) -> list[EvaluationSummary]:
    import json

    import ray

    stage = sweep.evaluate
    chosen = select_trials(sweep, trials)
    jobs = [
        EvaluationJob(
            eval_id=f"{t.trial_id}-{dataset}",
            trial_id=t.trial_id,
            trial_run_id=t.metrics["mlflow_run_id"],
            dataset=dataset,
            genotype=json.loads(t.metrics["genotype"]),
            settings=stage.settings,
            store=experiment_dir / "evaluations" / f"{t.trial_id}-{dataset}",
        )
        for t in chosen
        for dataset in stage.datasets
    ]
    if not jobs:
        return []
    log.info("evaluation stage: %d evaluations (%s)", len(jobs), ", ".join(j.eval_id for j in jobs))
    task = ray.remote(num_cpus=stage.resources.cpu, num_gpus=stage.resources.gpu, max_retries=sweep.max_failures)(
        evaluate_one
    )
    gpus, cpus = stage.resources.gpu, stage.resources.cpu
    pending = {task.remote(job, tracking_uri, experiment_id, sweep.name, gpus, cpus): job for job in jobs}
    summaries = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=60)
        if not ready:
            log.info("evaluation stage: %d evaluations running or waiting for a node", len(pending))
            continue
        job = pending.pop(ready[0])
        try:
            summary = ray.get(ready[0])
        except Exception as err:  # the task's process died more often than retried
            summary = EvaluationSummary(job.eval_id, job.trial_id, job.dataset, "FAILED", {}, str(err).splitlines()[0])
        summaries.append(summary)
        if summary.status == "FINISHED":
            log.info(
                "evaluated %s: test error %.2f%% (top-5 %.2f%%)",
                summary.eval_id, summary.metrics.get("test_top1_error", math.nan), summary.metrics.get("test_top5_error", math.nan),
            )  # fmt: skip
        else:
            log.warning("evaluation %s failed: %s", summary.eval_id, summary.error)
    return summaries
