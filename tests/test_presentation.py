"""Metric names, colours and links of the MLflow UI (tuning/presentation.py)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlparse

from tuning.names import method_colour, mlflow_metrics, report_names, skip_connect_keys
from tuning.presentation import runs_link, trial_note


def test_one_name_per_quantity_rounded_and_in_millions():
    epoch = {"valid_acc": 21.299999999999997, "discretized_acc": 10.0, "drop": 11.299999999999997,
             "train_acc": 30.1, "skip_connect/normal": 2.0, "op_entropy_per_edge/reduce": 1.94591,
             "weight_op_entropy": 0.0, "op_entropy": 1.7, "lr": 0.024986, "seconds": 3.0, "seconds_train": 2.5}  # fmt: skip
    final = {"supernet_acc": 21.299999999999997, "params": 2_794_123.0, "drop_bn_recal": float("nan")}
    logged = mlflow_metrics(epoch, loss_terms=("op_entropy",))
    assert logged["accuracy/supernet"] == 21.3 and logged["accuracy/drop"] == 11.3
    assert mlflow_metrics(final) == {"accuracy/supernet": 21.3, "network/params_M": 2.7941}
    assert logged["architecture/skip_connect_normal"] == 2.0 and logged["architecture/op_entropy_reduce"] == 1.9459
    assert logged["loss/op_entropy"] == 1.7 and logged["loss_weight/op_entropy"] == 0.0
    assert logged["time/epoch_seconds"] == 3.0 and logged["time/train_seconds"] == 2.5
    assert all("/" in key for key in logged)
    # The accuracies sort first among the sections the UI builds from the prefixes.
    assert sorted({key.split("/")[0] for key in logged})[0] == "accuracy"


def test_derived_targets_have_their_own_names_that_mlflow_accepts_and_the_report_reads_back():
    from mlflow.utils.validation import _validate_metric_name

    logged = mlflow_metrics({"discretized_acc@3of14": 12.345678, "params@1-1-2-3": 1_500_000.0, "drop": 1.0})
    assert logged == {"accuracy/discretized:3of14": 12.346, "network/params_M:1-1-2-3": 1.5, "accuracy/drop": 1.0}
    for name in logged:
        _validate_metric_name(name)  # MLflow refuses "@" in names; a colon is allowed
    back = report_names(logged)
    assert back["discretized_acc@3of14"] == 12.346 and back["params@1-1-2-3"] == 1_500_000
    assert back["drop"] == 1.0 and "discretized_acc" not in back


def test_report_reads_new_and_old_names():
    new = report_names({"accuracy/discretized": 30.0, "network/params_M": 2.5, "architecture/skip_connect_normal": 1})
    assert new["discretized_acc"] == 30.0 and new["params"] == 2_500_000 and new["skip_connect/normal"] == 1
    old = report_names({"discretized_acc": 28.0, "params": 3e6})
    assert old["discretized_acc"] == 28.0 and old["params"] == 3e6
    assert skip_connect_keys(["skip_connect/normal", "architecture/skip_connect_normal", "x"]) == {
        "normal": "architecture/skip_connect_normal"
    }


def test_colours_links_and_notes():
    assert method_colour("darts") != method_colour("da2s")
    assert method_colour("stage, H=0.1") == method_colour("stage, H=0.1") != method_colour("shared, H=0.1")
    link = runs_link("http://127.0.0.1:5000/", "7", chart=True)
    parsed = urlparse(link)
    assert parsed.fragment.startswith("/experiments/7/runs?")
    query = parse_qs(parsed.fragment.split("?", 1)[1])
    assert query == {
        "workflowType": ["machine_learning"],
        "viewStateShareKey": ["trials"],
        "compareRunsMode": ["CHART"],
    }
    note = trial_note("abc", "da2s", "[2, 2, 2, 2]", 4, {"supernet_acc": 27.6, "discretized_acc": 28.4,
                      "drop": -0.8, "params": 2.79e6}, "normal: ...", {"normal": "cells/cell_normal.png"})  # fmt: skip
    assert (
        "| stored BN statistics | 27.60 | 28.40 | -0.80 |" in note and "| after BN recalibration | - | - | - |" in note
    )
    assert "**2.79 M** parameters" in note and "(get-artifact?path=cells%2Fcell_normal.png&run_uuid=abc)" in note


def test_report_counts_a_folded_trial_once_per_target(tmp_path):
    """A DARTS trial derived under a further target (docs/science.md D14) is one run in MLflow and
    one record per target in the report, each with that target's metrics."""
    from mlflow.tracking import MlflowClient

    from tuning.names import DERIVED_TARGETS_TAG
    from tuning.report import load_trials, summarise

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("folded", artifact_location=str(tmp_path / "artifacts"))
    runs = {}
    for method, target, derived in (("darts", "[2, 2, 2, 2]", {"3of14": "3 of 14"}), ("da2s", "3 of 14", {})):
        run = client.create_run(experiment, tags={"kind": "trial"})
        for key, value in {"method": method, "target": target, "seed": "1"}.items():
            client.log_param(run.info.run_id, key, value)
        final = {"supernet_acc": 40.0, "discretized_acc": 30.0, "drop": 10.0, "params": 2e6}
        final.update({f"{k}@{slug}": v - 20 for slug in derived for k, v in final.items() if k != "supernet_acc"})
        final.update({f"supernet_acc@{slug}": 40.0 for slug in derived})
        for key, value in mlflow_metrics(final).items():
            client.log_metric(run.info.run_id, key, value)
        if derived:
            client.set_tag(run.info.run_id, DERIVED_TARGETS_TAG, json.dumps(derived))
        client.set_terminated(run.info.run_id, "FINISHED")
        runs[method] = run.info.run_id
    finished, other = load_trials(client.tracking_uri, "folded")
    assert not other and sorted((t.method, t.target) for t in finished) == [
        ("da2s", "3 of 14"), ("darts", "3 of 14"), ("darts", "[2, 2, 2, 2]")
    ]  # fmt: skip
    rows = {(r.method, r.target): r for r in summarise(finished)}
    assert rows[("darts", "3 of 14")].stat("discretized_acc") == (10.0, 0.0)
    assert rows[("darts", "3 of 14")].stat("supernet_acc") == (40.0, 0.0)
    assert rows[("darts", "[2, 2, 2, 2]")].stat("discretized_acc") == (30.0, 0.0)
    assert {t.run_id for t in finished if t.method == "darts"} == {runs["darts"]}


def test_the_report_plots_paint_each_method_in_its_ui_colour(tmp_path, monkeypatch):
    """One owner of a method's colour (tuning/names.py): the runs' colour in the UI and the report's bars."""
    from matplotlib.axes import Axes

    from tuning.report import Row, plot_drops

    painted = []
    bar = Axes.bar
    monkeypatch.setattr(
        Axes, "bar", lambda self, *a, **k: painted.append((k["label"], k["color"])) or bar(self, *a, **k)
    )
    rows = [Row(method, "[2, 2, 2, 2]", 1, {"drop": [1.0], "drop_bn_recal": [1.0]}) for method in ("darts", "da2s")]
    plot_drops(rows, tmp_path / "drops.png")
    assert set(painted) == {("darts", method_colour("darts")), ("da2s", method_colour("da2s"))}
    assert method_colour("darts") == "#d62728" and method_colour("da2s") == "#1f77b4"  # DARTS red, DA2S blue
