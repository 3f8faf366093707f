"""Interrupting a sweep (Ctrl-C in the driver) and finishing it with --resume: no finished trial is
repeated, no run is left RUNNING, and Optuna's study and sampler state carry over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from conftest import tiny_search_config
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

ROOT = Path(__file__).resolve().parents[1]


def all_runs(db: Path) -> list:
    """Every run of the sweep's experiment (the parent and the trials), or [] before it exists."""
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("resume") if db.exists() else None
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_interrupted_sweep_resumes_without_repeating_trials(tmp_path):
    search = tiny_search_config()
    search.pop("device")
    sweep = {
        "name": "resume",
        "search": search,
        # A wide integer range: a sampler restarted from scratch would propose the same seeds again.
        "space": {"preset": {"choices": ["darts", "da2s"]}, "seed": {"type": "int", "low": 0, "high": 1_000_000}},
        "sampler": {"type": "tpe", "seed": 7},
        "num_samples": 4,
        "concurrency": 1,
    }
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(sweep))
    db = tmp_path / "runs" / "mlflow.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "sweeps" / "run.py"), str(path), "-q"]

    driver = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        runs = all_runs(db)
        if sum(r.info.status == "FINISHED" and r.data.tags.get("kind") == "trial" for r in runs) >= 2:
            break
        assert driver.poll() is None, driver.stdout.read()
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    output, _ = driver.communicate(timeout=180)
    assert driver.returncode == 130, output
    assert "--resume" in output

    runs = all_runs(db)
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    assert parent.info.status == "KILLED"
    assert not [r for r in runs if r.info.status == "RUNNING"]  # nothing left RUNNING
    before = {
        r.data.tags["trial_id"]: r for r in runs if r.data.tags.get("kind") == "trial" and r.info.status == "FINISHED"
    }
    assert len(before) >= 2

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    runs = all_runs(db)
    trials = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert len(trials) == 4 and len({r.data.tags["trial_id"] for r in trials}) == 4  # no duplicates
    assert all(r.info.status == "FINISHED" for r in trials)
    for trial_id, old in before.items():  # finished trials were not run again
        new = next(r for r in trials if r.data.tags["trial_id"] == trial_id)
        assert new.info.end_time == old.info.end_time and "resumed" not in new.data.tags
    assert len({r.data.params["seed"] for r in trials}) == 4
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags.get("resumed") == "true"

    # Optuna's study: all four trials told their results, the first ones before the interruption.
    study = optuna.load_study(
        study_name="resume",
        storage=JournalStorage(JournalFileBackend(str(tmp_path / "runs" / "ray" / "resume" / "optuna.journal"))),
    )
    assert len(study.trials) == 4 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert sorted(str(t.params["seed"]) for t in study.trials) == sorted(r.data.params["seed"] for r in trials)
