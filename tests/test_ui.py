"""A local MLflow store that was moved keeps its artifacts (tuning/ui.py)."""

from __future__ import annotations

import logging
import shutil

from mlflow.tracking import MlflowClient

from tuning.tracking import ensure_experiment, local_artifact_root, relocate_artifacts, report_relocations


def _store(root):
    uri = f"sqlite:///{root / 'runs' / 'mlflow.db'}"
    (root / "runs").mkdir(parents=True)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, "sweep", local_artifact_root(uri))
    run_id = client.create_run(experiment_id).info.run_id
    client.log_text(run_id, "hello", "notes/hello.txt")
    return run_id


def test_a_moved_store_shows_its_artifacts_again(tmp_path, caplog):
    run_id = _store(tmp_path / "a")
    shutil.move(tmp_path / "a" / "runs", tmp_path / "b")
    uri = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert client.list_artifacts(run_id) == []  # what the UI shows of a moved store: nothing, no error

    found = relocate_artifacts(uri)
    assert [(r.experiment, r.new_root) for r in found] == [("sweep", str(tmp_path / "b" / "mlartifacts"))]
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/hello.txt"]
    assert client.get_experiment_by_name("sweep").artifact_location == str(tmp_path / "b" / "mlartifacts" / "sweep")
    assert relocate_artifacts(uri) == []  # done once
    with caplog.at_level(logging.WARNING):
        report_relocations(found)
    assert "MLflow store moved" in caplog.text


def test_artifacts_that_are_gone_are_reported(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("elsewhere", artifact_location=str(tmp_path / "shared" / "artifacts"))
    client.log_text(client.create_run(experiment_id).info.run_id, "hello", "hello.txt")
    assert relocate_artifacts(uri) == []  # in place: nothing to say
    shutil.rmtree(tmp_path / "shared")
    found = relocate_artifacts(uri)
    assert [(r.experiment, r.new_root) for r in found] == [("elsewhere", None)]
    with caplog.at_level(logging.WARNING):
        report_relocations(found)
    assert "which does not exist: its runs show no artifacts" in caplog.text
