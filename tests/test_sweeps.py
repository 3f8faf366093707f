"""Sweeps end to end: a real local Ray instance, real Optuna samplers and a real MLflow store,
read back after the run."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import descendants, real_data_root, tiny_search_config, tiny_sweep_config
from mlflow.tracking import MlflowClient

from nas.search import run_search
from nas.settings import SearchConfig
from tuning.config import SweepConfig
from tuning.export import load_study
from tuning.report import load_trials, markdown_table, summarise, table4, trial_records

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    from tuning.sweep import _init_ray

    _init_ray(None)
    yield
    ray.shutdown()


def sweep_dict(tmp_path: Path, name: str, **changes) -> dict:
    stores = {"storage": str(tmp_path / "ray"), "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    return tiny_sweep_config(name, **{"concurrency": 2, **stores, **changes})


@pytest.fixture(scope="module")
def e2e_sweep(tmp_path_factory, local_ray):
    """A finished sweep: DARTS and DA²S under two targets, DA²S's beta lr a conditional grid
    dimension that makes two DA²S trials diverge, DARTS searched once and derived under both
    targets (a folded target), an evaluation stage."""
    from tuning.sweep import run_sweep

    tmp_path = tmp_path_factory.mktemp("e2e")
    # beta.lr 1e30 overflows DA2S's beta (Adam's weight-decay term squared); DARTS has no beta.
    space = {
        "preset": {"choices": ["darts", "da2s"]},
        "beta.lr": {"choices": [3e-4, 1e30], "when": {"preset": "da2s"}},
        "target": {"choices": ["[2, 2, 2, 2]", "3 of 14"], "fold": True},
    }
    settings = {"epochs": 1, "layers": 5, "channels": 8, "batch_size": 64, "device": "cpu",
                "data": {"subset": 256, "test_subset": 128, "synthetic": real_data_root() is None, "download": False}}  # fmt: skip
    evaluate = {"top": 2, "by": "discretized_acc", "settings": settings}
    description = "DARTS against DA²S on a tiny search."
    sweep = SweepConfig.from_dict(sweep_dict(tmp_path, "e2e", space=space, evaluate=evaluate, description=description))
    return run_sweep(sweep, base_dir=tmp_path), tmp_path


@pytest.mark.slow
def test_sweep_logs_parent_trials_metrics_and_artifacts(e2e_sweep):
    outcome, tmp_path = e2e_sweep

    statuses = sorted(
        (t.params["preset"], t.params.get("beta.lr"), t.params["target"], t.params.get("derive_targets"), t.status)
        for t in outcome.trials
    )
    assert statuses == [
        ("da2s", 3e-4, "3 of 14", None, "TERMINATED"),
        ("da2s", 3e-4, "[2, 2, 2, 2]", None, "TERMINATED"),
        ("da2s", 1e30, "3 of 14", None, "DIVERGED"),
        ("da2s", 1e30, "[2, 2, 2, 2]", None, "DIVERGED"),
        ("darts", None, "[2, 2, 2, 2]", ["3 of 14"], "TERMINATED"),  # one search for both targets
    ]
    diverged = next(t for t in outcome.trials if t.status == "DIVERGED")
    assert "NaN or infinite" in diverged.error

    client = MlflowClient(outcome.tracking_uri)
    runs = client.search_runs([outcome.experiment_id])
    parent = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED" and len(trials) == 5
    assert "interrupted" not in parent[0].data.tags
    assert parent[0].data.metrics["trials_finished"] == 3 and "best_discretized_acc" in parent[0].data.metrics
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {outcome.parent_run_id}
    # The software every run came from: the sweep's and each trial's, the same on one machine.
    environment = {k: v for k, v in parent[0].data.tags.items() if k.startswith("environment.")}
    for package in ("torch", "numpy", "ray", "optuna", "mlflow"):
        assert environment[f"environment.{package}"] == metadata.version(package)
    assert len(environment["environment.commit"]) >= 40 or environment["environment.commit"] == "unknown"
    for run in trials:
        assert {k: v for k, v in run.data.tags.items() if k.startswith("environment.")} == environment
    failed = [r for r in trials if r.info.status == "FAILED"]
    assert len(failed) == 2 and "NaN or infinite" in failed[0].data.tags["failure"]
    for run in trials:
        if run.info.status == "FAILED":
            continue
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["method"] == params["preset"] and params["target"] in ("[2, 2, 2, 2]", "3 of 14")
        assert params["model.channels"] == "4" and params["epochs"] == "2" and "arch_lr_scale_effective" in params
        assert params["threads"] == "1"  # resources: {cpu: 1}: the trial computes on one thread
        # One name per quantity, over the epochs and at the end, in sections that put the
        # accuracies first; parameters in millions; values without float noise.
        metrics = run.data.metrics
        for metric in (
            "accuracy/supernet",
            "accuracy/discretized",
            "accuracy/drop",
            "accuracy_bn_recal/discretized",
            "accuracy_bn_recal/drop",
            "network/params_M",
        ):
            assert metric in metrics, metric
        assert not {"valid_acc", "supernet_acc", "discretized_acc", "drop", "params"} & set(metrics)
        assert min(sorted({k.split("/")[0] for k in metrics if "/" in k})) == "accuracy"
        assert all("/" in k for k in metrics), [k for k in metrics if "/" not in k]
        assert 0.1 < metrics["network/params_M"] < 10
        assert all(v == float(f"{v:.5g}") for v in metrics.values())
        for name in ("accuracy/supernet", "accuracy/discretized", "accuracy/drop"):
            history = client.get_metric_history(run.info.run_id, name)
            assert sorted(m.step for m in history) == [1, 2], name  # per epoch; the final value is epoch 2's
        assert metrics["accuracy/drop"] == pytest.approx(
            metrics["accuracy/supernet"] - metrics["accuracy/discretized"], abs=1e-3
        )
        assert {"architecture/skip_connect_normal", "architecture/skip_connect_reduce"} <= set(metrics)
        # Coloured by method; a description with the accuracies, the size and both cells inline.
        tags = run.data.tags
        assert tags["mlflow.runColor"] == {"darts": "#d62728", "da2s": "#1f77b4"}[params["method"]]
        note = tags["mlflow.note.content"]
        assert f"**{params['method']}**, target {params['target']}" in note
        assert f"| stored BN statistics | {metrics['accuracy/supernet']:.2f} | " in note
        assert f"{metrics['accuracy_bn_recal/drop']:.2f} |" in note and "after BN recalibration" in note
        assert f"**{metrics['network/params_M']:.2f} M** parameters" in note
        images = {a.path.split("/")[1].split("+")[0] for a in client.list_artifacts(run.info.run_id, "images")}
        for level in ("normal", "reduce"):
            assert f"(get-artifact?path=cells%2Fcell_{level}.png&run_uuid={run.info.run_id})" in note
            assert f"cell_{level}" in images  # the compare view's image grid of the cells
        top = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"genotype.json", "config.json", "result.json", "cells", "plots"} <= top
        stored = json.loads(Path(client.download_artifacts(run.info.run_id, "result.json", str(tmp_path))).read_text())
        assert stored["environment"]["numpy"] == metadata.version("numpy") and "cudnn" in stored["environment"]
        cells = {a.path for a in client.list_artifacts(run.info.run_id, "cells")}
        assert cells == {"cells/cell_normal.png", "cells/cell_reduce.png"}
        genotype = json.loads(
            Path(client.download_artifacts(run.info.run_id, "genotype.json", str(tmp_path))).read_text()
        )
        assert sum(len(node) for node in genotype["levels"]["normal"]["nodes"]) == (
            8 if params["target"] == "[2, 2, 2, 2]" else 3
        )
        if params["method"] == "darts":
            # Derived under the folded target's other choice: its metrics under their own names, its
            # genotype and cells under derive/3of14/, a row in the description.
            assert json.loads(tags["derived_targets"]) == {"3of14": "3 of 14"}
            for metric in ("accuracy/discretized", "accuracy/drop", "accuracy_bn_recal/drop", "network/params_M"):
                assert f"{metric}:3of14" in metrics, metric
            assert metrics["accuracy/supernet:3of14"] == metrics["accuracy/supernet"]
            derived = json.loads(
                Path(
                    client.download_artifacts(run.info.run_id, "derive/3of14/genotype.json", str(tmp_path))
                ).read_text()
            )
            assert sum(len(node) for node in derived["levels"]["normal"]["nodes"]) == 3
            assert (
                f"| 3 of 14 | {metrics['accuracy/discretized:3of14']:.2f} | {metrics['accuracy/drop:3of14']:.2f} |"
                in note
            )
            darts_run = run

    # The evaluation stage: the two best trials by discretized accuracy, each a child of its trial's run.
    evaluations = [r for r in runs if r.data.tags.get("kind") == "evaluation"]
    best = sorted((t for t in outcome.trials if t.status == "TERMINATED"), key=lambda t: -t.metrics["discretized_acc"])[
        :2
    ]
    assert len(evaluations) == 2 and all(r.info.status == "FINISHED" for r in evaluations)
    assert {r.data.tags["mlflow.parentRunId"] for r in evaluations} == {t.metrics["mlflow_run_id"] for t in best}
    for run in evaluations:
        assert run.data.params["layers"] == "5" and run.data.tags["dataset"] == "cifar10"
        assert run.data.params["threads"] == "1"  # evaluate.resources: {cpu: 1}: one thread
        # the trials' grouped naming: error/, loss/, network/ (parameters in millions)
        assert all("/" in k for k in run.data.metrics), sorted(run.data.metrics)
        assert 0 <= run.data.metrics["error/test_top1"] <= 100 and run.data.metrics["network/params_M"] > 0
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/train")] == [1]
        assert {"result.json", "genotype.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert sorted(e.status for e in outcome.evaluations) == ["FINISHED", "FINISHED"]

    # The sweep's run: the report's table and drop plot; the experiment: a description and the view.
    (sweep_run,) = parent
    assert "drops.png" in {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
    note = sweep_run.data.tags["mlflow.note.content"]
    assert "DARTS against DA²S on a tiny search." in note and "4 finished trials from 3 searches" in note
    assert "| darts | [2, 2, 2, 2] | 1 |" in note and "| darts | 3 of 14 | 1 |" in note
    assert f"(get-artifact?path=drops.png&run_uuid={sweep_run.info.run_id})" in note
    experiment = client.get_experiment(outcome.experiment_id)
    assert "DARTS against DA²S" in experiment.tags["mlflow.note.content"]
    view = json.loads(experiment.tags["mlflow.sharedViewState.trials"])
    state = json.loads(view["state"])
    assert state["searchFilter"] == "tags.kind = 'trial'"
    assert state["selectedColumns"][:4] == ["params.`method`", "params.`target`", "params.`seed`",
                                            "metrics.`accuracy/discretized`"]  # fmt: skip
    done = next(r for r in trials if r.info.status == "FINISHED")
    assert all(c["metricKey"] in done.data.metrics for c in state["compareRunCharts"] if "metricKey" in c)

    finished, other = load_trials(outcome.tracking_uri, "e2e")
    assert len(finished) == 4 and len(other) == 2
    rows = {(r.method, r.target): r for r in summarise(finished)}
    assert {key: row.n for key, row in rows.items()} == {
        ("darts", "[2, 2, 2, 2]"): 1, ("darts", "3 of 14"): 1, ("da2s", "[2, 2, 2, 2]"): 1, ("da2s", "3 of 14"): 1
    }  # fmt: skip
    folded = darts_run.data.metrics
    assert rows[("darts", "3 of 14")].stat("discretized_acc")[0] == folded["accuracy/discretized:3of14"]
    assert rows[("darts", "[2, 2, 2, 2]")].stat("discretized_acc")[0] == folded["accuracy/discretized"]
    table = table4(list(rows.values()))
    assert "darts supernet" in table and "da2s drop" in table
    assert "CIFAR-10 test error" in markdown_table(list(rows.values()))

    # The published study's report: tables, drops, skip_connect counts, alpha and beta plots.
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "sweeps" / "report.py"), "e2e",
         "--tracking-uri", outcome.tracking_uri, "--out", str(out), "--skips", "--alpha-plots", "[2, 2, 2, 2]",
         "--export", str(tmp_path / "e2e.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = (out / "report.md").read_text()
    # The export reads back as the same study, and gives the same report and plots without MLflow.
    exported = trial_records(load_study(tmp_path / "e2e.json"))

    def content(records):
        return sorted((t.method, t.target, t.seed, sorted(t.metrics.items()), t.retrained) for t in records)

    assert content(exported[0]) == content(finished) and content(exported[1]) == content(other)
    again = tmp_path / "again"
    replay = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "sweeps" / "report.py"), "--from",
         str(tmp_path / "e2e.json"), "--out", str(again), "--skips", "--alpha-plots", "[2, 2, 2, 2]"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    assert (again / "report.md").read_text() == report
    assert {p.name for p in again.glob("*.png")} == {p.name for p in out.glob("*.png")}
    assert "skip_connect ops per level" in report
    assert f"Environment: python {platform.python_version()}, torch {metadata.version('torch')}" in report
    assert f"optuna {metadata.version('optuna')}, mlflow {metadata.version('mlflow')}, commit " in report
    # The evaluated trials: their search drops beside their retrained test accuracies.
    evaluated = sum(e.status == "FINISHED" for e in outcome.evaluations)
    assert "## Search vs. retrained accuracy (cifar10)" in report and f"(n = {evaluated})" in report
    pictures = {p.name for p in out.glob("*.png")}
    assert pictures == {"drops.png", "skip_connect.png", "drop_vs_accuracy.png",
                        "alpha_darts_normal.png", "alpha_darts_reduce.png",
                        "alpha_da2s_normal.png", "alpha_da2s_reduce.png",
                        "edge_weights_da2s_normal.png", "edge_weights_da2s_reduce.png"}  # fmt: skip


@pytest.mark.slow
def test_printed_link_opens_the_trials_table(e2e_sweep, tmp_path):
    """The link `sweeps/ui.py` prints opens the runs table of the trials, in a fresh headless
    Chromium, with method, target, discretized accuracy and drop in each trial's row: no click."""
    from selenium.webdriver.common.by import By

    from tuning.ui import chromium, chromium_missing, free_port, wait_for_text

    missing = chromium_missing()
    if missing:
        pytest.skip(missing)
    outcome, _ = e2e_sweep
    client = MlflowClient(outcome.tracking_uri)
    trials = [r for r in client.search_runs([outcome.experiment_id], "tags.kind = 'trial'")]
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "sweeps" / "ui.py"), "e2e",
         "--tracking-uri", outcome.tracking_uri, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        printed = []
        while not any(line.startswith("Compare:") for line in printed):
            line = ui.stdout.readline()
            assert line, "sweeps/ui.py ended before printing the links:\n" + "".join(printed)
            printed.append(line)
        links = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in printed if ": " in line}
        assert links["Trials"].startswith(f"http://127.0.0.1:{port}/#/experiments/{outcome.experiment_id}/runs?")
        assert "workflowType=machine_learning" in links["Trials"]
        driver = chromium(tmp_path / "profile")
        try:
            driver.get(links["Trials"])
            names = [r.info.run_name for r in trials]
            wait_for_text(driver, ["method", "target", "accuracy/discretized", "accuracy/drop", *names])
            rows = {}
            for row in driver.find_elements(By.CSS_SELECTOR, ".ag-center-cols-container [role=row]"):
                cells = {c.get_attribute("col-id"): c.text for c in row.find_elements(By.CSS_SELECTOR, "[col-id]")}
                rows[row.get_attribute("row-index")] = cells
            pinned = driver.find_elements(By.CSS_SELECTOR, ".ag-pinned-left-cols-container [role=row]")
            names_by_row = {r.get_attribute("row-index"): r.text for r in pinned}
            assert len(names_by_row) == len(rows) == len(trials)
            for run in trials:
                index = next(i for i, text in names_by_row.items() if run.info.run_name in text)
                cells = rows[index]
                assert cells["params.`method`"] == run.data.params["method"]
                assert cells["params.`target`"] == run.data.params["target"]
                if run.info.status == "FINISHED":
                    for name in ("accuracy/discretized", "accuracy/drop"):
                        shown = cells[f"metrics.`{name}`"]
                        assert float(shown) == pytest.approx(run.data.metrics[name], abs=0.01), (name, shown)
            if os.environ.get("UI_SCREENSHOTS"):
                driver.save_screenshot(str(Path(os.environ["UI_SCREENSHOTS"]) / "ui_e2e_trials.png"))
        finally:
            driver.quit()
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()


