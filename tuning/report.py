"""Tables and plots of a finished sweep, read back from MLflow.

Rows group the trials of one method under one target; every number is the mean +- standard
deviation over the group's seeds (sample std, n - 1; "n" says how many finished). The Table 4
layout puts the targets in rows and, per method, supernet accuracy, discretized accuracy and the
drop side by side, as the DA2S paper's Table 4 does.

A trial derived under further targets (docs/science.md D14, a folded `target` in the sweep) stands
for one search per target: it gives one record per target, with the metrics logged under that
target's name, and counts once in each of its targets' rows.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nas.environment import describe
from nas.metrics import (
    DISCRETIZED_ACC,
    DISCRETIZED_BN_RECAL_ACC,
    DISCRETIZED_UNIT_EDGES_ACC,
    DROP,
    DROP_BN_RECAL,
    KEPT_EDGE_SHARE,
    MAX_OP_WEIGHT,
    PARAMS,
    SUPERNET_ACC,
    TEST_TOP1_ERROR,
    split_derived,
)
from nas.plots import pyplot, save_figure

from .export import Study, fetch_study
from .names import DERIVED_TARGETS_TAG, PARENT_TAG, eval_report_names, method_colour, report_names
from .tracking import environment_of

COLUMNS = (
    (SUPERNET_ACC, "supernet"),
    (DISCRETIZED_ACC, "discretized"),
    (DROP, "drop"),
    (DISCRETIZED_BN_RECAL_ACC, "discr. BN recal"),
    (DROP_BN_RECAL, "drop BN recal"),
    (DISCRETIZED_UNIT_EDGES_ACC, "discr. edges=1"),
    (MAX_OP_WEIGHT, "max op weight"),
    (KEPT_EDGE_SHARE, "kept edge share"),
    (PARAMS, "params (M)"),
)
METHOD_ORDER = ("darts", "da2s", "multilevel")
# Test errors of the evaluation stage, when the sweep had one (joined to trials by parent run).
EVAL_COLUMNS = (("cifar10_test_error", "CIFAR-10 test error"), ("imagenet_test_error", "ImageNet top-1 error"))


@dataclass
class TrialRecord:
    run_id: str
    name: str
    method: str
    target: str
    seed: str
    status: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str] = field(default_factory=dict)
    # dataset -> the retrained test error of each training seed (the evaluation stage), in seed order
    retrained: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Row:
    method: str
    target: str
    n: int
    values: dict[str, list[float]]

    def stat(self, metric: str) -> tuple[float, float]:
        values = self.values.get(metric, [])
        if not values:
            return math.nan, math.nan
        mean = statistics.fmean(values)
        return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def load_trials(tracking_uri: str, experiment: str) -> tuple[list[TrialRecord], list[TrialRecord]]:
    """(finished trials, trials that failed, diverged or were stopped early) of an experiment."""
    return trial_records(fetch_study(tracking_uri, experiment))


def trial_records(study: Study) -> tuple[list[TrialRecord], list[TrialRecord]]:
    """(finished trials, the others) of a study read from MLflow or from its export. A trial's
    retrained test errors (the evaluation stage) are its metrics `<dataset>_test_error`, the mean over
    its training seeds, with every seed's in `retrained`."""
    errors: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in sorted(study.evaluations, key=lambda r: int(r.params.get("seed", 0))):
        parent = run.tags.get(PARENT_TAG)
        dataset = run.tags.get("dataset", run.params.get("dataset"))
        metrics = eval_report_names(run.metrics)
        if parent and run.status == "FINISHED" and TEST_TOP1_ERROR in metrics:
            errors[parent][dataset].append(metrics[TEST_TOP1_ERROR])
    finished, other = [], []
    for run in study.trials:
        params, tags = run.params, run.tags
        # The run's metrics by derived target: "" for the search's own target (docs/science.md D14).
        by_slug: dict[str, dict[str, float]] = defaultdict(dict)
        for key, value in report_names(run.metrics).items():
            name, slug = split_derived(key)
            by_slug[slug][name] = value
        retrained = dict(errors.get(run.run_id, {}))
        record = TrialRecord(
            run.run_id,
            run.name,
            params.get("method", "?"),
            params.get("target", "?"),
            params.get("seed", "?"),
            run.status,
            {**by_slug[""], **{f"{d}_test_error": statistics.fmean(v) for d, v in retrained.items()}},
            dict(params),
            dict(tags),
            retrained,
        )
        records = [record]
        for slug, target in json.loads(tags.get(DERIVED_TARGETS_TAG, "{}")).items():
            tags_of = {**record.tags, "derived_from": record.target}
            records.append(
                dataclasses.replace(record, target=target, metrics=by_slug[slug], tags=tags_of, retrained={})
            )
        for record in records:
            complete = run.status == "FINISHED" and "early_stopped" not in tags and DISCRETIZED_ACC in record.metrics
            (finished if complete else other).append(record)
    return finished, other


