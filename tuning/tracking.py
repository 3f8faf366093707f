"""The MLflow client layer: tracking URIs (credentials redacted), clients, retries while a store is
busy, experiments, params, finding runs, the environment tags, and a local store's artifact records
after it was moved. Layout: an experiment per sweep, a parent run for the sweep, a child run per
trial, a child of the trial's run per evaluation.

Parent links are set explicitly with the `mlflow.parentRunId` tag (Ray's and Optuna's own nesting
is unreliable). A trial's run is found again by its `trial_id` tag, so a trial retried from its
checkpoint, or resumed with the sweep, continues its run instead of starting a second one.

Who ends a run: the trial itself, FINISHED when its search completes, FAILED with the reason when
it diverges or raises; the driver (`RunFinalizer`, a Ray Tune callback) for what the trial cannot
report: a trial stopped by the scheduler (FINISHED, tagged `early_stopped`), a trial whose process
died for good (FAILED). Writes are retried while a sqlite store is locked by another writer.

A local sqlite store records the absolute path of every run's artifacts (MLflow does so), so a
`runs/` folder that was moved or copied would open with empty artifact lists. `relocate_artifacts`
finds such records: where the artifacts lie beside the store as this project writes them
(`mlartifacts/` next to `mlflow.db`), it points the records there; where they cannot be found, it
says so, by experiment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from nas.config import flatten_mapping
from nas.environment import environment

from .names import ENVIRONMENT_PREFIX

log = logging.getLogger(__name__)

T = TypeVar("T")
ARTIFACTS_DIR = "mlartifacts"  # a local store's artifacts, beside its mlflow.db
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


TRANSIENT = ("locked", "busy", "timed out", "timeout", "connection", "refused", "503", "502", "504",
             "temporarily", "max retries", "unreachable")  # fmt: skip


def transient(err: Exception) -> bool:
    """Errors of a busy or unreachable store, worth retrying: sqlite locks, connection failures."""
    text = f"{type(err).__name__} {err}".lower()
    return any(k in text for k in TRANSIENT)


def retrying(fn: Callable[[], T], what: str, attempts: int = 12) -> T:
    """Calls fn, retrying with backoff while the store is busy (sqlite locks, a restarting server)."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:  # MlflowException wraps sqlite and HTTP errors alike
            if not transient(err) or attempt == attempts:
                raise
            log.warning("MLflow %s failed (%s); retry %d/%d in %.1fs", what, err, attempt, attempts, delay)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


def environment_tags() -> dict[str, str]:
    return {ENVIRONMENT_PREFIX + name: version for name, version in environment().items()}


def environment_of(tags: Mapping[str, str]) -> dict[str, str]:
    """The environment recorded in a run's tags (empty for runs written before it was recorded)."""
    return {k[len(ENVIRONMENT_PREFIX) :]: v for k, v in tags.items() if k.startswith(ENVIRONMENT_PREFIX)}


def sqlite_file(tracking_uri: str) -> Path | None:
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :])
    return None


def _local_path(uri: str) -> Path | None:
    """The file-system path of a local artifact location (a plain path or a file: URI)."""
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    if "://" in uri or ":" in uri.split("/")[0]:
        return None
    return Path(uri)


@dataclass
class Relocation:
    experiment: str
    old_root: str
    new_root: str | None  # None: not found beside the store either


def relocate_artifacts(tracking_uri: str, apply: bool = True) -> list[Relocation]:
    """Artifact records of a local sqlite store that point where nothing is. Those in this
    project's layout (`.../mlartifacts/<experiment>`) are pointed at the `mlartifacts/` beside the
    store (with `apply`); others are listed with `new_root` None when the experiment has runs (the
    UI would show them without artifacts)."""
    db = sqlite_file(tracking_uri)
    if db is None or not db.exists():
        return []
    here = db.parent / ARTIFACTS_DIR
    found: list[Relocation] = []
    with sqlite3.connect(db, timeout=30) as con:
        tables = {row[0] for row in con.execute("select name from sqlite_master where type='table'")}
        if not {"experiments", "runs"} <= tables:
            return []
        rows = con.execute("select experiment_id, name, artifact_location from experiments").fetchall()
        for experiment_id, name, location in rows:
            path = _local_path(location or "")
            if path is None or path.exists() or path.is_relative_to(here):
                continue  # elsewhere, there, or beside the store and not written yet
            parts = path.parts
            if ARTIFACTS_DIR not in parts:
                runs = con.execute("select count(*) from runs where experiment_id = ?", (experiment_id,)).fetchone()
                if runs[0]:
                    found.append(Relocation(name, location, None))
                continue
            cut = len(parts) - 1 - parts[::-1].index(ARTIFACTS_DIR)
            old = str(Path(*parts[: cut + 1]))
            found.append(Relocation(name, old, str(here)))
            if apply:
                for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
                    con.execute(
                        f"update {table} set {column} = ? || substr({column}, ?) "
                        f"where experiment_id = ? and substr({column}, 1, ?) = ?",
                        (str(here), len(old) + 1, experiment_id, len(old), old),
                    )
    return found


def report_relocations(found: list[Relocation]) -> None:
    for item in found:
        if item.new_root:
            log.warning(
                "MLflow store moved: the artifacts of experiment %r were recorded under %s; now read from %s",
                item.experiment, item.old_root, item.new_root,
            )  # fmt: skip
        else:
            log.warning(
                "MLflow: the artifacts of experiment %r are recorded at %s, which does not exist: its runs show "
                "no artifacts (move them back there, or beside the store as %s/)",
                item.experiment, item.old_root, ARTIFACTS_DIR,
            )  # fmt: skip


def client_for(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client, name: str, artifact_root: str | None) -> str:
    if artifact_root:  # a local store: one that was moved has its artifact records pointed beside it
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
