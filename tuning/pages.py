"""The results pages' tables and figures, regenerated from the studies' committed exports.

A page (docs/results/*.md) holds prose and generated blocks:

    <!-- generated: table4_cpu seeds metrics=drop,drop_bn_recal -->
    ...the block's content, written by `python sweeps/report.py --regenerate`...
    <!-- end generated -->

The first word names the study (its export, docs/results/data/NAME.json), the second the view,
then `key=value` options (quoted where they hold spaces). `--regenerate --check` writes nothing and
fails where a block differs from what the export gives: the test suite runs it, so a page cannot
state a number its data does not back. Views:

    summary       how many searches and results, and what was not counted
    table4        targets in rows, methods side by side (supernet, discretized, drop, drop after BN recal)
    table         every column per method and target, mean ± std and n
    seeds         one row per search: metrics=... (default: supernet, discretized, drop, drop BN recal)
    differences   each group against base=METHOD|TARGET on metric= (default drop): difference of
                  means, Welch's 95 % interval, permutation p
    kinds         per-node against per-cell targets, pooled, for method=... on metric=...
    correlation   Spearman's ρ of x=METRIC with y=METRIC over method=...'s searches, all of them and
                  per-cell targets only, with permutation p-values
    skips         skip_connect ops per level at the last epoch, mean over seeds
    retrained     each retrained architecture's search metrics beside its test accuracy (every
                  training seed), and the rank correlations with permutation p-values
    environment   the software the searches ran with
    figure        what=drops|alpha|skips|drop_vs_accuracy (alpha: target=...); the PNGs go to the
                  page's folder (docs/results/PAGE/), the block holds their links
"""

from __future__ import annotations

import json
import math
import re
import shlex
import statistics
from collections import defaultdict
from pathlib import Path

from nas.metrics import DISCRETIZED_ACC, DROP, DROP_BN_RECAL, KEPT_EDGE_SHARE, MAX_OP_WEIGHT, SUPERNET_ACC
from nas.ops import op_list

from .export import Study, load_study
from .names import skip_connect_keys
from .report import (
    TrialRecord,
    _method_key,
    _number,
    _target_key,
    environment_text,
    final_skip_table,
    markdown_table,
    plot_drop_vs_error,
    plot_drops,
    plot_skip_counts,
    report_text,
    retrained,
    summarise,
    table4,
    trial_records,
)
from .statistics import correlation_interval, correlation_p, difference, spearman

BLOCK = re.compile(r"<!-- generated: (?P<spec>[^\n]+?) -->\n(?P<body>.*?)<!-- end generated -->", re.S)
LABELS = {SUPERNET_ACC: "supernet", DISCRETIZED_ACC: "discretized", DROP: "drop", DROP_BN_RECAL: "drop BN recal",
          KEPT_EDGE_SHARE: "kept edge share", MAX_OP_WEIGHT: "max op weight",
          "cifar10_test_error": "retrained test error"}  # fmt: skip


