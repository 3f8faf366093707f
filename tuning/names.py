"""The names a sweep writes and reads, in one place: MLflow metric names, the tags of runs, the
colour of each method, and the keys of a trial's result.

Metric names. The search reports flat names (`valid_acc`, `discretized_acc`, `skip_connect/normal`,
...; nas/metrics.py owns them), which Ray Tune, the sweep's objectives and the schedulers use.
MLflow gets one name per quantity, the same over the epochs and at the end, grouped by the prefix
before the `/` (the UI's chart sections, sorted by name): `accuracy/` (supernet, discretized, drop)
comes first, then the same after BN recalibration and with unit edge weights, then `architecture/`,
`loss/`, `network/` (parameters in millions), `optim/` and `time/`. An evaluation's metrics follow
the same scheme (`error/test_top1`, `loss/train`, ...). Values are rounded to 5 significant digits
(no `21.299999999999997`). `report_names` maps MLflow's names back (old stores' names pass through).
A search derived under further targets (docs/science.md D14) reports their metrics as
`discretized_acc@3of14`; MLflow, whose names cannot hold `@`, gets `accuracy/discretized:3of14`
(the target's slug after a colon, so that each quantity's targets sort side by side).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from nas import metrics as m

# nas name (the one Ray Tune, objectives and the report use) -> MLflow name. Final and per-epoch
# values of one quantity share a name.
METRIC_NAMES = {
    m.VALID_ACC: "accuracy/supernet",
    m.SUPERNET_ACC: "accuracy/supernet",
    m.DISCRETIZED_ACC: "accuracy/discretized",
    m.DROP: "accuracy/drop",
    m.TRAIN_ACC: "accuracy/supernet_train",
    m.SUPERNET_BN_RECAL_ACC: "accuracy_bn_recal/supernet",
    m.DISCRETIZED_BN_RECAL_ACC: "accuracy_bn_recal/discretized",
    m.DROP_BN_RECAL: "accuracy_bn_recal/drop",
    m.DISCRETIZED_UNIT_EDGES_ACC: "accuracy_unit_edges/discretized",
    m.DROP_UNIT_EDGES: "accuracy_unit_edges/drop",
    m.DISCRETIZED_UNIT_EDGES_BN_RECAL_ACC: "accuracy_unit_edges/discretized_bn_recal",
    m.DROP_UNIT_EDGES_BN_RECAL: "accuracy_unit_edges/drop_bn_recal",
    m.MAX_OP_WEIGHT: "architecture/max_op_weight",
    m.KEPT_EDGE_SHARE: "architecture/kept_edge_share",
    m.PARAMS: "network/params_M",
    m.TRAIN_LOSS: "loss/train",
    m.VALID_LOSS: "loss/supernet",
    m.ARCH_CE: "loss/arch_ce",
    m.LR: "optim/lr",
    m.ALPHA_LR: "optim/alpha_lr",
    m.BETA_LR: "optim/beta_lr",
    m.SECONDS: "time/epoch_seconds",
    "search_seconds": "time/search_seconds",  # the trial's (tuning.trainable)
}
# An evaluation's metrics (nas/evaluate.py), per epoch and final, in the same scheme.
EVAL_METRIC_NAMES = {
    m.TEST_TOP1_ERROR: "error/test_top1",
    m.TEST_TOP5_ERROR: "error/test_top5",
    m.TEST_LOSS: "loss/test",
    m.TRAIN_LOSS: "loss/train",
    m.TRAIN_ACC: "accuracy/train",
    m.LR: "optim/lr",
    m.DROP_PATH: "optim/drop_path",
    m.SECONDS: "time/epoch_seconds",
    m.PARAMS: "network/params_M",
    m.MACS: "network/macs_M",
}
# Per-level diagnostics: `skip_connect/normal` -> `architecture/skip_connect_normal`.
LEVEL_METRICS = {m.SKIP_CONNECT: "skip_connect", m.OP_ENTROPY_PER_EDGE: "op_entropy", m.MAX_OP_WEIGHT: "max_op_weight"}
SCALE = {m.PARAMS: 1e-6, m.MACS: 1e-6}
# MLflow name -> the name the report and the trainable read (the final value's name).
REPORT_NAMES = {
    **{mlflow: name for name, mlflow in METRIC_NAMES.items() if name != m.VALID_ACC},
}
HEADLINE = ("accuracy/discretized", "accuracy/drop", "accuracy/supernet", "accuracy_bn_recal/drop", "network/params_M")

METHOD_COLOURS = {"darts": "#d62728", "da2s": "#1f77b4", "multilevel": "#2ca02c"}
# Further methods (labels from `method_label`) take these, by a hash of their name.
PALETTE = ("#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939")
SWEEP_COLOUR = "#555555"
NOTE_TAG = "mlflow.note.content"
COLOUR_TAG = "mlflow.runColor"
# A trial derived under further targets: JSON {slug: target}, how the report finds their metrics.
DERIVED_TARGETS_TAG = "derived_targets"
PARENT_TAG = "mlflow.parentRunId"
FAILURE_TAG = "failure"  # why a run ended FAILED (with `diverged` = true for a divergence)
# Tags of the software a run came from (nas/environment.py): environment.python, environment.torch, ...
ENVIRONMENT_PREFIX = "environment."


def significant(value: float, digits: int = 5) -> float:
    return float(f"{value:.{digits}g}")


def mlflow_name(name: str) -> str:
    base, slug = m.split_derived(name)
    if slug:
        return f"{mlflow_name(base)}:{slug}"
    if name in METRIC_NAMES:
        return METRIC_NAMES[name]
    head, _, level = name.partition("/")
    if level and head in LEVEL_METRICS:
        return f"architecture/{LEVEL_METRICS[head]}_{level}"
    if name.startswith(m.LOSS_WEIGHT_PREFIX):
        return f"loss_weight/{name.removeprefix(m.LOSS_WEIGHT_PREFIX)}"
    if name.startswith(m.PHASE_SECONDS_PREFIX):  # the epoch's phases
        return f"time/{name.removeprefix(m.PHASE_SECONDS_PREFIX)}_seconds"
    return name


def mlflow_metrics(metrics: Mapping[str, Any], loss_terms: tuple[str, ...] = ()) -> dict[str, float]:
    """Finite numeric metrics under their MLflow names, scaled (parameters in millions) and rounded."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        key = f"loss/{name}" if name in loss_terms else mlflow_name(name)
        out[key] = significant(float(value) * SCALE.get(m.split_derived(name)[0], 1.0))
    return out


