"""MLflow layout: an experiment per sweep, a parent run for the sweep, a child
run per trial, a child of the trial's run per evaluation.

Parent links are set explicitly with the `mlflow.parentRunId` tag (Ray's and Optuna's own nesting
is unreliable). A trial's run is found again by its `trial_id` tag, so a trial retried from its
checkpoint, or resumed with the sweep, continues its run instead of starting a second one.

Who ends a run: the trial itself, FINISHED when its search completes, FAILED with the reason when
it diverges or raises; the driver (`RunFinalizer`, a Ray Tune callback) for what the trial cannot
report: a trial stopped by the scheduler (FINISHED, tagged `early_stopped`), a trial whose process
died for good (FAILED). Writes are retried while a sqlite store is locked by another writer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from nas.config import flatten_mapping
from nas.environment import environment

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
T = TypeVar("T")
# Files of a search's output directory that become artifacts of its run (not the checkpoint:
# Ray keeps those).
ARTIFACT_FILES = ("genotype.json", "config.json", "result.json")
# derive/: the genotypes and cells under further targets (docs/science.md D14), where asked for.
ARTIFACT_DIRS = ("cells", "plots", "derive")


# Tags of the software a run came from (nas/environment.py): environment.python, environment.torch, ...
ENVIRONMENT_PREFIX = "environment."


def environment_tags() -> dict[str, str]:
    return {ENVIRONMENT_PREFIX + name: version for name, version in environment().items()}


def environment_of(tags: Mapping[str, str]) -> dict[str, str]:
    """The environment recorded in a run's tags (empty for runs written before it was recorded)."""
    return {k[len(ENVIRONMENT_PREFIX) :]: v for k, v in tags.items() if k.startswith(ENVIRONMENT_PREFIX)}


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """A URI with its user:password@ part masked: credentials never reach logs, params or artifacts."""
    return _USERINFO.sub("***@", text)


def resolve_tracking_uri(uri: str, base: str | os.PathLike | None = None) -> str:
    """`auto` -> $MLFLOW_TRACKING_URI or sqlite:///<base>/runs/mlflow.db; relative sqlite and
    file paths become absolute (trials run in other working directories)."""
    base_dir = Path(base or os.getcwd()).resolve()
    if uri == "auto":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///runs/mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = base_dir / uri[len("sqlite:///") :]
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if "://" not in uri:  # a plain path: a sqlite database there
        path = (base_dir / uri).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def local_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside it; a server decides for itself."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts")
    return None


