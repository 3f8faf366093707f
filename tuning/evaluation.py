"""The sweep's evaluation stage: after the search trials, the derived architectures of all of them
(or of the best k) are trained from scratch, each tracked as an MLflow child run of its trial's run
(lineage: sweep -> trial -> evaluation).

An evaluation runs as one Ray task (`evaluate.resources.workers: 1`), or data-parallel on W workers
of Ray Train's TorchTrainer (DistributedDataParallel, nas/distributed.py), started from a Ray task
of its own that holds no resources. Worker 0 alone opens the MLflow run and logs, reads and writes
the checkpoint; the other workers only train.

An evaluation writes a checkpoint every epoch to the sweep's storage (directly on a filesystem;
uploaded after every epoch to an object store) before the epoch's metrics go to MLflow. A retried
task, a worker group restarted by Ray Train after a lost worker or node, or an evaluation resumed
with the sweep continues from its last epoch; an epoch whose checkpoint was saved but whose metrics
never reached MLflow has them sent from the checkpoint's history. One already finished is not run
again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from nas import metrics as m
from nas.distributed import Group
from nas.evaluate import RESUME_FREE, EvalConfig, run_evaluation
from nas.genotype import Genotype
from nas.runtime import CHECKPOINT, RESULT, Diverged, EpochEvent, load_checkpoint

from .accelerators import AcceleratorError, effective_precision
from .config import EvalResourcesConfig, SweepConfig
from .job import TrackedJob, TrialOutcome, faults
from .names import EVAL_METRIC_NAMES, eval_mlflow_metrics, eval_report_names
from .storage import Storage
from .tracked_run import PENDING_FILE
from .tracking import client_for, find_run, params_of

log = logging.getLogger(__name__)
# The metric whose MLflow history says which epochs reached the store.
EPOCH_MARKER = EVAL_METRIC_NAMES[m.TEST_TOP1_ERROR]


@dataclass
class EvaluationJob:
    eval_id: str
    trial_id: str
    trial_run_id: str
    dataset: str
    genotype: dict[str, Any]
    settings: dict[str, Any]
    store: Storage  # the evaluation's directory on the sweep's storage
    tracking_uri: str
    experiment_id: str
    sweep: str
    resources: EvalResourcesConfig
    faults: str = ""  # faults to inject (tuning/job.py), from the driver's NAS_FAULT


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
    done = [t for t in trials if t.status == "TERMINATED" and TrialOutcome.read(t.metrics).genotype is not None]
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


def _epoch_mlflow_metrics(record: dict[str, Any]) -> dict[str, float]:
    """An epoch of a checkpoint's history as its MLflow metrics, as on_epoch logged them."""
    return eval_mlflow_metrics({k: v for k, v in record.items() if k != "epoch"})