@pytest.mark.slow
def test_trial_killed_between_its_metrics_and_its_checkpoint_logs_every_epoch_once(tmp_path, local_ray, monkeypatch):
    """The trial's process SIGKILLed at the worst moment: its 2nd epoch's metrics in MLflow, its 2nd
    checkpoint not yet with Ray. Ray retries it from its 1st epoch's checkpoint; the 2nd epoch is
    computed again but not logged again, and the search ends as if never interrupted."""
    from tuning.sweep import run_sweep

    search = tiny_search_config(epochs=4, data={**tiny_search_config()["data"], "subset": 640})
    search.pop("device")
    sweep = SweepConfig.from_dict(
        sweep_dict(
            tmp_path, "kill", search=search, space={"preset": {"choices": ["da2s"]}}, concurrency=1, max_failures=2
        )
    )
    marker = tmp_path / "killed"
    monkeypatch.setenv("NAS_FAULT", f"trial.after-epoch-metrics@2:kill:{marker}")
    outcome = run_sweep(sweep, base_dir=tmp_path)
    assert marker.exists(), "the fault was not injected"
    (trial,) = outcome.trials
    assert trial.status == "TERMINATED"

    client = MlflowClient(outcome.tracking_uri)
    runs = [r for r in client.search_runs([outcome.experiment_id]) if r.data.tags.get("kind") == "trial"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags.get("resumed") == "true"
    for metric in ("accuracy/supernet", "loss/train", "accuracy/discretized"):
        steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, metric))
        assert steps == [1, 2, 3, 4], (metric, steps)

    # The same search never interrupted, on as many threads as the trial had, ends identically.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = run_search(SearchConfig.resolve("da2s", search), artifacts=False)
    finally:
        torch.set_num_threads(threads)
    assert json.loads(trial.metrics["genotype"])["levels"] == straight.genotype.to_dict()["levels"]
    assert trial.metrics["discretized_acc"] == pytest.approx(straight.metrics["discretized_acc"])


