"""Builds and runs a sweep: Optuna proposes, Ray Tune runs one search per trial, MLflow tracks.

Order of a run: every check that can fail (the sweep's settings, the data, the output location,
the GPUs the trials ask for) happens before the first trial starts; then the sweep's parent run in
MLflow, then the Tuner. `--resume` restores the Tuner (and with it Optuna's study and sampler)
from the sweep's directory and finishes it without repeating finished trials.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter

from nas.data import resolve_root

from . import preflight, recovery
from .callbacks import ProgressPrinter, RunFinalizer, StorageWatch, drop_cut_errors
from .config import SweepConfig
from .driver_lock import DriverLock
from .evaluation import run_evaluation_stage
from .job import TrialOutcome, faults
from .presentation import present_experiment
from .space import make_searcher
from .storage import Storage, open_storage
from .summary import present_summary
from .tracking import (
    client_for,
    ensure_experiment,
    local_artifact_root,
    log_metrics,
    resolve_tracking_uri,
    retrying,
)
from .trainable import TrialSettings, search_trial

log = logging.getLogger(__name__)


@dataclass
class TrialSummary:
    trial_id: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None = None


@dataclass
class SweepOutcome:
    name: str
    experiment_dir: Storage  # the sweep's directory on its storage (str() gives its path or URI)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trials: list[TrialSummary] = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    interrupted: bool = False
    stopped: str | None = None  # why the sweep stopped before its end (its storage full), if it did
    finished_already: str | None = None  # a --resume of a sweep with nothing left: why
    # MLflow calls that could not be sent (server unreachable): (pending file, count)
    pending: list = field(default_factory=list)


def _open_storage(sweep: SweepConfig, base: Path) -> Storage:
    options = sweep.storage_options
    return open_storage(sweep.storage, base, options.endpoint, options.region)


def _resolved_search(sweep: SweepConfig, base: Path) -> dict[str, Any]:
    """The fixed settings with the data root made absolute (trials run in their own directories)."""
    search = copy.deepcopy(sweep.search)
    data = sweep.base_search().data
    if data.dataset == "cifar10":
        search.setdefault("data", {})["root"] = str((base / resolve_root(data.root)).resolve())
    return search


def _init_ray(address: str | None) -> None:
    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Objectives such as `params` or `drop_bn_recal` exist only in a trial's final result; the
    # searcher (SweepSearch) reads final results only, so per-epoch results need not carry them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if ray.is_initialized():
        return
    # Workers import this project from where the driver found it, installed or not (on a cluster
    # every node has the checkout at the same path).
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
    sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        resolved = preflight.resolve_address(address)
        preflight.check_reachable(address, resolved)
        ray.init(address=resolved, log_to_driver=True, runtime_env=runtime_env)
    else:
        # A new private single-node instance on loopback, without the dashboard: "local", never a
        # cluster recorded in Ray's temp folder (which may be gone, and would then stall ray.init).
        _keep_ray_on_loopback()
        ray.init(
            address="local",
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            runtime_env=runtime_env,
        )
    if sigterm is _sigterm_as_sigint:
        signal.signal(signal.SIGTERM, sigterm)  # ray.init replaces it with an exit


def _keep_ray_on_loopback() -> None:
    """Make a local Ray instance advertise, and so bind its servers to, 127.0.0.1 only.

    On Linux, Ray replaces a `_node_ip_address` of 127.0.0.1 with the address of the machine's
    outward interface and its gRPC servers then listen on every interface. Ray's switch for
    single-machine mode (named for Windows and macOS, where it is the default) keeps the node on
    loopback. The environment variable reaches the processes Ray starts; the constant covers a
    driver that imported Ray before this call.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def run_sweep(
    sweep: SweepConfig,
    *,
    resume: bool = False,
    address: str | None = None,
    base_dir: str | os.PathLike | None = None,
    cluster_config: str | None = None,
) -> SweepOutcome:
    base = Path(base_dir or os.getcwd()).resolve()
    # MLflow's HTTP client retries a failing call for minutes by default, which would stall Tune's
    # event loop in a callback while a server restarts; calls here retry on their own terms.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    storage = _open_storage(sweep, base)
    experiment_dir = storage / sweep.name
    search = _resolved_search(sweep, base)
    preflight.check_before_ray(sweep, base, storage, experiment_dir, search, resume, local=address is None)
    faults()  # a fault to inject that is misspelt is refused here, not ignored
    lock = DriverLock(experiment_dir)  # one driver per sweep, here or on another machine
    lock.acquire("--resume" if resume else "name")
    try:
        tracking_uri = resolve_tracking_uri(sweep.mlflow.tracking_uri, base)
        done = recovery.finished_already(experiment_dir, tracking_uri, sweep.name) if resume else None
        if done is not None:
            return SweepOutcome(sweep.name, experiment_dir, tracking_uri, "", "", finished_already=done)
        return _drive(sweep, resume, address, base, cluster_config, storage, experiment_dir, search)
    finally:
        lock.release()