def report_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """MLflow metrics under the names the report uses (`discretized_acc`, `params` as a count,
    `skip_connect/normal`); a store written with those names reads the same."""
    out = dict(metrics)
    for key, value in metrics.items():
        base, colon, slug = key.partition(":")
        name = REPORT_NAMES.get(base)
        if name is not None and colon:
            out.setdefault(f"{name}@{slug}", value / SCALE.get(name, 1.0))
        elif name is not None:
            out.setdefault(name, value / SCALE.get(name, 1.0))
        elif key.startswith("architecture/skip_connect_"):
            out.setdefault(f"skip_connect/{key[len('architecture/skip_connect_') :]}", value)
    return out


def skip_connect_keys(metric_keys) -> dict[str, str]:
    """level -> the metric holding its skip_connect count over the epochs (new or old name)."""
    found = {}
    for key in metric_keys:
        if key.startswith("architecture/skip_connect_"):
            found[key[len("architecture/skip_connect_") :]] = key
        elif key.startswith("skip_connect/"):
            found.setdefault(key.split("/", 1)[1], key)
    return found


def method_colour(method: str) -> str:
    """One colour per method: fixed for the presets, from a palette by name for other labels."""
    key = method.strip().lower()
    if key in METHOD_COLOURS:
        return METHOD_COLOURS[key]
    return PALETTE[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(PALETTE)]


def eval_mlflow_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation's numeric metrics under their MLflow names (EVAL_METRIC_NAMES), scaled and rounded."""
    return {
        EVAL_METRIC_NAMES.get(name, name): significant(float(value) * SCALE.get(name, 1.0))
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def eval_report_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """An evaluation run's metrics under nas's names (`test_top1_error`, `params` as a count); the
    names of stores written before evaluations were grouped pass through."""
    back = {mlflow: name for name, mlflow in EVAL_METRIC_NAMES.items()}
    out = dict(metrics)
    for key, value in metrics.items():
        if key in back:
            out.setdefault(back[key], value / SCALE.get(back[key], 1.0))
    return out