class Pages:
    """The studies' exports under `data_dir`, each read once."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self._studies: dict[str, tuple[Study, list[TrialRecord], list[TrialRecord]]] = {}

    def study(self, name: str) -> tuple[Study, list[TrialRecord], list[TrialRecord]]:
        if name not in self._studies:
            path = self.data_dir / f"{name}.json"
            if not path.exists():
                raise LookupError(f"no export {path}: python sweeps/report.py {name} --export {path}")
            study = load_study(path)
            self._studies[name] = (study, *trial_records(study))
        return self._studies[name]

    def render(self, spec: str, figures: Path) -> str:
        words = shlex.split(spec)
        name, view, options = words[0], words[1], dict(w.split("=", 1) for w in words[2:])
        study, finished, other = self.study(name)
        rows = summarise(finished)
        if view == "summary":
            return report_text(name, finished, other, "rows").split("\n\n")[1] + "\n"
        if view == "table4":
            return table4(rows) + "\n"
        if view == "table":
            return markdown_table(rows) + "\n"
        if view == "seeds":
            return seed_table(finished, _metrics(options)) + "\n"
        if view == "differences":
            return differences_table(finished, options["base"], options.get("metric", DROP)) + "\n"
        if view == "kinds":
            return kinds_text(finished, options["method"], options.get("metric", DROP)) + "\n"
        if view == "correlation":
            return correlation_text(finished, options["method"], options["x"], options["y"]) + "\n"
        if view == "skips":
            return final_skip_table(skip_histories(study, finished)) + "\n"
        if view == "retrained":
            return retrained_text(finished) + "\n"
        if view == "environment":
            return environment_text(finished) + "\n"
        if view == "figure":
            return figure(study, finished, rows, options, figures, name) + "\n"
        raise ValueError(f"unknown view {view!r} in <!-- generated: {spec} -->")


def _metrics(options: dict[str, str]) -> list[str]:
    return (
        options["metrics"].split(",") if "metrics" in options else [SUPERNET_ACC, DISCRETIZED_ACC, DROP, DROP_BN_RECAL]
    )


def _ordered(trials: list[TrialRecord]) -> list[TrialRecord]:
    return sorted(trials, key=lambda t: (_target_key(t.target), _method_key(t.method), int(t.seed)))


def seed_table(trials: list[TrialRecord], metrics: list[str]) -> str:
    lines = ["| method | target | seed | " + " | ".join(LABELS.get(m, m) for m in metrics) + " |"]
    lines.append("|" + "|".join("---" for _ in range(3 + len(metrics))) + "|")
    for t in _ordered(trials):
        digits = [3 if m in (MAX_OP_WEIGHT, KEPT_EDGE_SHARE) else 2 for m in metrics]
        cells = [f"{t.metrics[m]:.{d}f}" if m in t.metrics else "-" for m, d in zip(metrics, digits)]
        lines.append(f"| {t.method} | {t.target} | {t.seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences_table(trials: list[TrialRecord], base: str, metric: str) -> str:
    """Every (method, target) group against the base group on `metric`."""
    method, target = base.split("|")
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for t in trials:
        if metric in t.metrics:
            groups[(t.method, t.target)].append(t.metrics[metric])
    reference = groups.get((method, target))
    if not reference:
        raise LookupError(f"no trials of {method} under {target} to compare with")
    label = LABELS.get(metric, metric)
    lines = [f"Against {method} under {target} ({label} {statistics.fmean(reference):.2f}, n = {len(reference)}):\n",
             f"| method | target | n | {label} | difference, 95 % interval | permutation p |", "|---|---|---|---|---|---|"]  # fmt: skip
    for key in sorted(groups, key=lambda k: (_target_key(k[1]), _method_key(k[0]))):
        if key == (method, target):
            continue
        values = groups[key]
        d = difference(values, reference)
        interval = "-" if d.low != d.low else f"[{d.low:+.2f}, {d.high:+.2f}]"
        lines.append(f"| {key[0]} | {key[1]} | {len(values)} | {statistics.fmean(values):.2f} | "
                     f"{d.estimate:+.2f} {interval} | {d.p:.3g} |")  # fmt: skip
    return "\n".join(lines)


def kinds_text(trials: list[TrialRecord], method: str, metric: str) -> str:
    """One method's per-node against its per-cell targets, every search pooled by kind."""
    per_node = [
        t.metrics[metric] for t in trials if t.method == method and " of " not in t.target and metric in t.metrics
    ]
    per_cell = [t.metrics[metric] for t in trials if t.method == method and " of " in t.target and metric in t.metrics]
    d = difference(per_cell, per_node)
    label = LABELS.get(metric, metric)
    return (
        f"{method}, {label}: per-cell targets {statistics.fmean(per_cell):.2f} (range {min(per_cell):.2f} to "
        f"{max(per_cell):.2f}, n = {len(per_cell)}), per-node targets {statistics.fmean(per_node):.2f} (range "
        f"{min(per_node):.2f} to {max(per_node):.2f}, n = {len(per_node)}); difference {d.describe()}."
    )


