"""The sweep's evaluation stage: after the search trials, the derived architectures of all of them
(or of the best k) are trained from scratch, one Ray task per trial and dataset, each tracked as an
MLflow child run of its trial's run (lineage: sweep -> trial -> evaluation).

An evaluation writes a checkpoint every epoch under the sweep's directory, so a resumed sweep
continues it; one already finished is not run again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.evaluate import EvalConfig, run_evaluation
from nas.genotype import Genotype
from nas.search import EpochEvent

from .accelerators import AcceleratorError, claim_accelerators, effective_precision
from .config import SweepConfig
from .tracking import PENDING_FILE, TrackedRun, params_of

log = logging.getLogger(__name__)


@dataclass
class EvaluationJob:
    eval_id: str
    trial_id: str
    trial_run_id: str
    dataset: str
    genotype: dict[str, Any]
    settings: dict[str, Any]
    out_dir: str


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


def evaluate_one(
    job: EvaluationJob, tracking_uri: str, experiment_id: str, sweep_name: str, gpus: float = 0.0
) -> EvaluationSummary:
    """Runs inside a Ray task: one evaluation, logged to its MLflow run."""
    import json

    config = EvalConfig.resolve(job.dataset, job.settings)
    try:
        claim_accelerators(gpus, config.device)  # before anything initialises CUDA
    except AcceleratorError as err:
        return EvaluationSummary(job.eval_id, job.trial_id, job.dataset, "FAILED", {}, f"AcceleratorError: {err}")
    run = TrackedRun(tracking_uri, experiment_id, job.trial_run_id, "eval_id", job.eval_id)
    params = params_of(
        config.to_dict(), {"trial_id": job.trial_id, **effective_precision(config.device, config.runtime, "evaluate")}
    )
    run.open(
        f"eval-{job.dataset}-{job.trial_id}",
        params,
        {"kind": "evaluation", "sweep": sweep_name, "dataset": job.dataset},
    )
    if run.status == "FINISHED":
        metrics = dict(run.client.get_run(run.run_id).data.metrics)
        return EvaluationSummary(job.eval_id, job.trial_id, job.dataset, "FINISHED", metrics)

    def on_epoch(event: EpochEvent) -> None:
        run.log_epoch(event.metrics, event.epoch)

    try:
        result = run_evaluation(Genotype.from_dict(job.genotype), config, job.out_dir, callbacks=[on_epoch])
    except Exception as err:
        run.set_tags({"failure": f"{type(err).__name__}: {err}"})
        if not run.finish("FAILED"):
            run.save_pending(Path(job.out_dir) / PENDING_FILE)
        return EvaluationSummary(job.eval_id, job.trial_id, job.dataset, "FAILED", {}, f"{type(err).__name__}: {err}")
    run.log_final(result.metrics, config.epochs)
    run.set_tags({"mobile_setting_ok": str(result.info["mobile_setting_ok"]).lower()})
    run.log_artifact(Path(job.out_dir) / "result.json")
    run.log_text(json.dumps(job.genotype, indent=2), "genotype.json")
    if not run.finish("FINISHED"):
        count = run.save_pending(Path(job.out_dir) / PENDING_FILE)
        return EvaluationSummary(
            job.eval_id, job.trial_id, job.dataset, "FINISHED", result.metrics, f"{count} MLflow calls pending"
        )
    return EvaluationSummary(job.eval_id, job.trial_id, job.dataset, "FINISHED", result.metrics)


def run_evaluation_stage(
    sweep: SweepConfig, trials: list, experiment_dir: Path, tracking_uri: str, experiment_id: str
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
            out_dir=str(experiment_dir / "evaluations" / f"{t.trial_id}-{dataset}"),
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
    gpus = stage.resources.gpu
    pending = {task.remote(job, tracking_uri, experiment_id, sweep.name, gpus): job for job in jobs}
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