def _evaluate(job: EvaluationJob, out_dir: Path | None) -> EvaluationSummary:
    """One evaluation on this process: the whole of it, or this worker's share of a data-parallel
    one (worker 0 with `out_dir`, the others with None). Every worker returns the same summary; a
    divergence is the evaluation's result (DIVERGED), as a search's is."""
    group = Group.current()
    config = EvalConfig.resolve(job.dataset, job.settings)

    def summary(status: str, metrics: dict[str, float], error: str | None = None) -> EvaluationSummary:
        return EvaluationSummary(job.eval_id, job.trial_id, job.dataset, status, metrics, error)

    def keep_pending(path: Path) -> None:  # in the storage, where the driver replays it
        if job.store.local_path is None:
            (job.store / PENDING_FILE).upload(path)

    tracked = TrackedJob("evaluation", "eval_id", job.eval_id, job.tracking_uri, job.experiment_id,
                         job.trial_run_id, out_dir or Path("."), keep_pending, marker=EPOCH_MARKER,
                         faults=job.faults)  # fmt: skip
    threads = tracked.claim(job.resources.gpu, job.resources.cpu, config.device)
    problem = next((p for p in group.gather(str(tracked.problem) if tracked.problem else None) if p), None)
    tracked.problem = tracked.problem or (AcceleratorError(problem) if problem else None)
    finished = None
    if group.leader:
        extras = {
            "trial_id": job.trial_id,
            "threads": threads,
            "world_size": group.world,
            "global_batch": config.batch_size,
            "batch_per_worker": round(config.batch_size / group.world, 3),
            "lr_effective": config.peak_lr(),
            "sync_bn_effective": config.synchronised_bn(group.world),
            **({} if problem else effective_precision(config.device, config.runtime, "evaluate")),
        }
        tags = {"sweep": job.sweep, "dataset": job.dataset}
        try:
            if tracked.open(f"eval-{job.dataset}-{job.trial_id}", params_of(config.to_dict(), extras), tags):
                finished = eval_report_names(tracked.run.client.get_run(tracked.run_id).data.metrics)
            elif (out_dir / CHECKPOINT).exists():  # epochs whose checkpoint was stored but metrics lost
                tracked.resend(load_checkpoint(out_dir / CHECKPOINT)["history"], _epoch_mlflow_metrics)
        except AcceleratorError:
            pass  # its run holds the reason; every worker returns it below
    if problem:
        return summary("FAILED", {}, f"AcceleratorError: {problem}")
    finished = group.broadcast(finished)
    if finished is not None:
        return summary("FINISHED", finished)

    last: dict[str, float] = {}

    def on_epoch(event: EpochEvent) -> None:  # worker 0: the checkpoint is durable before the metrics go
        if job.store.local_path is None and event.checkpoint_path is not None:
            (job.store / CHECKPOINT).upload(event.checkpoint_path)
        logged = eval_mlflow_metrics(event.metrics)
        tracked.epoch(logged, event.epoch)
        last.clear()
        last.update(logged)

    try:
        result = run_evaluation(Genotype.from_dict(job.genotype), config, out_dir, callbacks=[on_epoch])
    except Exception as err:
        diverged = isinstance(err, Diverged)
        if group.leader:
            tracked.fail(err, diverged)
        return summary(
            "DIVERGED" if diverged else "FAILED", {}, str(err) if diverged else f"{type(err).__name__}: {err}"
        )
    if not group.leader:
        return summary("FINISHED", result.metrics)
    # The last epoch already logged its test errors at this step, with these values.
    final = {k: v for k, v in eval_mlflow_metrics(result.metrics).items() if last.get(k) != v}
    tracked.run.log_final(final, config.epochs)
    if job.store.local_path is None:
        (job.store / RESULT).upload(out_dir / RESULT)
    tracked.run.log_text((out_dir / RESULT).read_text(), RESULT)  # the node's copy may be gone when a replay sends it
    tracked.run.log_text(json.dumps(job.genotype, indent=2), "genotype.json")
    pending = tracked.finish({"mobile_setting_ok": str(result.info["mobile_setting_ok"]).lower()})
    return summary("FINISHED", result.metrics, f"{pending} MLflow calls pending" if pending else None)


def evaluate_one(job: EvaluationJob) -> EvaluationSummary:
    """Inside a Ray task that reserved the job's CPUs and GPUs: one evaluation in this process."""
    with _working_dir(job.store) as out_dir:
        return _evaluate(job, out_dir)