def summarise(trials: Sequence[TrialRecord]) -> list[Row]:
    groups: dict[tuple[str, str], list[TrialRecord]] = defaultdict(list)
    for trial in trials:
        groups[(trial.method, trial.target)].append(trial)
    rows = []
    for (method, target), members in groups.items():
        values = {
            metric: [t.metrics[metric] for t in members if metric in t.metrics] for metric, _ in COLUMNS + EVAL_COLUMNS
        }
        values[PARAMS] = [v / 1e6 for v in values[PARAMS]]
        rows.append(Row(method, target, len(members), values))
    rows.sort(key=lambda r: (_target_key(r.target), _method_key(r.method)))
    return rows


def report_text(
    experiment: str, finished: Sequence[TrialRecord], other: Sequence[TrialRecord], layout: str = "auto"
) -> str:
    """The Markdown report: a count of the trials, the Table 4 layout where it reads well (a few
    methods under several targets) or when asked, then every column per method and target."""
    rows = summarise(finished)
    side_by_side = 1 < len({r.method for r in rows}) <= 3 and len({r.target for r in rows}) > 1
    layout = layout if layout != "auto" else ("table4" if side_by_side else "rows")
    text = f"# {experiment}\n\n{len(finished)} finished trials"
    searches = len({t.run_id for t in finished})
    if searches < len(finished):
        text += f" from {searches} searches (some derived under several targets, docs/science.md D14)"
    if other:
        states = ", ".join(sorted({t.status + (" early-stopped" if "early_stopped" in t.tags else "") for t in other}))
        text += f"; {len(other)} not counted ({states})"
    text += "\n\n"
    if layout == "table4":
        text += table4(rows) + "\n\nAll columns:\n\n"
    return text + markdown_table(rows) + "\n\n" + environment_text(finished) + "\n"


def environment_text(trials: Sequence[TrialRecord]) -> str:
    """The software the searches ran with (nas/environment.py), one line per distinct environment."""
    searches = {t.run_id: describe(environment_of(t.tags)) or "not recorded" for t in trials}
    counts = Counter(searches.values())
    if len(counts) == 1:
        return f"Environment: {next(iter(counts))}."
    lines = [f"- {env} ({n} searches)" for env, n in counts.most_common()]
    return "Environments (the searches did not all run with the same versions):\n\n" + "\n".join(lines)