@pytest.mark.slow
def test_multi_objective_sweep_with_asha_and_its_report(tmp_path, local_ray):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from tuning.sweep import run_sweep

    search = tiny_search_config(epochs=3)
    search.pop("device")
    sweep = SweepConfig.from_dict(
        sweep_dict(
            tmp_path,
            "moo",
            search=search,
            space={"preset": {"choices": ["darts", "da2s"]}, "seed": {"type": "int", "low": 0, "high": 1000}},
            objective=[{"metric": "discretized_acc", "mode": "max"}, {"metric": "params", "mode": "min"}],
            sampler={"type": "nsga2", "seed": 0},
            scheduler={"type": "asha", "metric": "valid_acc", "grace_period": 1, "reduction_factor": 2},
            num_samples=4,
        )
    )
    outcome = run_sweep(sweep, base_dir=tmp_path)
    assert len(outcome.trials) == 4 and not outcome.interrupted

    client = MlflowClient(outcome.tracking_uri)
    trials = [r for r in client.search_runs([outcome.experiment_id]) if r.data.tags.get("kind") == "trial"]
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)  # none left RUNNING
    for run in trials:  # every trial either ran to its end or carries the scheduler's stop
        assert ("network/params_M" in run.data.metrics) != (run.data.tags.get("early_stopped") == "true")

    study = optuna.load_study(
        study_name="moo", storage=JournalStorage(JournalFileBackend(str(outcome.experiment_dir / "optuna.journal")))
    )
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert complete and all(len(t.values) == 2 for t in complete)
    assert len(study.trials) == 4 and len(complete) == sum("network/params_M" in r.data.metrics for r in trials)

    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "sweeps" / "report.py"), "moo",
         "--tracking-uri", outcome.tracking_uri, "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| method | target | n |" in done.stdout and (out / "drops.png").stat().st_size > 10_000
    csv = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "sweeps" / "report.py"), "moo",
         "--tracking-uri", outcome.tracking_uri, "--csv"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert csv.stdout.startswith("method,target,n,supernet_acc_mean,supernet_acc_std")


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def _listening_addresses(pids: set[int]) -> set[str]:
    """Hex local addresses of the TCP sockets the processes `pids` listen on."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                addresses.add(fields[1].split(":")[0])
    return addresses


def test_local_ray_listens_on_loopback_only(local_ray):
    @ray.remote
    def worker_pid() -> int:
        return os.getpid()

    # Start a worker so its gRPC server is listening too; Ray's processes (GCS, raylet, agents,
    # workers) all descend from this driver.
    assert ray.get(worker_pid.remote()) in descendants(os.getpid())
    ray_pids = descendants(os.getpid())
    assert len(ray_pids) >= 4
    addresses = _listening_addresses(ray_pids)
    assert addresses and addresses <= LOOPBACK, addresses
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