def correlation_text(trials: list[TrialRecord], method: str, x: str, y: str) -> str:
    """Rank correlation of two metrics over one method's searches: all targets, then per-cell ones."""
    parts = []
    for label, keep in (("every target", lambda t: True), ("per-cell targets", lambda t: " of " in t.target)):
        pairs = [(t.metrics[x], t.metrics[y]) for t in trials
                 if t.method == method and keep(t) and x in t.metrics and y in t.metrics]  # fmt: skip
        parts.append(f"{label}: {_correlation(pairs)}")
    return (
        f"{method}, Spearman's ρ of {LABELS.get(x, x)} with {LABELS.get(y, y)} (two-sided permutation p): "
        + "; ".join(parts)
        + "."
    )


def skip_histories(study: Study, trials: list[TrialRecord]) -> dict[str, dict[str, dict[int, float]]]:
    """method -> level -> epoch -> skip_connect count, averaged over the method's trials."""
    runs = {run.run_id: run for run in study.trials}
    sums: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for trial in trials:
        curves = runs[trial.run_id].curves
        for level, key in skip_connect_keys(curves).items():
            for step, value in curves[key]:
                sums[trial.method][level][step].append(value)
    return {
        method: {level: {s: statistics.fmean(v) for s, v in sorted(steps.items())} for level, steps in levels.items()}
        for method, levels in sums.items()
    }


def retrained_text(trials: list[TrialRecord], dataset: str = "cifar10") -> str:
    """Per retrained architecture: its search's metrics, its test accuracy per training seed and
    their mean; then the rank correlation of each search metric with the mean test accuracy, with
    its permutation p-value, and the training noise beside the spread between architectures."""
    found = retrained(trials, dataset)
    if not found:
        return ""
    seeds = max(len(t.retrained.get(dataset, [])) for t in found)
    header = (
        "| method | seed | supernet | discretized | drop | drop BN recal | "
        + " | ".join(f"test acc (training seed {i})" for i in range(seeds))
        + " | mean test acc |"
    )
    lines = [header, "|" + "|".join("---" for _ in range(7 + seeds)) + "|"]
    for t in _ordered(found):
        accs = [100 - e for e in t.retrained.get(dataset, [])]
        cells = [_number(t.metrics.get(m)) for m in (SUPERNET_ACC, DISCRETIZED_ACC, DROP, DROP_BN_RECAL)]
        lines.append(f"| {t.method} | {t.seed} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{a:.2f}" for a in accs) + f" | {statistics.fmean(accs):.2f} |")  # fmt: skip
    accuracy = [100 - t.metrics[f"{dataset}_test_error"] for t in found]
    lines += ["", f"Rank correlation with the mean retrained test accuracy over the {len(found)} architectures "
              "(Spearman's ρ, its approximate 95 % interval, two-sided permutation p):", ""]  # fmt: skip
    for metric in (DROP, DROP_BN_RECAL, SUPERNET_ACC, DISCRETIZED_ACC):
        pairs = [(t.metrics[metric], a) for t, a in zip(found, accuracy) if metric in t.metrics]
        lines.append(f"- {LABELS[metric]}: {_correlation(pairs, interval=True)}")
    noise = [
        statistics.stdev(100 - e for e in t.retrained[dataset]) for t in found if len(t.retrained.get(dataset, [])) > 1
    ]
    if noise and len(accuracy) > 1:
        lines += ["", f"Training noise: the std of an architecture's test accuracy over its training seeds is "
                  f"{statistics.fmean(noise):.2f} on average (range {min(noise):.2f}-{max(noise):.2f}); the std of the "
                  f"mean accuracies across the architectures is {statistics.stdev(accuracy):.2f}."]  # fmt: skip
    return "\n".join(lines)


