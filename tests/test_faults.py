"""Faults injected for real: the MLflow server gone for a while mid-sweep, eight trials logging at
once. Each test reads back what reached MLflow. (The driver killed with SIGKILL: test_sweep_resume;
a trial killed mid-search: test_sweeps; a trial that diverges: test_trainable.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import tiny_search_config, tiny_sweep_config
from mlflow.tracking import MlflowClient

from nas.metrics import EPOCH_METRICS, FINAL_METRICS
from tuning.names import mlflow_name

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "sweeps" / "run.py")]


def write_sweep(tmp_path: Path, name: str, **changes) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep_config(name, **changes)))
    return path


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000) if found else []


def trial_runs(uri: str, experiment: str) -> list:
    return [r for r in runs_of(uri, experiment) if r.data.tags.get("kind") == "trial"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
               "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    # Without MLflow's job runner (a pool of worker processes for its GenAI jobs, unused here).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        command, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise AssertionError("the MLflow server did not start")


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.slow
def test_mlflow_server_gone_for_a_while_loses_no_metric(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    search = tiny_search_config(epochs=3, data={**tiny_search_config()["data"], "subset": 512})
    search.pop("device")
    path = write_sweep(tmp_path, "outage", search=search, num_samples=2, concurrency=2, mlflow={"tracking_uri": uri})
    server = start_server(tmp_path, port)
    driver = subprocess.Popen(
        [*RUN, str(path), "-q"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # the first epoch has reached MLflow
            runs = trial_runs(uri, "outage")
            if runs and any(MlflowClient(uri).get_metric_history(r.info.run_id, "accuracy/supernet") for r in runs):
                break
            time.sleep(0.3)
        stop_server(server)  # MLflow away while the trials train on
        time.sleep(12)
        server = start_server(tmp_path, port)
        output, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, output
        client = MlflowClient(uri)
        runs = trial_runs(uri, "outage")
        assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
        for run in runs:
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "accuracy/supernet")) == [1, 2, 3]
            assert "accuracy/discretized" in run.data.metrics and "network/params_M" in run.data.metrics
            assert {"genotype.json", "cells", "plots"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert not list((tmp_path / "runs").glob("**/mlflow_pending.json"))  # all replayed
    finally:
        stop_server(server)
        if driver.poll() is None:
            driver.kill()


@pytest.mark.slow
@pytest.mark.parametrize("trials", [8])
def test_eight_trials_logging_at_once_lose_nothing(tmp_path, trials):
    search = tiny_search_config(epochs=2)
    search.pop("device")
    path = write_sweep(
        tmp_path, "crowd", search=search, num_samples=trials, concurrency=trials, resources={"cpu": 0.25},
        space={"seed": {"choices": list(range(trials))}}, sampler={"type": "grid"},
    )  # fmt: skip
    done = subprocess.run([*RUN, str(path), "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = trial_runs(uri, "crowd")
    assert len(runs) == trials and all(r.info.status == "FINISHED" for r in runs)
    points = {}
    for run in runs:
        # Every metric of every run, point by point: per-epoch ones at epochs 1 and 2, final ones once.
        history = {
            key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics
        }
        final_only = {mlflow_name(k) for k in FINAL_METRICS} - {mlflow_name(k) for k in EPOCH_METRICS}
        final_only = {k for k in history if k in final_only} | {"time/search_seconds"}
        assert {"accuracy_bn_recal/supernet", "accuracy_bn_recal/drop", "network/params_M"} <= final_only
        assert {k for k, steps in history.items() if steps == [2]} == final_only
        assert {k for k, steps in history.items() if steps == [1, 2]} == set(history) - final_only
        assert {"accuracy/supernet", "loss/train", "accuracy/discretized", "architecture/skip_connect_normal"} <= set(
            history
        )
        points[run.info.run_id] = sum(map(len, history.values()))
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        files |= {a.path for a in client.list_artifacts(run.info.run_id, "cells")}
        files |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert files == {"genotype.json", "config.json", "result.json", "cells", "plots", "images", "cells/cell_normal.png",
                         "cells/cell_reduce.png", "plots/alpha_normal.png", "plots/alpha_reduce.png"}  # fmt: skip
    assert len(set(points.values())) == 1  # the same count in every run