def _method_key(method: str) -> tuple:
    """The known methods in METHOD_ORDER, then any others by name."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _target_key(target: str) -> tuple:
    """Per-node targets first, in their order; then per-cell targets by K."""
    if " of " in target:
        return (1, int(target.split()[0]), target)
    return (0, 0, target)


def _cell(row: Row, metric: str) -> str:
    mean, std = row.stat(metric)
    if math.isnan(mean):
        return "-"
    digits = 3 if metric in (MAX_OP_WEIGHT, KEPT_EDGE_SHARE) else 2
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if row.n > 1 else f"{mean:.{digits}f}"


def _columns(rows: Sequence[Row]) -> tuple[tuple[str, str], ...]:
    """The search columns, and the evaluation columns that have values."""
    present = tuple((m, label) for m, label in EVAL_COLUMNS if any(r.values.get(m) for r in rows))
    return COLUMNS + present


def markdown_table(rows: Sequence[Row]) -> str:
    columns = _columns(rows)
    header = ["method", "target", "n", *(label for _, label in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row.method, row.target, str(row.n), *(_cell(row, m) for m, _ in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table4(rows: Sequence[Row]) -> str:
    """Targets in rows; per method: supernet, discretized, drop (and the drop after BN recal)."""
    methods = sorted({r.method for r in rows}, key=_method_key)
    targets = sorted({r.target for r in rows}, key=_target_key)
    by_key = {(r.method, r.target): r for r in rows}
    header = ["target"]
    for m in methods:
        header += [f"{m} supernet", f"{m} discretized", f"{m} drop", f"{m} drop (BN recal)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for target in targets:
        cells = [target]
        for m in methods:
            row = by_key.get((m, target))
            cells += [_cell(row, k) if row else "-" for k in (SUPERNET_ACC, DISCRETIZED_ACC, DROP, DROP_BN_RECAL)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(rows: Sequence[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    columns = _columns(rows)
    header = ["method", "target", "n"]
    for metric, _ in columns:
        header += [f"{metric}_mean", f"{metric}_std"]
    writer.writerow(header)
    for row in rows:
        cells = [row.method, row.target, row.n]
        for metric, _ in columns:
            mean, std = row.stat(metric)
            cells += [f"{mean:.4f}", f"{std:.4f}"]
        writer.writerow(cells)
    return out.getvalue()


def plot_drops(rows: Sequence[Row], path: str | Path, title: str = "") -> Path:
    """Grouped bars of the drop per target and method (mean +- std over seeds), with and without
    BN recalibration."""
    plt = pyplot()

    methods = sorted({r.method for r in rows}, key=_method_key)
    targets = sorted({r.target for r in rows}, key=_target_key)
    by_key = {(r.method, r.target): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.4 * len(targets) * 2), 3.8), sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, metric, label in (
        (axes[0], DROP, "stored BN statistics"),
        (axes[1], DROP_BN_RECAL, "after BN recalibration"),
    ):
        for i, method in enumerate(methods):
            stats = [by_key[(method, t)].stat(metric) if (method, t) in by_key else (math.nan, 0.0) for t in targets]
            xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(targets))]
            ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=method,
                   color=method_colour(method))  # fmt: skip
        ax.set_xticks(range(len(targets)), targets, rotation=20, fontsize=8)
        ax.set_title(f"accuracy drop, {label}", fontsize=9)
        ax.axhline(0, color="black", lw=0.6)
    axes[0].set_ylabel("supernet - discretized accuracy (points)")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_skip_counts(histories: dict[str, dict[str, dict[int, float]]], path: str | Path, title: str = "") -> Path:
    """One panel per method: skip_connect ops in each level's derived cell over the epochs."""
    plt = pyplot()

    methods = sorted(histories)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        for level, points in histories[method].items():
            ax.plot(list(points), list(points.values()), marker="o", ms=3, lw=1.4, label=level)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.legend(fontsize=7, frameon=False)
    axes[0][0].set_ylabel("skip_connect ops in the derived cell")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def final_skip_table(histories: dict[str, dict[str, dict[int, float]]]) -> str:
    levels = sorted({level for method in histories.values() for level in method})
    lines = ["| method | " + " | ".join(levels) + " |", "|" + "|".join("---" for _ in range(len(levels) + 1)) + "|"]
    for method in sorted(histories):
        cells = []
        for level in levels:
            points = histories[method].get(level)
            cells.append(f"{points[max(points)]:.1f}" if points else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retrained(trials: Sequence[TrialRecord], dataset: str = "cifar10") -> list[TrialRecord]:
    """The trials whose derived architecture the evaluation stage trained on `dataset`, by method and seed."""
    found = [t for t in trials if f"{dataset}_test_error" in t.metrics]
    return sorted(found, key=lambda t: (_target_key(t.target), _method_key(t.method), t.seed))


def _number(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def plot_drop_vs_error(
    trials: Sequence[TrialRecord], path: str | Path, title: str = "", dataset: str = "cifar10"
) -> Path | None:
    """One point per retrained trial: the search's drop (x) against the retrained test accuracy (y)."""
    found = retrained(trials, dataset)
    if not found:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), sharey=True)
    methods = sorted({t.method for t in found}, key=_method_key)
    for ax, metric, label in ((axes[0], DROP, "drop (stored BN statistics)"),
                              (axes[1], DROP_BN_RECAL, "drop after BN recalibration")):  # fmt: skip
        for method in methods:
            points = [(t.metrics[metric], 100 - t.metrics[f"{dataset}_test_error"])
                      for t in found if t.method == method and metric in t.metrics]  # fmt: skip
            ax.scatter([p[0] for p in points], [p[1] for p in points], label=method, s=30, color=method_colour(method))
        ax.set_xlabel(f"search: {label} (points)", fontsize=9)
    axes[0].set_ylabel(f"retrained {dataset} test accuracy (%)", fontsize=9)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
