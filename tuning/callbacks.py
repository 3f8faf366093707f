"""The driver's Ray Tune callbacks: the MLflow runs their trials could not end (RunFinalizer), one
progress line per trial event (ProgressPrinter), and the storage watched for space (StorageWatch).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from ray import tune

from nas import metrics as m

from .job import TrialOutcome
from .names import FAILURE_TAG
from .tracking import client_for, find_run

log = logging.getLogger(__name__)


class RunFinalizer(tune.Callback):
    """Driver side: ends the MLflow runs that their trials could not end themselves."""

    def __init__(self, tracking_uri: str, experiment_id: str):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id

    def _run(self, trial):
        client = client_for(self.tracking_uri)
        return client, find_run(client, self.experiment_id, {"trial_id": trial.trial_id})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED", {"early_stopped": "true"}, only_if_unfinished=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED", {FAILURE_TAG: _error_text(trial)[:5000]})

    def _end(self, trial, status: str, tags: dict[str, str], only_if_unfinished: bool = False) -> None:
        # Best effort: the sweep must go on while MLflow is away; the end of the sweep reconciles.
        try:
            client, run = self._run(trial)
            if run is None or run.info.status != "RUNNING":
                return
            if only_if_unfinished and TrialOutcome.read(trial.last_result).pending:
                return  # the trial finished; its last calls wait in a pending file
            for k, v in tags.items():
                client.set_tag(run.info.run_id, k, v)
            client.set_terminated(run.info.run_id, status)
        except Exception as err:
            log.warning("MLflow: could not end the run of trial %s now (%s); the sweep's end will", trial.trial_id, err)


class ProgressPrinter(tune.Callback):
    """One line per trial event on the driver's log: start, each epoch, end, failure, retry."""

    def __init__(self, epochs_of: Callable[[dict], int]):
        """`epochs_of(config)`: the number of epochs of the trial with that config (a space may
        choose `epochs` per trial)."""
        self.epochs_of = epochs_of
        self._epochs: dict[str, int] = {}

    def _total(self, trial) -> int:
        if trial.trial_id not in self._epochs:
            self._epochs[trial.trial_id] = self.epochs_of(dict(trial.config or {}))
        return self._epochs[trial.trial_id]

    @staticmethod
    def _name(trial) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in (trial.config or {}).items())
        return f"{trial.trial_id} ({settings})"

    def on_trial_start(self, iteration, trials, trial, **info):
        log.info("started   %s", self._name(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result and m.VALID_ACC in result:
            log.info(
                "%s epoch %d/%d: supernet %.2f%%, discretized %.2f%% (%.0fs)",
                trial.trial_id, result["epoch"], self._total(trial), result[m.VALID_ACC],
                result.get(m.DISCRETIZED_ACC, float("nan")), result.get(m.SECONDS, float("nan")),
            )  # fmt: skip

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        outcome = TrialOutcome.read(result)
        if outcome.diverged:
            log.warning("diverged  %s: %s", self._name(trial), outcome.failure)
        elif m.SUPERNET_ACC in result:
            log.info(
                "finished  %s: supernet %.2f%%, discretized %.2f%%, drop %.2f",
                self._name(trial), result[m.SUPERNET_ACC], result[m.DISCRETIZED_ACC], result[m.DROP],
            )  # fmt: skip
        else:
            log.info("stopped   %s by the scheduler", self._name(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        log.warning("failed    %s: %s", self._name(trial), _error_text(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        log.warning("retrying  %s from its last checkpoint: its process failed", self._name(trial))


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        lines = Path(path).read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "trial failed"
    return "the trial's process failed"


class StorageWatch(tune.Callback):
    """The sweep's directory on a filesystem (a local disk, NFS), checked after every trial failure:
    one may have come from the storage (a full disk, a quota, a filesystem turned read-only). The
    check writes a 1 MiB file there and compares the free space with two of the largest checkpoints
    written so far; if the storage cannot take a checkpoint, the sweep stops as on Ctrl-C (Ray
    Tune's SIGUSR1: its state saved, its trials resumable), the driver says why, and `--resume`
    once there is room finishes it. Nothing already written is touched.

    The state is kept per sweep directory at module level, so that the instance Ray Tune restores
    from a resumed sweep's state and the driver's see the same."""

    PROBE_BYTES = 1 << 20
    problems: dict[str, str] = {}  # noqa: RUF012 (shared on purpose, see above)

    CHECK_SECONDS = 10.0

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._last_result_check = float("-inf")

    def __setstate__(self, state):  # restored from an older sweep's state
        self.__dict__.update(state)
        self.__dict__.setdefault("_last_result_check", float("-inf"))

    @property
    def problem(self) -> str | None:
        return self.problems.get(str(self.directory))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # Between failures, the free space alone (no write), at most every CHECK_SECONDS: a disk
        # filling up stops the sweep while Ray's state can still be saved whole.
        now = time.monotonic()
        if now - self._last_result_check >= self.CHECK_SECONDS:
            self._last_result_check = now
            self._check(probe=False)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._check()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._check()

    def _check(self, probe: bool = True) -> None:
        if self.problem is not None:
            return
        problem = self.space_problem(probe)
        if problem is not None:
            self.problems[str(self.directory)] = problem
            log.error("the sweep stops: its storage %s %s", self.directory, problem)
            os.kill(os.getpid(), signal.SIGUSR1)  # Ray Tune's own "stop and save the state"

    def space_problem(self, probe: bool = True) -> str | None:
        """Why the storage cannot take another checkpoint and Ray's state, or None if it can.
        `probe`: also write (and remove) a 1 MiB file there."""
        if probe:
            path = self.directory / f".space-check-{os.getpid()}"
            try:
                path.write_bytes(bytes(self.PROBE_BYTES))
            except OSError as err:
                return f"cannot be written ({err.strerror or err})"
            finally:
                path.unlink(missing_ok=True)
        try:
            checkpoint = max((p.stat().st_size for p in self.directory.glob("*/checkpoint_*/*.pt")), default=0)
            state = sum(p.stat().st_size for p in self.directory.glob("experiment_state-*.json"))
            free = shutil.disk_usage(self.directory).free
        except OSError as err:
            return f"cannot be read ({err.strerror or err})"
        need = 2 * checkpoint + 2 * state + self.PROBE_BYTES
        if free < need:
            return (
                f"has {free / 2**20:.1f} MiB free, less than two checkpoints and the sweep's state "
                f"({need / 2**20:.1f} MiB)"
            )
        return None


def drop_cut_errors(directory: Path) -> list[Path]:
    """Ray's pickled copies of trial errors that a full disk left empty, removed (their text copy
    stays): Ray cannot read the sweep's results past them. Returns those removed."""
    cut = [p for p in Path(directory).glob("*/error.pkl") if p.stat().st_size == 0]
    for path in cut:
        path.unlink()
    return cut