def _drive(
    sweep: SweepConfig, resume: bool, address: str | None, base: Path, cluster_config: str | None, storage: Storage,
    experiment_dir: Storage, search: dict[str, Any],
) -> SweepOutcome:  # fmt: skip
    """The sweep, once its checks passed and this driver holds its lock: Ray, MLflow, the trials,
    the evaluation stage and the end."""
    tracking_uri = resolve_tracking_uri(sweep.mlflow.tracking_uri, base)
    _init_ray(address)
    preflight.check_on_ray(sweep, storage, cluster_config, address)

    client = client_for(tracking_uri)
    experiment_id = ensure_experiment(client, sweep.mlflow.experiment or sweep.name, local_artifact_root(tracking_uri))
    parent_run_id = recovery.parent_run(client, experiment_id, sweep, experiment_dir, resume)
    present_experiment(client, experiment_id, sweep, parent_run_id)
    settings = TrialSettings(
        sweep=sweep.name, search=search, tracking_uri=tracking_uri, experiment_id=experiment_id,
        parent_run_id=parent_run_id, objectives=tuple(o.metric for o in sweep.objectives()), cpus=sweep.resources.cpu,
        method_label=sweep.method_label, gpus=sweep.resources.gpu, faults=faults(),
    )  # fmt: skip
    trainable = tune.with_resources(
        tune.with_parameters(search_trial, settings=settings),
        {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu},
    )

    if resume:
        recovery.prepare_resume(client, experiment_id, sweep, base, experiment_dir)
        if experiment_dir.local_path is not None:
            drop_cut_errors(experiment_dir.local_path)  # left by a full disk before the last stop
    # A storage that fills up stops the sweep (a filesystem; object stores do not fill up).
    watch = StorageWatch(experiment_dir.local_path) if experiment_dir.local_path is not None else None
    try:
        if resume:
            path, filesystem = experiment_dir.ray_storage()
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem)
        else:
            tuner = _new_tuner(sweep, trainable, base, storage, experiment_dir, tracking_uri, experiment_id, watch)
        results = tuner.fit()
    except KeyboardInterrupt:
        results = None
    except Exception:
        if watch is None or watch.problem is None:
            raise
        results = None  # Ray's results unreadable on a full disk: the sweep stops as below
    outcome = SweepOutcome(
        sweep.name, experiment_dir, tracking_uri, experiment_id, parent_run_id, interrupted=results is None
    )
    if watch is not None and watch.problem is not None:
        outcome.stopped = f"its storage {experiment_dir} {watch.problem}"
        outcome.interrupted = True
        drop_cut_errors(watch.directory)
    if results is not None:
        outcome.trials = [_trial_summary(result) for result in results]
        # Ray Tune ends fit() without an exception on Ctrl-C / SIGTERM and reports the trials it
        # stopped or never started as TERMINATED: those lack the final result (the genotype).
        unfinished = [t for t in outcome.trials if not _finished(t, sweep)]
        for trial in unfinished:
            trial.status = "INTERRUPTED"  # its values are its last epoch's, not a result
        outcome.interrupted = bool(unfinished) or len(outcome.trials) < (sweep.num_samples or 0)
    if not outcome.interrupted and sweep.evaluate is not None:
        try:
            outcome.evaluations = run_evaluation_stage(
                sweep, outcome.trials, experiment_dir, tracking_uri, experiment_id
            )
        except KeyboardInterrupt:
            outcome.interrupted = True
    _close(client, sweep, base, outcome)
    return outcome


def _close(client, sweep: SweepConfig, base: Path, outcome: SweepOutcome) -> None:
    """The sweep's MLflow run at the end: KILLED if interrupted; else its trials' runs reconciled, the
    best objectives and the report on it, FINISHED."""
    if outcome.interrupted:
        recovery.close_interrupted(client, outcome.experiment_id, sweep.name, outcome.parent_run_id)
        return
    outcome.pending = recovery.reconcile_finished(client, outcome.experiment_id, sweep, base, outcome.experiment_dir)
    _summarise(client, outcome.parent_run_id, sweep, outcome)
    try:
        present_summary(client, outcome.tracking_uri, sweep, outcome.parent_run_id)
    except Exception as err:  # a summary that cannot be drawn must not fail a finished sweep
        log.warning("MLflow: the sweep's summary could not be written (%s)", err)
    if "interrupted" in retrying(lambda: client.get_run(outcome.parent_run_id), "read sweep run").data.tags:
        # interrupted once, finished now: the tag said how to go on, which is no longer true
        retrying(lambda: client.delete_tag(outcome.parent_run_id, "interrupted"), "untag sweep run")
    retrying(lambda: client.set_terminated(outcome.parent_run_id, "FINISHED"), "end sweep run")