def _correlation(pairs: list[tuple[float, float]], interval: bool = False) -> str:
    """Spearman's ρ of the pairs (with its approximate 95 % interval if asked), its permutation p, n."""
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    rho = spearman(xs, ys)
    low, high = correlation_interval(rho, len(pairs)) if interval else (math.nan, math.nan)
    shown = "" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]"
    return f"ρ = {_number(rho)}{shown}, p = {_p(correlation_p(xs, ys))} (n = {len(pairs)})"


def _p(value: float) -> str:
    return "-" if value != value else f"{value:.3g}"


def figure(study: Study, trials, rows, options: dict[str, str], folder: Path, name: str) -> str:
    from nas.plots import plot_alpha_evolution, plot_edge_weights

    folder.mkdir(parents=True, exist_ok=True)
    what = options["what"]
    prefix = folder.name  # the page's folder, beside the page
    if what == "drops":
        plot_drops(rows, folder / "drops.png", name)
        return f"![accuracy drops]({prefix}/drops.png)"
    if what == "skips":
        plot_skip_counts(skip_histories(study, trials), folder / "skip_connect.png", f"{name}: skip_connect per level")
        return f"![skip_connect per level]({prefix}/skip_connect.png)"
    if what == "drop_vs_accuracy":
        plot_drop_vs_error(trials, folder / "drop_vs_accuracy.png", name)
        return f"![drop against retrained accuracy]({prefix}/drop_vs_accuracy.png)"
    if what == "alpha":
        runs = {run.run_id: run for run in study.trials}
        links = []
        for method in sorted({t.method for t in trials}, key=_method_key):
            chosen = [t for t in trials if t.method == method and t.target == options["target"]]
            if not chosen:
                continue
            trial = min(chosen, key=lambda t: int(t.seed))
            run = runs[trial.run_id]
            if not run.history:
                raise LookupError(
                    f"the export of {name} has no alpha history for {trial.name}: export with --alpha-plots"
                )
            ops = op_list(
                json.loads(trial.params["ops"]) if trial.params["ops"].startswith("[") else trial.params["ops"]
            )
            nodes = int(trial.params.get("model.nodes", 4))
            slug = "".join(c if c.isalnum() else "-" for c in method).strip("-")
            for level in run.history[-1]["softmax_alpha"]:
                path = folder / f"alpha_{slug}_{level}.png"
                plot_alpha_evolution(
                    run.history,
                    ops,
                    level,
                    nodes,
                    path,
                    f"{method}: softmax(alpha) per edge, {level} cells, seed {trial.seed}",
                )
                links.append(f"![{method} alpha {level}]({prefix}/{path.name})")
                if "edge_weights" in run.history[-1]:
                    path = folder / f"edge_weights_{slug}_{level}.png"
                    plot_edge_weights(
                        run.history, level, nodes, path, f"{method}: edge weights, {level} cells, seed {trial.seed}"
                    )
                    links.append(f"![{method} edge weights {level}]({prefix}/{path.name})")
        return "\n".join(links)
    raise ValueError(f"unknown figure {what!r}")


def regenerate(page: Path, data_dir: Path, check: bool = False, pages: Pages | None = None) -> list[str]:
    """Rewrites `page`'s generated blocks (and their figures) from the exports; returns the specs of
    the blocks whose content changed. With `check`, writes nothing (figures included)."""
    import tempfile

    pages = pages or Pages(data_dir)
    text = page.read_text()
    changed = []
    folder = page.with_suffix("")
    with tempfile.TemporaryDirectory() as scratch:

        def fill(match: re.Match) -> str:
            spec = match.group("spec")
            body = pages.render(spec, Path(scratch) / folder.name if check else folder)
            if body != match.group("body"):
                changed.append(spec)
            return f"<!-- generated: {spec} -->\n{body}<!-- end generated -->"

        new = BLOCK.sub(fill, text)
    if not check and new != text:
        page.write_text(new)
    return changed
