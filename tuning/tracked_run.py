"""An MLflow run written by the process that does the work (a trial, an evaluation), which goes on
when the tracking server does not answer: every call is queued and sent in order, and what cannot be
sent is kept in a pending file that the driver replays."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .names import PARENT_TAG
from .tracking import _batches, client_for, find_run, log_params, transient

log = logging.getLogger(__name__)

# Files of a search's output directory that become artifacts of its run (not the checkpoint:
# Ray keeps those).
ARTIFACT_FILES = ("genotype.json", "config.json", "result.json")
# derive/: the genotypes and cells under further targets (docs/science.md D14), where asked for.
ARTIFACT_DIRS = ("cells", "plots", "derive")


PENDING_FILE = "mlflow_pending.json"


class TrackedRun:
    """An MLflow run identified by one tag (`trial_id` for a trial, `eval_id` for an evaluation),
    written from the process that does the work.

    Every call is queued and the queue is sent in order: at once when the store answers; when it
    does not (a restarting server), training goes on and the queue waits for the next flush, and
    `finish` waits up to `patience` seconds for the store. What still cannot be sent is written to
    a pending file (`save_pending`), which `replay_pending` sends later, so that no metric goes
    missing silently.
    """

    def __init__(
        self, tracking_uri: str, experiment_id: str, parent_run_id: str | None, key: str, value: str,
        marker: str | None = None,
    ):  # fmt: skip
        """`marker`: the metric every epoch logs; its steps in the run say which epochs it holds, and
        an epoch it holds is not sent again (a job run again after its process, node or driver was
        lost; a call repeated after a timeout the store had in fact carried out)."""
        self.tracking_uri = tracking_uri
        self.marker = marker
        self.logged: set[int] = set()  # the epochs the run holds (with a marker)
        self._recheck = False  # a call failed: what the store holds is read again before the next epoch
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
                self._recheck = True
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
            if data.get("epoch") and self.marker:
                if self._recheck:
                    self._read_logged()
                if data["step"] in self.logged:
                    log.info("epoch %d is in run %s already: not logged again", data["step"], self.run_id)
                    return
            items = [Metric(k, float(v), data["time"], data["step"]) for k, v in data["metrics"].items()]
            for chunk in _batches(items, 1000):
                self.client.log_batch(self.run_id, metrics=chunk)
            if data.get("epoch"):
                self.logged.add(data["step"])
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
                self._read_logged()
            return
        all_tags = {self.key: self.value, **tags}
        if self.parent_run_id:
            all_tags[PARENT_TAG] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        self.run_id, self.status = run.info.run_id, "RUNNING"
        log_params(self.client, self.run_id, params)

    def _read_logged(self) -> None:
        if self.marker and self.run_id:
            self.logged = {point.step for point in self.client.get_metric_history(self.run_id, self.marker)}
        self._recheck = False

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
        """An epoch's metrics at step `epoch`, sent once: not if the run holds that epoch already."""
        self._queue("metrics", metrics=_finite(metrics), step=epoch, time=int(time.time() * 1000), epoch=True)

    def log_final(self, metrics: Mapping[str, float], step: int) -> None:
        """Final metrics at `step` (the last epoch's), which no epoch logs."""
        self._queue("metrics", metrics=_finite(metrics), step=step, time=int(time.time() * 1000))

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
            "parent_run_id": self.parent_run_id, "key": self.key, "value": self.value, "marker": self.marker,
        }  # fmt: skip
        Path(path).write_text(json.dumps({"run": header, "ops": self.ops}, indent=1))
        return len(self.ops)


def replay_pending(path: str | os.PathLike, patience: float = 30.0) -> int:
    """Sends a pending file's calls; deletes the file when all went through. Returns what is left."""
    data = json.loads(Path(path).read_text())
    header = data["run"]
    run = TrackedRun(
        header["tracking_uri"], header["experiment_id"], header["parent_run_id"], header["key"], header["value"],
        header.get("marker"),
    )  # fmt: skip
    ops = [(kind, payload) for kind, payload in data["ops"]]
    if ops and ops[0][0] != "open":
        run.ops.append(("open", {"name": "", "params": {}, "tags": {}}))  # finds the existing run
    run.ops.extend(ops)
    if run.flush(patience):
        Path(path).unlink()
        return 0
    return len(run.ops)


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