def _new_tuner(
    sweep: SweepConfig, trainable, base: Path, storage: Storage, experiment_dir: Storage, tracking_uri: str,
    experiment_id: str, watch: StorageWatch | None,
) -> tune.Tuner:  # fmt: skip
    """The Tuner of a new sweep: Optuna's study as searcher, the scheduler, storage and callbacks."""
    # The study lives in a journal file beside Ray's state: always current (Ray snapshots the
    # searcher only now and then, not after the last result).
    journal = recovery.journal_path(sweep, base, experiment_dir)
    mirror = None if experiment_dir.local_path is not None else experiment_dir / recovery.OPTUNA_JOURNAL
    searcher = make_searcher(sweep, journal, mirror)
    epochs = sweep.max_epochs()
    if sweep.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            metric=sweep.scheduler.metric,
            mode=sweep.scheduler.mode,
            max_t=epochs,
            grace_period=min(sweep.scheduler.grace_period, epochs),
            reduction_factor=sweep.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    storage_path, storage_filesystem = storage.ray_storage()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=sweep.concurrency),
            scheduler=scheduler,
            num_samples=sweep.num_samples,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[
                RunFinalizer(tracking_uri, experiment_id),
                ProgressPrinter(lambda config: sweep.resolve_trial(config).epochs),
                preflight.WaitingTrials({"CPU": sweep.resources.cpu, "GPU": sweep.resources.gpu}),
                *([watch] if watch is not None else []),
            ],
            # Ray's own status table stays off: ProgressPrinter reports what matters here.
            verbose=0,
        ),
    )


def _trial_summary(result) -> TrialSummary:
    outcome = TrialOutcome.read(result.metrics)
    status = "ERROR" if result.error else ("DIVERGED" if outcome.diverged else "TERMINATED")
    trial_id = result.metrics.get("trial_id") or Path(result.path).name
    error = str(result.error).strip().splitlines()[-1] if result.error else outcome.failure
    return TrialSummary(trial_id, status, dict(result.config or {}), dict(result.metrics), error)


def _finished(trial: TrialSummary, sweep: SweepConfig) -> bool:
    """Whether the trial reached an end: its final result, an error, a divergence, or (with a
    scheduler) an early stop after reporting. A trial interrupted by the scheduler-less sweep's
    stop, or one that never reported, did not."""
    if trial.status != "TERMINATED" or TrialOutcome.read(trial.metrics).genotype is not None:
        return True
    return sweep.scheduler.type != "none" and "training_iteration" in trial.metrics


def _summarise(client, parent_run_id: str, sweep: SweepConfig, outcome: SweepOutcome) -> None:
    """Best objective values as metrics of the sweep's parent run."""
    best: dict[str, float] = {}
    for objective in sweep.objectives():
        values = [t.metrics.get(objective.metric) for t in outcome.trials]
        values = [float(v) for v in values if isinstance(v, (int, float)) and v == v]
        if values:
            best[f"best_{objective.metric}"] = max(values) if objective.mode == "max" else min(values)
    best["trials_finished"] = float(sum(t.status == "TERMINATED" for t in outcome.trials))
    best["trials_failed"] = float(sum(t.status in ("ERROR", "DIVERGED") for t in outcome.trials))
    best["trials_interrupted"] = float(sum(t.status == "INTERRUPTED" for t in outcome.trials))
    log_metrics(client, parent_run_id, best, 0)


def _sigterm_as_sigint(signum, frame) -> None:
    os.kill(os.getpid(), signal.SIGINT)


def install_sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C (a scheduler's stop, `kill`), so that a stopped driver saves the
    sweep's state the same way and `--resume` finishes it: SIGTERM is passed on as SIGINT, to
    whichever handler has it at the time (Tune's, which stops the trials and saves the state, or
    Python's KeyboardInterrupt). Kept across ray.init, which would otherwise exit on SIGTERM."""
    signal.signal(signal.SIGTERM, _sigterm_as_sigint)
