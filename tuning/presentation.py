"""How a sweep reads in the MLflow UI: run descriptions and the view that the printed link opens
(the metric names, tags and colours they use are tuning/names.py's).

View. The sweep stores one MLflow "shared view" on its experiment (the experiment tag
`mlflow.sharedViewState.<key>`, which the UI's Share button writes too): the trials only (not the
sweep's own run, so none is folded under it), the columns method, target, seed and the headline
metrics, sorted by method, every run shown in the charts, and the charts of the compare view
(bars of the drop and of both accuracies per run, accuracy curves over the epochs, supernet vs
discretized accuracy). `runs_link` opens the runs table on that view.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from nas import metrics as m

from .names import COLOUR_TAG, HEADLINE, NOTE_TAG, SWEEP_COLOUR
from .tracking import retrying

VIEW_KEY = "trials"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."


def artifact_url(run_id: str, path: str) -> str:
    """A URL the MLflow UI's pages resolve to the run's artifact (relative to the UI's root)."""
    return "get-artifact?" + urllib.parse.urlencode({"path": path, "run_uuid": run_id})


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def trial_note(
    run_id: str,
    method: str,
    target: str,
    seed: Any,
    metrics: Mapping[str, float],
    genotype_text: str,
    cell_files: Mapping[str, str],
    derivations: Sequence[tuple[str, str, Mapping[str, float]]] = (),
) -> str:
    """The Markdown description of a trial's run: accuracies and drops (plain and after BN
    recalibration), the derived network's size, and its cells, drawn inline; with `derivations`
    ((target, slug, metrics) of the further targets it was derived under), a row for each."""
    rows = [
        ("stored BN statistics", metrics.get(m.SUPERNET_ACC), metrics.get(m.DISCRETIZED_ACC), metrics.get(m.DROP)),
        (
            "after BN recalibration",
            metrics.get(m.SUPERNET_BN_RECAL_ACC),
            metrics.get(m.DISCRETIZED_BN_RECAL_ACC),
            metrics.get(m.DROP_BN_RECAL),
        ),
    ]
    lines = [
        f"**{method}**, target {target}, seed {seed}",
        "",
        "| accuracy (%) | supernet | discretized | drop |",
        "|---|---:|---:|---:|",
        *(f"| {label} | {_num(s)} | {_num(d)} | {_num(p)} |" for label, s, d, p in rows),
        "",
    ]
    if metrics.get(m.PARAMS) is not None:
        lines += [f"Derived network: **{metrics[m.PARAMS] / 1e6:.2f} M** parameters (CIFAR-10, 20 cells, C=36).", ""]
    lines += ["```", genotype_text, "```", ""]
    for level, path in cell_files.items():
        lines += [f"![{level} cell]({artifact_url(run_id, path)})", ""]
    if derivations:
        lines += [
            "Derived under further targets (docs/science.md D14; genotypes and cells under `derive/<target>/`):",
            "",
            "| target | discretized | drop | drop (BN recal.) | params (M) |",
            "|---|---:|---:|---:|---:|",
        ]
        for text, _slug, d in derivations:
            params = _num(d[m.PARAMS] / 1e6) if d.get(m.PARAMS) is not None else "-"
            lines.append(
                f"| {text} | {_num(d.get(m.DISCRETIZED_ACC))} | {_num(d.get(m.DROP))} | "
                f"{_num(d.get(m.DROP_BN_RECAL))} | {params} |"
            )
        lines.append("")
    return "\n".join(lines)


def sweep_note(sweep_name: str, description: str, table: str, drops_path: str | None, run_id: str) -> str:
    """The Markdown description of the sweep's run: the report's table and its drop plot."""
    lines = [f"**Sweep `{sweep_name}`**", ""]
    if description:
        lines += [description.strip(), ""]
    lines += [table, "", "Mean ± std over seeds; accuracies in %, drop = supernet − discretized (points).", ""]
    if drops_path:
        lines += [f"![accuracy drop per target and method]({artifact_url(run_id, drops_path)})", ""]
    return "\n".join(lines)


def experiment_note(sweep_name: str, description: str, experiment_id: str, parent_run_id: str) -> str:
    lines = [description.strip(), ""] if description else []
    lines += [
        f"Sweep `{sweep_name}`: one run per trial, coloured by method; the table lists the trials with "
        "their method, target, supernet and discretized accuracy and the drop between them. "
        "**Chart** compares them (drop, accuracies, curves over the epochs).",
        "",
        f"Summary table and drop plot: [the sweep's run](#/experiments/{experiment_id}/runs/{parent_run_id}).",
    ]
    return "\n".join(lines)


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def _bar(uuid: str, metric: str, section: str, title: str) -> dict[str, Any]:
    return {"uuid": uuid, "type": "BAR", "runsCountToCompare": 100, "metricSectionId": section, "deleted": False,
            "isGenerated": False, "metricKey": metric, "displayName": title}  # fmt: skip


def _line(uuid: str, metrics: list[str], section: str) -> dict[str, Any]:
    return {"uuid": uuid, "type": "LINE", "runsCountToCompare": 100, "metricSectionId": section, "deleted": False,
            "isGenerated": False, "metricKey": metrics[0], "selectedMetricKeys": metrics, "scaleType": "linear",
            "lineSmoothness": 0, "xAxisKey": "step", "selectedXAxisMetricKey": "", "xAxisScaleType": "linear",
            "displayName": " & ".join(metrics)}  # fmt: skip


def _scatter(uuid: str, x: str, y: str, section: str) -> dict[str, Any]:
    return {"uuid": uuid, "type": "SCATTER", "runsCountToCompare": 100, "metricSectionId": section, "deleted": False,
            "isGenerated": False, "xaxis": {"key": x, "type": "METRIC"}, "yaxis": {"key": y, "type": "METRIC"}}  # fmt: skip


WIDTHS = {"params.`method`": 90, "params.`target`": 110, "params.`seed`": 60, "metrics.`accuracy/discretized`": 160}


def _images(uuid: str, keys: list[str], step: int, section: str) -> dict[str, Any]:
    return {"uuid": uuid, "type": "IMAGE", "runsCountToCompare": 100, "metricSectionId": section, "deleted": False,
            "isGenerated": False, "imageKeys": keys, "step": step, "showRunParams": True}  # fmt: skip


def view_state(levels: tuple[str, ...] = ("normal", "reduce"), epochs: int = 0) -> dict[str, Any]:
    """The runs table and the compare view that the printed link opens; the cells of `levels`
    side by side as logged at the last epoch (`epochs`)."""
    columns = [_column("params", "method"), _column("params", "target"), _column("params", "seed")]
    columns += [_column("metrics", key) for key in HEADLINE]
    story, curves, cells = "section-story", "section-curves", "section-cells"
    charts = [
        _bar("chart-drop", "accuracy/drop", story, "drop"),
        _bar("chart-discretized", "accuracy/discretized", story, "discretized"),
        _bar("chart-supernet", "accuracy/supernet", story, "supernet"),
        _bar("chart-drop-bn-recal", "accuracy_bn_recal/drop", story, "drop, BN recal."),
        _scatter("chart-scatter", "accuracy/supernet", "accuracy/discretized", story),
        _bar("chart-params", "network/params_M", story, "params (M)"),
        _line("chart-curves", ["accuracy/supernet", "accuracy/discretized"], curves),
        _line("chart-drop-curve", ["accuracy/drop"], curves),
        _images("chart-cells", [f"cell_{level}" for level in levels], epochs, cells),
    ]
    sections = [
        {"uuid": story, "name": "Discretization: drop and accuracies per trial", "display": True,
         "isReordered": False, "deleted": False, "isGenerated": False},
        {"uuid": curves, "name": "Over the epochs", "display": True, "isReordered": False, "deleted": False,
         "isGenerated": False},
        {"uuid": cells, "name": "Derived cells", "display": True, "isReordered": False, "deleted": False,
         "isGenerated": False},
    ]  # fmt: skip
    return {
        "searchFilter": "tags.kind = 'trial'",
        "orderByKey": _column("params", "method"),
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": columns,
        # The grid's column ids are the column keys; method and target first.
        "columnOrder": columns,
        "columnWidths": {c: WIDTHS.get(c, 120) for c in columns},
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": True,
        "groupBy": None,
        "groupsExpanded": {},
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
        "chartsSearchFilter": "",
    }


def view_tag(levels: tuple[str, ...], epochs: int, name: str = "Trials by method") -> tuple[str, str]:
    """(experiment tag key, value) of the shared view, in the UI's saved-view envelope."""
    now = int(time.time() * 1000)
    envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(view_state(levels, epochs))}
    return VIEW_TAG_PREFIX + VIEW_KEY, json.dumps(envelope)


def runs_link(base_url: str, experiment_id: str, chart: bool = False) -> str:
    """The URL that opens the experiment's runs table (not MLflow 3's GenAI page) on the shared
    view; with `chart`, its compare view."""
    query = {"workflowType": "machine_learning", "viewStateShareKey": VIEW_KEY}
    if chart:
        query["compareRunsMode"] = "CHART"
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query)}"


def present_experiment(client, experiment_id: str, sweep, parent_run_id: str) -> None:
    """The experiment's description and shared view, and the sweep run's colour (at the sweep's
    start, so that the link works while it runs)."""
    search = sweep.base_search()
    key, value = view_tag(tuple(level.name for level in search.space().levels), search.epochs)
    note = experiment_note(sweep.name, sweep.description, experiment_id, parent_run_id)
    retrying(lambda: client.set_experiment_tag(experiment_id, key, value), "tag experiment")
    retrying(lambda: client.set_experiment_tag(experiment_id, NOTE_TAG, note), "tag experiment")
    retrying(lambda: client.set_tag(parent_run_id, COLOUR_TAG, SWEEP_COLOUR), "tag sweep run")