def retrying(fn: Callable[[], T], what: str, attempts: int = 12) -> T:
    """Calls fn, retrying with backoff while the store is busy (sqlite locks, a restarting server)."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:  # MlflowException wraps sqlite and HTTP errors alike
            text = str(err).lower()
            transient = any(
                k in text for k in ("locked", "busy", "timed out", "connection", "503", "502", "temporarily")
            )
            if not transient or attempt == attempts:
                raise
            log.warning("MLflow %s failed (%s); retry %d/%d in %.1fs", what, err, attempt, attempts, delay)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


def client_for(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client, name: str, artifact_root: str | None) -> str:
    if artifact_root:  # a local store: one that was moved has its artifact records pointed beside it
        from .ui import relocate_artifacts, report_relocations

        report_relocations(relocate_artifacts(client.tracking_uri))
    experiment = retrying(lambda: client.get_experiment_by_name(name), "get experiment")
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            retrying(lambda: client.restore_experiment(experiment.experiment_id), "restore experiment")
        return experiment.experiment_id
    location = f"{artifact_root}/{name}" if artifact_root else None
    try:
        return retrying(lambda: client.create_experiment(name, artifact_location=location), "create experiment")
    except Exception:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def params_of(config: Mapping[str, Any], extra: Mapping[str, Any] = ()) -> dict[str, str]:
    """Flattened settings as MLflow params (strings of at most 6000 characters)."""
    flat = flatten_mapping(config)
    flat.update(extra)
    return {k: redact(json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000] for k, v in flat.items()}


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def log_params(client, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for chunk in _batches(items, 100):
        retrying(lambda chunk=chunk: client.log_batch(run_id, params=chunk), "log params")


def log_metrics(client, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Metrics of a run the driver writes (the sweep's parent run)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
    for chunk in _batches(items, 1000):
        retrying(lambda chunk=chunk: client.log_batch(run_id, metrics=chunk), "log metrics")


def find_run(client, experiment_id: str, tags: Mapping[str, str]):
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = retrying(lambda: client.search_runs([experiment_id], query, max_results=2), "search runs")
    return runs[0] if runs else None


PENDING_FILE = "mlflow_pending.json"


def transient(err: Exception) -> bool:
    """Errors of a busy or unreachable store, worth retrying: sqlite locks, connection failures."""
    text = f"{type(err).__name__} {err}".lower()
    keys = ("locked", "busy", "timed out", "timeout", "connection", "refused", "503", "502", "504",
            "temporarily", "max retries", "unreachable")  # fmt: skip
    return any(k in text for k in keys)


class TrackedRun:
    """An MLflow run identified by one tag (`trial_id` for a trial, `eval_id` for an evaluation),
    written from the process that does the work.

    Every call is queued and the queue is sent in order: at once when the store answers; when it
    does not (a restarting server), training goes on and the queue waits for the next flush, and
    `finish` waits up to `patience` seconds for the store. What still cannot be sent is written to
    a pending file (`save_pending`), which `replay_pending` sends later, so that no metric goes
    missing silently.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str | None, key: str, value: str):
        self.tracking_uri = tracking_uri
        self.client = client_for(tracking_uri)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.key, self.value = key, value
        self.run_id: str | None = None
        self.status: str | None = None
        self.ops: list[tuple[str, dict[str, Any]]] = []

    # ---------------------------------------------------------------- queue
    def _queue(self, kind: str, **data: Any) -> None:
        self.ops.append((kind, data))
        self.flush()

    def flush(self, patience: float = 0.0) -> bool:
        """Sends the queued calls in order; True when none is left. Waits up to `patience` seconds
        for a store that does not answer; raises at once on errors that waiting cannot fix."""
        deadline = time.monotonic() + patience
        delay = 0.5
        while self.ops:
            kind, data = self.ops[0]
            try:
                self._apply(kind, data)
            except Exception as err:
                if not transient(err):
                    raise
                if time.monotonic() + delay > deadline:
                    return False
                time.sleep(delay)
                delay = min(2 * delay, 15.0)
                continue
            self.ops.pop(0)
        return True

    def _apply(self, kind: str, data: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if kind == "open":
            self._open_now(data["name"], data["params"], data["tags"])
        elif kind == "metrics":
            items = [Metric(k, float(v), data["time"], data["step"]) for k, v in data["metrics"].items()]
            for chunk in _batches(items, 1000):
                self.client.log_batch(self.run_id, metrics=chunk)
        elif kind == "tags":
            for k, v in data["tags"].items():
                self.client.set_tag(self.run_id, k, str(v)[:5000])
        elif kind == "artifact":
            if Path(data["path"]).is_file():
                self.client.log_artifact(self.run_id, data["path"])
        elif kind == "artifacts":
            if Path(data["path"]).is_dir():
                self.client.log_artifacts(self.run_id, data["path"], data["name"])
        elif kind == "image":
            if Path(data["path"]).is_file():
                from PIL import Image

                with Image.open(data["path"]) as image:
                    self.client.log_image(self.run_id, image.convert("RGB"), key=data["key"], step=data["step"])
        elif kind == "text":
            self.client.log_text(self.run_id, data["text"], data["name"])
        elif kind == "end":
            self.client.set_terminated(self.run_id, data["status"])
            self.status = data["status"]

    def _open_now(self, name: str, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        run = find_run(self.client, self.experiment_id, {self.key: self.value})
        if run is not None:
            self.run_id, self.status = run.info.run_id, run.info.status
            if self.status != "FINISHED":
                self.client.update_run(self.run_id, status="RUNNING")
                self.client.set_tag(self.run_id, "resumed", "true")
            return
        all_tags = {self.key: self.value, **tags}
        if self.parent_run_id:
            all_tags[PARENT_TAG] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        self.run_id, self.status = run.info.run_id, "RUNNING"
        log_params(self.client, self.run_id, params)

    # ---------------------------------------------------------------- calls
    def open(
        self, name: str, params: Mapping[str, str], tags: Mapping[str, str] = (), patience: float = 60.0
    ) -> str | None:
        """Finds this run (re-opening it unless FINISHED) or creates it. If the store stays away
        for `patience` seconds, work starts anyway and the run is created when it is back."""
        self.ops.append(("open", {"name": name, "params": dict(params), "tags": dict(tags)}))
        self.flush(patience)
        return self.run_id

    def log_epoch(self, metrics: Mapping[str, float], epoch: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self._queue("metrics", metrics=clean, step=epoch, time=int(time.time() * 1000))

    log_final = log_epoch

    def log_artifacts(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        for name in ARTIFACT_FILES:
            self._queue("artifact", path=str(out / name))
        for name in ARTIFACT_DIRS:
            self._queue("artifacts", path=str(out / name), name=name)

    def log_artifact(self, path: str | os.PathLike) -> None:
        self._queue("artifact", path=str(path))

    def log_image(self, path: str | os.PathLike, key: str, step: int) -> None:
        """A PNG as an MLflow image under `key` at `step` (the UI's image grid compares runs)."""
        self._queue("image", path=str(path), key=key, step=step)

    def log_text(self, text: str, name: str) -> None:
        self._queue("text", text=text, name=name)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._queue("tags", tags={k: str(v) for k, v in tags.items()})

    def finish(self, status: str = "FINISHED", patience: float = 300.0) -> bool:
        """Ends the run; True when everything reached the store."""
        self.ops.append(("end", {"status": status}))
        return self.flush(patience)

    # ---------------------------------------------------------------- pending
    def save_pending(self, path: str | os.PathLike) -> int:
        """Writes what could not be sent to `path` (nothing if all was sent); returns the count."""
        if not self.ops:
            return 0
        header = {
            "tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id, "key": self.key, "value": self.value,
        }  # fmt: skip
        Path(path).write_text(json.dumps({"run": header, "ops": self.ops}, indent=1))
        return len(self.ops)


def replay_pending(path: str | os.PathLike, patience: float = 30.0) -> int:
    """Sends a pending file's calls; deletes the file when all went through. Returns what is left."""
    data = json.loads(Path(path).read_text())
    header = data["run"]
    run = TrackedRun(
        header["tracking_uri"], header["experiment_id"], header["parent_run_id"], header["key"], header["value"]
    )
    ops = [(kind, payload) for kind, payload in data["ops"]]
    if ops and ops[0][0] != "open":
        run.ops.append(("open", {"name": "", "params": {}, "tags": {}}))  # finds the existing run
    run.ops.extend(ops)
    if run.flush(patience):
        Path(path).unlink()
        return 0
    return len(run.ops)
