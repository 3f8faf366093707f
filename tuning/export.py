"""A study's runs as one compact JSON file, small enough to commit beside the results it backs, and
read back in place of the MLflow store: every table and figure of docs/results is regenerated from
these files (`python sweeps/report.py --regenerate`).

Per search (trial run): its settings (params), status and tags, its final metrics (under the names
the report reads), the per-epoch curves of the headline metrics (the accuracies and the drop, the
skip_connect counts per level), and its genotype; per evaluation run: its settings, final metrics
and curves. For the searches whose α and β plots a page shows, the per-epoch softmax(α) and edge
weights as well. Also the sweep file the study ran and the software it ran with.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .names import PARENT_TAG
from .tracking import client_for, environment_of, retrying

FORMAT = 1
# MLflow metric names whose per-epoch values are kept (a prefix, or a whole name).
CURVE_PREFIXES = ("accuracy/", "architecture/skip_connect")
EVALUATION_CURVES = (
    "error/test_top1",
    "error/test_top5",
    "loss/train",
    "accuracy/train",
    "test_top1_error",
    "test_top5_error",
    "train_loss",
    "train_acc",
)  # and stores from before the groups
# Tags worth keeping: what the report and a reader need, not MLflow's own bookkeeping or the long
# Markdown description (whose numbers are the metrics themselves).
KEPT_TAGS = ("kind", "trial_id", "eval_id", "dataset", "method", "target", "genotype", "derived_targets", "early_stopped",
             "lost", "resumed", "failure", "diverged", PARENT_TAG)  # fmt: skip


@dataclass
class RunData:
    """What a report needs of one MLflow run."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    genotype: dict[str, Any] | None = None
    history: list[dict[str, Any]] | None = None  # per-epoch softmax(alpha) and edge weights, where kept

    @classmethod
    def of(cls, run) -> RunData:
        return cls(
            run.info.run_id, run.info.run_name, run.info.status, dict(run.data.params), dict(run.data.tags),
            dict(run.data.metrics),
        )  # fmt: skip


@dataclass
class Study:
    """A sweep's runs, from its MLflow store or from an export."""

    experiment: str
    trials: list[RunData]
    evaluations: list[RunData]
    sweep: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)


def _all_runs(client, experiment_id: str, query: str) -> list:
    runs, token = [], None
    while True:
        page = retrying(
            lambda token=token: client.search_runs([experiment_id], query, max_results=1000, page_token=token),
            "search runs",
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def fetch_study(tracking_uri: str, experiment: str) -> Study:
    """The trial and evaluation runs of an experiment (LookupError naming the others if it is missing)."""
    client = client_for(tracking_uri)
    found = retrying(lambda: client.get_experiment_by_name(experiment), "get experiment")
    if found is None:
        names = [e.name for e in retrying(lambda: client.search_experiments(), "list experiments")]
        raise LookupError(
            f"no MLflow experiment {experiment!r} at {tracking_uri}; experiments there: {', '.join(names) or 'none'}"
        )
    trials = [RunData.of(r) for r in _all_runs(client, found.experiment_id, "tags.kind = 'trial'")]
    evaluations = [RunData.of(r) for r in _all_runs(client, found.experiment_id, "tags.kind = 'evaluation'")]
    sweeps = _all_runs(client, found.experiment_id, "tags.kind = 'sweep'")
    sweep, environment = {}, {}
    if sweeps:
        environment = environment_of(sweeps[0].data.tags)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(sweeps[0].info.run_id, "sweep.yaml", tmp)
                sweep = yaml.safe_load(Path(path).read_text()) or {}
            except Exception:  # a sweep run without its file (an old store): the export says nothing of it
                sweep = {}
    return Study(experiment, trials, evaluations, sweep, environment)


def _curves(client, run: RunData, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    for name in names:
        history = retrying(lambda name=name: client.get_metric_history(run.run_id, name), "metric history")
        curves[name] = sorted((m.step, m.value) for m in history)
    return curves


def _artifact_json(client, run_id: str, path: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = retrying(lambda: client.download_artifacts(run_id, path, tmp), "download")
        except Exception:
            return None
        return json.loads(Path(local).read_text())


def add_details(tracking_uri: str, study: Study) -> Study:
    """The per-epoch curves of every run and the genotype of every finished search, from MLflow."""
    client = client_for(tracking_uri)
    for run in study.trials:
        run.curves = _curves(client, run, sorted(k for k in run.metrics if k.startswith(CURVE_PREFIXES)))
        if run.status == "FINISHED":
            run.genotype = _artifact_json(client, run.run_id, "genotype.json")
    for run in study.evaluations:
        run.curves = _curves(client, run, [n for n in EVALUATION_CURVES if n in run.metrics])
    return study


def add_histories(tracking_uri: str, study: Study, run_ids: set[str]) -> Study:
    """For the searches `run_ids`: softmax(alpha) and the edge weights per epoch, and the search
    space they refer to (ops, nodes), from each run's result.json."""
    client = client_for(tracking_uri)
    for run in study.trials:
        if run.run_id in run_ids and run.history is None:
            result = _artifact_json(client, run.run_id, "result.json") or {}
            run.history = [
                {k: record[k] for k in ("epoch", "softmax_alpha", "edge_weights") if k in record}
                for record in result.get("history", [])
            ]
    return study


def export_study(tracking_uri: str, experiment: str, path: str | Path, study: Study | None = None) -> Path:
    """Writes `experiment`'s runs to `path` (see the module's docstring): `study` where the caller
    fetched it already (with the histories of the runs it plots), else fetched here."""
    if study is None:
        study = add_details(tracking_uri, fetch_study(tracking_uri, experiment))

    def kept(run: RunData) -> dict[str, Any]:
        tags = {k: v for k, v in run.tags.items() if k in KEPT_TAGS or k.startswith("environment.")}
        return _compact({**asdict(run), "tags": tags})

    data = {
        "format": FORMAT,
        "experiment": study.experiment,
        "environment": study.environment,
        "sweep": study.sweep,
        "trials": [kept(r) for r in sorted(study.trials, key=lambda r: r.name)],
        "evaluations": [kept(r) for r in sorted(study.evaluations, key=lambda r: r.name)],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=None, separators=(",", ":"), sort_keys=True) + "\n")
    return path


def _compact(run: dict[str, Any]) -> dict[str, Any]:
    """The run without its empty fields (values exactly as MLflow holds them)."""
    return {k: v for k, v in run.items() if v not in (None, {}, [])}


def load_study(path: str | Path) -> Study:
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: an export of format {data.get('format')!r}; this version reads format {FORMAT}")

    def runs(items: list[dict[str, Any]]) -> list[RunData]:
        found = []
        for item in items:
            item = {"params": {}, "tags": {}, "metrics": {}, **item}
            item["curves"] = {k: [tuple(p) for p in v] for k, v in item.get("curves", {}).items()}
            found.append(RunData(**item))
        return found

    return Study(data["experiment"], runs(data["trials"]), runs(data["evaluations"]), data.get("sweep", {}),
                 data.get("environment", {}))  # fmt: skip
