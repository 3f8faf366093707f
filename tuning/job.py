"""A tracked job's life, owned once for the sweep's trials (tuning/trainable.py) and evaluations
(tuning/evaluation.py), in the process that does the work:

1. `claim`: the accelerators it reserved and no others, and its share of the CPUs as threads
   (tuning/accelerators.py, tuning/threads.py);
2. `open`: its MLflow run, found again by its id tag after a retry or a resume (a run already
   FINISHED says so: the job is not done twice), with its kind and environment tags; a job that
   reserved a GPU it cannot use fails here, its run holding the reason;
3. `epoch`: each epoch's metrics, queued while MLflow is away, each epoch once: a job run again
   (its process, node or driver lost) skips the epochs its run already holds, and `resend` sends
   from the restored checkpoint's history those whose metrics never arrived;
4. `fail` or `finish`: the run ended FAILED (with the reason, and `diverged` for a divergence) or
   FINISHED; what MLflow did not take is written to a pending file, handed to `keep_pending` for the
   driver to replay.

`TrialOutcome` is what a trial reports to Ray Tune beside its search's metrics, read back by the
driver: its keys are spelled here only.

Fault injection (docs/reliability.md): `NAS_FAULT="KIND.POINT@EPOCH:ACTION:MARKER[;...]"` in the
driver's environment (it travels with the jobs' settings to any node) stops a job of KIND (`trial`,
`evaluation`) at a named point of an epoch, once: the MARKER file (a path every node sees) is
created first, holding the process's pid, and a spec whose marker exists is spent. POINT is
`before-epoch-metrics` or `after-epoch-metrics`, ACTION `kill` (SIGKILL of the job's process) or
`pause` (it waits until a file MARKER.continue appears, for a test to kill its node or driver, or
to fill its disk, meanwhile). The tests put kills exactly between an epoch's metrics and its
checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from nas.config import ConfigError

from .accelerators import AcceleratorError, claim_accelerators
from .names import FAILURE_TAG
from .threads import place_threads
from .tracked_run import PENDING_FILE, TrackedRun
from .tracking import environment_tags

log = logging.getLogger(__name__)


class TrackedJob:
    """One job: a run of kind `kind` identified by the tag `key` = `value` (`trial_id`, `eval_id`)."""

    def __init__(
        self,
        kind: str,
        key: str,
        value: str,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str | None,
        out_dir: Path,
        keep_pending: Callable[[Path], None] | None = None,
        marker: str | None = None,
        faults: str = "",
    ):
        """`marker`: the MLflow metric every epoch logs, whose steps say which epochs the run holds;
        `faults`: the faults to inject (NAS_FAULT, above)."""
        self.kind, self.out_dir, self.keep_pending, self.faults = kind, out_dir, keep_pending, faults
        self.run = TrackedRun(tracking_uri, experiment_id, parent_run_id, key, value, marker)
        self.problem: AcceleratorError | None = None
        self.threads = 1

    @property
    def run_id(self) -> str | None:
        return self.run.run_id

    def claim(self, gpus: float, cpus: float, device: str) -> int:
        """Hides the GPUs the job did not reserve (before anything initialises CUDA) and places its
        threads; returns their number. A reserved GPU that CUDA cannot use fails the job at `open`."""
        try:
            claim_accelerators(gpus, device)
        except AcceleratorError as err:
            self.problem = err
        self.threads = place_threads(cpus)
        return self.threads

    def open(self, name: str, params: Mapping[str, str], tags: Mapping[str, str] = ()) -> bool:
        """Finds or creates the run; True when it FINISHED before (its result stands). Raises the
        accelerator problem of `claim`, once the run holds it."""
        self.run.open(name, params, {"kind": self.kind, **dict(tags), **environment_tags()})
        if self.problem is not None:
            self.fail(self.problem)
            raise self.problem
        return self.run.status == "FINISHED"

    def epoch(self, metrics: Mapping[str, float], step: int) -> None:
        """The epoch's metrics, unless its run holds them already (an epoch computed again)."""
        inject(self.faults, f"{self.kind}.before-epoch-metrics", step)
        self.run.log_epoch(metrics, step)
        inject(self.faults, f"{self.kind}.after-epoch-metrics", step)

    def resend(self, history: list[Mapping[str, Any]], to_metrics: Callable[[Mapping[str, Any]], dict]) -> None:
        """The epochs of a restored checkpoint's `history` whose metrics the run lacks (the job was
        lost between its checkpoint and its metrics, or they were queued while MLflow was away),
        each once: the run skips those it holds."""
        for record in history:
            self.run.log_epoch(to_metrics(record), record["epoch"])

    def fail(self, err: BaseException, diverged: bool = False) -> int:
        """Ends the run FAILED with the reason; returns the count of calls left pending."""
        tags = {FAILURE_TAG: f"{type(err).__name__}: {err}" if not diverged else str(err)}
        if diverged:
            tags["diverged"] = "true"
        self.run.set_tags(tags)
        return self._end("FAILED")

    def finish(self, tags: Mapping[str, str] = ()) -> int:
        """Ends the run FINISHED (with `tags`); returns the count of calls left pending."""
        if tags:
            self.run.set_tags(dict(tags))
        return self._end("FINISHED")

    @property
    def pending_file(self) -> Path:
        return self.out_dir / PENDING_FILE

    def _end(self, status: str) -> int:
        if self.run.finish(status):
            return 0
        count = self.run.save_pending(self.pending_file)
        log.warning("MLflow unreachable: %d calls saved to %s for the driver to replay", count, self.pending_file)
        if self.keep_pending is not None:
            self.keep_pending(self.pending_file)
        return count


