"""A sweep interrupted twice, first with SIGTERM (handled as Ctrl-C; its evaluation stage does not
start) and then by a SIGKILL of its driver, and finished with --resume each time: every trial ends exactly once (no finished trial
repeated, no duplicate trial run, no run left RUNNING), and Optuna's study and sampler state carry
over. A second driver started on the sweep while one runs is refused, and the lock a killed driver
leaves does not block --resume. All of it beside a stale Ray address file (a cluster stopped uncleanly): without --address
the driver starts its own Ray each time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import descendants, processes_named, tiny_sweep_config
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

ROOT = Path(__file__).resolve().parents[1]


def all_runs(db: Path) -> list:
    """Every run of the sweep's experiment (the parent and the trials), or [] before it exists."""
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("resume") if db.exists() else None
    return client.search_runs([experiment.experiment_id]) if experiment else []


def finished_trials(db: Path) -> dict:
    return {
        r.data.tags["trial_id"]: r
        for r in all_runs(db)
        if r.data.tags.get("kind") == "trial" and r.info.status == "FINISHED"
    }


def run_until(command: list[str], db: Path, finished: int, env: dict, cwd: Path) -> subprocess.Popen:
    """Start the driver and return it, still running, once `finished` trials have finished."""
    driver = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(finished_trials(db)) < finished:
        assert driver.poll() is None, driver.stdout.read()
        time.sleep(0.3)
    return driver


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_repeating_trials(tmp_path):
    # A wide integer range: a sampler restarted from scratch would propose the same seeds again.
    seeds = {"type": "int", "low": 0, "high": 1_000_000}
    # An evaluation stage that must not start while the sweep is interrupted, only at its end; on two
    # data-parallel workers (Ray Train, gloo).
    evaluate = {
        "top": 1,
        "by": "discretized_acc",
        "resources": {"workers": 2, "cpu": 1},
        "settings": {
            "epochs": 1,
            "layers": 5,
            "channels": 8,
            "batch_size": 64,
            "device": "cpu",
            "data": {"subset": 128, "test_subset": 64, "synthetic": True},
        },
    }
    sweep = tiny_sweep_config(
        "resume", space={"preset": {"choices": ["darts", "da2s"]}, "seed": seeds},
        sampler={"type": "tpe", "seed": 7}, num_samples=3, concurrency=2, evaluate=evaluate,
    )  # fmt: skip
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(sweep))
    db = tmp_path / "runs" / "mlflow.db"
    # Ray's temp folder names a cluster that is gone.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))  # short: Ray's socket paths live under it
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, str(ROOT / "sweeps" / "run.py"), str(path), "-q"]

    # 1. SIGTERM (a scheduler's stop) once a trial has finished: like Ctrl-C, the driver saves the
    # sweep's state, ends the runs it started and says how to resume.
    driver = run_until(command, db, 1, env, tmp_path)
    driver.send_signal(signal.SIGTERM)
    output, _ = driver.communicate(timeout=180)
    assert driver.returncode == 130, output
    assert "--resume" in output
    runs = all_runs(db)
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    assert parent.info.status == "KILLED"
    assert not [r for r in runs if r.info.status == "RUNNING"]  # nothing left RUNNING
    assert not [r for r in runs if r.data.tags.get("kind") == "evaluation"]  # no evaluation started
    before = finished_trials(db)
    assert len(before) >= 1

    lock = tmp_path / "runs" / "ray" / "resume" / "driver.lock"
    assert not lock.exists()  # released by the interrupted driver

    # 2. Resumed, then the driver SIGKILLed once another trial has finished: nothing gets to clean up.
    # While it runs, a second `--resume` on the same sweep is refused, naming it.
    driver = run_until([*command, "--resume"], db, len(before) + 1, env, tmp_path)
    holder = json.loads(lock.read_text())
    second = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    refusal = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(refusal) == 1 and "this sweep's driver is running" in refusal[0], second.stderr
    assert f"host {socket.gethostname()}, pid {driver.pid}, started {holder['started']}" in refusal[0]
    assert driver.poll() is None  # the first driver runs on, undisturbed
    ray_processes = descendants(driver.pid)
    driver.kill()
    driver.communicate()
    assert json.loads(lock.read_text())["pid"] == driver.pid  # left behind: it must not block what follows
    # The trial workers die with the driver (within seconds; polled, as a loaded machine is slower);
    # Ray's agents outlive it but do no trial work.
    deadline = time.time() + 30
    while processes_named("ray::ImplicitFunc") & ray_processes and time.time() < deadline:
        time.sleep(0.5)
    assert not processes_named("ray::ImplicitFunc") & ray_processes
    for pid in processes_named("ray::DashboardAgent", "ray::RuntimeEnvAgent") & ray_processes:
        os.kill(pid, signal.SIGKILL)
    before = finished_trials(db)
    assert len(before) >= 2

    # 3. Resumed again: it runs to the end.
    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not lock.exists()

    runs = all_runs(db)
    trials = [r for r in runs if r.data.tags.get("kind") == "trial"]
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert len(finished) == 3 and len({r.data.tags["trial_id"] for r in finished}) == 3  # each trial once
    assert not [r for r in runs if r.info.status == "RUNNING"]  # no orphan left RUNNING
    # A trial in flight when the driver died before saving its state is replaced; its run says so.
    assert all(r.data.tags.get("lost") for r in trials if r.info.status != "FINISHED")
    evaluations = [r for r in runs if r.data.tags.get("kind") == "evaluation"]
    assert [r.info.status for r in evaluations] == ["FINISHED"]  # the best trial's, once, at the end
    assert evaluations[0].data.params["world_size"] == "2" and evaluations[0].data.params["global_batch"] == "64"
    for trial_id, old in before.items():  # finished trials were not run again
        new = next(r for r in finished if r.data.tags["trial_id"] == trial_id)
        assert new.info.end_time == old.info.end_time
    assert len({r.data.params["seed"] for r in finished}) == 3
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags.get("resumed") == "true"
    assert "interrupted" not in parent.data.tags  # said how to go on while it was; finished, it is gone

    # Optuna's study: all three trials told their results, the first ones before the interruptions.
    study = optuna.load_study(
        study_name="resume",
        storage=JournalStorage(JournalFileBackend(str(tmp_path / "runs" / "ray" / "resume" / "optuna.journal"))),
    )
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and not [t for t in study.trials if t.state.name == "RUNNING"]
    assert sorted(str(t.params["seed"]) for t in complete) == sorted(r.data.params["seed"] for r in finished)