def _train_worker(loop: dict[str, Any]) -> EvaluationSummary:
    """One worker of a data-parallel evaluation, inside Ray Train (the process group is set up)."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # `cuda` is this worker's GPU, for the model and the collectives
    job: EvaluationJob = loop["job"]
    if not Group.current().leader:
        return _evaluate(job, None)
    with _working_dir(job.store) as out_dir:
        return _evaluate(job, out_dir)


def evaluate_distributed(job: EvaluationJob, max_failures: int) -> EvaluationSummary:
    """Inside a Ray task that holds no resources: the job on `job.resources.workers` workers of a
    TorchTrainer; a lost worker or node restarts the group (`max_failures` times) from the last
    checkpoint, as soon as the cluster again has room for every worker."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    # Workers run in this task's working directory, as a one-process evaluation does (relative data
    # paths mean the same); read when the trainer is built.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    resources = job.resources
    path, filesystem = job.store.ray_storage()
    trainer = _Trainer(
        _train_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if resources.gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.gpu > 0,
            resources_per_worker={"CPU": resources.cpu, **({"GPU": resources.gpu} if resources.gpu else {})},
        ),
        run_config=RunConfig(
            name="train",
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    try:
        return trainer.fit().return_value
    except Exception as err:  # the group failed more often than it may be restarted
        text = str(err).strip().splitlines()
        return EvaluationSummary(job.eval_id, job.trial_id, job.dataset, "FAILED", {}, text[-1] if text else repr(err))


class _Trainer(TorchTrainer):
    """Ray Train's TorchTrainer without its placement-group cleaner: that helper asks the state API,
    which needs Ray's dashboard, whether the trainer's controller lives; a cluster started without
    the dashboard (a sweep's own local Ray) answers "unknown" every second, or "dead" when another Ray
    instance on the machine has one. The worker group's placement group belongs to the controller
    and goes with it anyway."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]


def run_evaluation_stage(
    sweep: SweepConfig, trials: list, experiment_dir: Storage, tracking_uri: str, experiment_id: str
) -> list[EvaluationSummary]:
    stage = sweep.evaluate
    jobs = [
        EvaluationJob(
            eval_id=eval_id,
            trial_id=t.trial_id,
            trial_run_id=TrialOutcome.read(t.metrics).run_id,
            dataset=dataset,
            genotype=json.loads(TrialOutcome.read(t.metrics).genotype),
            settings=stage.settings if seed is None else {**stage.settings, "seed": seed},
            store=experiment_dir / "evaluations" / eval_id,
            tracking_uri=tracking_uri,
            experiment_id=experiment_id,
            sweep=sweep.name,
            resources=stage.resources,
            faults=faults(),
        )
        for t in select_trials(sweep, trials)
        for dataset in stage.datasets
        for seed in stage.training_seeds()
        for eval_id in [f"{t.trial_id}-{dataset}" + ("" if seed is None else f"-seed{seed}")]
    ]
    if not jobs:
        return []
    log.info(
        "evaluation stage: %d evaluations (%s)%s", len(jobs), ", ".join(j.eval_id for j in jobs),
        f", each on {stage.resources.workers} data-parallel workers" if stage.resources.workers > 1 else "",
    )  # fmt: skip
    return run_jobs(jobs, sweep.max_failures)


def existing_run(job: EvaluationJob):
    """The job's MLflow run from an earlier start, if any."""
    return find_run(client_for(job.tracking_uri), job.experiment_id, {"eval_id": job.eval_id})


def changed_settings_of(job: EvaluationJob, run) -> list[str]:
    """The protocol settings in which `run` (an earlier start of the job) differs from the job."""
    config = EvalConfig.resolve(job.dataset, job.settings)
    logged = params_of(config.to_dict())
    return sorted(k for k, v in logged.items() if k not in RESUME_FREE and run.data.params.get(k, v) != v)


def run_jobs(jobs: list[EvaluationJob], max_failures: int) -> list[EvaluationSummary]:
    """Every job on the Ray cluster this driver is connected to, as many at once as it holds; a task
    (or worker group) whose process dies is retried `max_failures` times. A job whose run finished
    before (a resumed sweep) is not started again."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    pending, summaries = {}, []
    for job in jobs:
        earlier = existing_run(job)
        if earlier is not None and earlier.info.status == "FINISHED":
            summaries.append(
                EvaluationSummary(
                    job.eval_id, job.trial_id, job.dataset, "FINISHED", eval_report_names(earlier.data.metrics)
                )
            )
            continue
        resources = job.resources
        if resources.workers > 1:
            # The launching task holds nothing and stays on the driver's node where it can: the
            # workers are the trainer's.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            task = ray.remote(num_cpus=0, max_retries=max_failures, scheduling_strategy=here)(evaluate_distributed)
            pending[task.remote(job, max_failures)] = job
        else:
            task = ray.remote(num_cpus=resources.cpu, num_gpus=resources.gpu, max_retries=max_failures)(evaluate_one)
            pending[task.remote(job)] = job
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=60)
        if not ready:
            log.info("evaluations: %d running or waiting for a node", len(pending))
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
                summary.eval_id, summary.metrics.get(m.TEST_TOP1_ERROR, math.nan), summary.metrics.get(m.TEST_TOP5_ERROR, math.nan),
            )  # fmt: skip
        else:
            log.warning("evaluation %s failed: %s", summary.eval_id, summary.error)
    return summaries