FAULT_ENV = "NAS_FAULT"


def faults() -> str:
    """The faults this driver's environment asks to inject (checked: a typo must not pass unseen)."""
    specs = os.environ.get(FAULT_ENV, "")
    for spec in filter(None, specs.split(";")):
        parts = spec.split(":", 2)
        where = parts[0].partition("@")
        if (
            len(parts) != 3 or not where[2].isdigit() or parts[1] not in ("kill", "pause")
            or where[0] not in {f"{k}.{p}" for k in ("trial", "evaluation") for p in FAULT_POINTS}
        ):  # fmt: skip
            raise ConfigError(
                FAULT_ENV, spec,
                "expected KIND.POINT@EPOCH:ACTION:MARKER with KIND trial or evaluation, POINT one of "
                f"{', '.join(FAULT_POINTS)}, ACTION kill or pause",
            )  # fmt: skip
    return specs


FAULT_POINTS = ("before-epoch-metrics", "after-epoch-metrics")


def inject(specs: str, point: str, epoch: int) -> None:
    """The fault `specs` ask for at `point` of `epoch`, once (see the module's docstring)."""
    for spec in filter(None, specs.split(";")):
        where, action, marker = spec.split(":", 2)
        name, _, at = where.partition("@")
        if name != point or int(at) != epoch or Path(marker).exists():
            continue
        Path(marker).write_text(f"{os.getpid()}\n")
        log.warning("fault injected: %s at %s of epoch %d", action, point, epoch)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + 600
        go = Path(f"{marker}.continue")
        while action == "pause" and not go.exists() and time.monotonic() < deadline:
            time.sleep(0.2)


@dataclass
class TrialOutcome:
    """What a trial reports to Ray Tune beside its search's metrics, and reads back on the driver."""

    run_id: str | None = None
    genotype: str | None = None  # the genotype as JSON (a finished search)
    diverged: bool = False
    failure: str | None = None
    pending: int = 0  # MLflow calls the trial could not send (in its final checkpoint)

    KEYS: ClassVar[dict[str, str]] = {"run_id": "mlflow_run_id", "genotype": "genotype", "diverged": "diverged", "failure": "failure",
            "pending": "mlflow_pending"}  # fmt: skip

    def report(self, metrics: Mapping[str, Any] = ()) -> dict[str, Any]:
        values = {"run_id": self.run_id, "genotype": self.genotype, "diverged": float(self.diverged),
                  "failure": self.failure, "pending": self.pending}  # fmt: skip
        return {**dict(metrics), **{self.KEYS[k]: v for k, v in values.items() if v is not None}}

    @classmethod
    def read(cls, result: Mapping[str, Any] | None) -> TrialOutcome:
        result = result or {}
        return cls(
            result.get(cls.KEYS["run_id"]),
            result.get(cls.KEYS["genotype"]),
            bool(result.get(cls.KEYS["diverged"])),
            result.get(cls.KEYS["failure"]),
            int(result.get(cls.KEYS["pending"]) or 0),
        )

    @classmethod
    def key(cls, field: str) -> str:
        return cls.KEYS[field]
