"""The cluster's tracking server (sweeps/server.py), with real servers on loopback: MLflow with basic
authentication refuses an anonymous write and takes a trial's; on a real PostgreSQL with its
artifacts on an S3 API endpoint (moto), its record outlives the head: the server is stopped
mid-sweep, the driver stopped with it, a new server started from another directory on the same
database and bucket, and `--resume` finishes the sweep with every run, epoch and artifact there once."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import tiny_search_config, tiny_sweep_config
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "sweeps" / "run.py")]
SERVER = [sys.executable, str(ROOT / "sweeps" / "server.py")]
USER, PASSWORD = "sweeps", "a-long-test-password"
BUCKET = "study"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict, cwd: Path, port: int, *extra: str) -> int:
    """sweeps/server.py start, as cluster.yaml's head runs it; the server's pid."""
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [*SERVER, "start", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--log", str(cwd / "server.log"),
         *extra],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return int(re.search(r"\(pid (\d+)\)", done.stdout).group(1))


def stop_server(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def post(url: str, body: bytes, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def sweep_file(tmp_path: Path, name: str, uri: str, epochs: int = 2, **changes) -> Path:
    search = tiny_search_config(epochs=epochs, data={**tiny_search_config()["data"], "subset": 384})
    search.pop("device")
    sweep = tiny_sweep_config(name, search=search, mlflow={"tracking_uri": uri}, **changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def trial_runs(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000) if found else []
    return [r for r in runs if r.data.tags.get("kind") == "trial"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home of its own (the server's log and private files go under it) and the credentials of the
    sweep's user in the environment, as on a node (this test's own client reads with them too)."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    folder = tmp_path / "home"
    folder.mkdir()
    env = {**os.environ, "HOME": str(folder), "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled",
           "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.slow
def test_the_server_refuses_an_anonymous_write_and_takes_a_trials(tmp_path, home):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    pid = start_server(home, tmp_path / "head", port)
    try:
        create = f"{uri}/api/2.0/mlflow/experiments/create"
        assert post(create, b'{"name": "anonymous"}') == 401
        assert post(create, b'{"name": "guessed"}', USER, "not-the-password") == 401
        client = MlflowClient(uri)  # with the environment's credentials
        assert client.get_experiment_by_name("anonymous") is None and client.get_experiment_by_name("guessed") is None

        # A sweep file with credentials in its tracking URI is refused, naming the field, the
        # password not echoed.
        path = sweep_file(tmp_path, "auth", uri.replace("://", f"://{USER}:{PASSWORD}@"))
        done = subprocess.run(
            [*RUN, str(path), "-q"], cwd=tmp_path, env=home, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and "error: mlflow.tracking_uri:" in done.stderr, done.stderr
        assert PASSWORD not in done.stdout + done.stderr

        # A node without the credentials: refused before any trial starts, nothing written.
        path = sweep_file(tmp_path, "auth", uri, space={"preset": {"choices": ["da2s"]}})
        anonymous = {k: v for k, v in home.items() if not k.startswith("MLFLOW_TRACKING_")}
        done = subprocess.run([*RUN, str(path), "-q"], cwd=tmp_path, env=anonymous, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
        assert "mlflow.tracking_uri" in done.stderr and "the server asks for credentials" in done.stderr
        assert not (tmp_path / "runs").exists() and client.get_experiment_by_name("auth") is None

        # With them (the environment's; ~/.mlflow/credentials on a cluster's nodes), the trial logs.
        done = subprocess.run(
            [*RUN, str(path), "-q"], cwd=tmp_path, env=home, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout + done.stderr
        [run] = trial_runs(client, "auth")
        assert run.info.status == "FINISHED" and "accuracy/discretized" in run.data.metrics
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "accuracy/supernet")) == [1, 2]
        assert "genotype.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert PASSWORD not in (tmp_path / "head" / "server.log").read_text()
    finally:
        stop_server(pid)


# --- PostgreSQL and an S3 endpoint: the record outlives the head ------------------------------------


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on loopback with password authentication, and its URI for user `mlflow`
    on databases `mlflow` (the runs) and `mlflow_auth` (the server's users)."""
    binaries = _postgres_bin()
    if binaries is None:
        pytest.skip("no PostgreSQL here (.ci/run installs Debian's postgresql)")
    # Outside pytest's temporary folders, which only their owner may enter.
    root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    (root / "pw").write_text("superuser-secret\n")
    shutil.chown(root / "pw", "postgres") if as_user else None
    port = free_port()
    subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(root / "data"), "-U", "postgres", "-A", "scram-sha-256",
                    f"--pwfile={root / 'pw'}", "--no-sync", "-E", "UTF8"], check=True, capture_output=True)  # fmt: skip
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w",
                    "-o", options, "start"], check=True, capture_output=True)  # fmt: skip
    env = {**os.environ, "PGPASSWORD": "superuser-secret"}
    try:
        psql = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        for statement in ("CREATE USER mlflow PASSWORD 'db-secret'", "CREATE DATABASE mlflow OWNER mlflow",
                          "CREATE DATABASE mlflow_auth OWNER mlflow"):  # fmt: skip
            subprocess.run([*psql, "-c", statement], check=True, capture_output=True, env=env)
        yield f"postgresql://mlflow:db-secret@127.0.0.1:{port}", psql, env
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3(home):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    home.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}",
                MLFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S="0")  # fmt: skip
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.mark.slow
def test_the_record_outlives_the_head(tmp_path, home, postgres, s3):
    database, psql, psql_env = postgres
    settings = (f"[server]\nbackend_store_uri = {database}/mlflow\nauth_database_uri = {database}/mlflow_auth\n"
                f"artifacts_destination = s3://{BUCKET}/mlflow\n")  # fmt: skip
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    first_head, second_head = tmp_path / "head-1", tmp_path / "head-2"
    first_head.mkdir()
    (first_head / "server.ini").write_text(settings)
    pid = start_server(home, first_head, port, "--settings", str(first_head / "server.ini"))
    path = sweep_file(tmp_path, "outlive", uri, epochs=3, storage=f"s3://{BUCKET}/ray",
                      space={"preset": {"choices": ["darts", "da2s"]}})  # fmt: skip
    client = MlflowClient(uri)
    driver = subprocess.Popen([*RUN, str(path), "-q"], cwd=tmp_path, env=home, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        # The first trial's first epoch has reached the server: the head goes (its MLflow server,
        # then the driver, which saves the sweep's state and the calls it could not send).
        deadline = time.time() + 300
        while time.time() < deadline:
            runs = trial_runs(client, "outlive")
            if runs and client.get_metric_history(runs[0].info.run_id, "accuracy/supernet"):
                break
            assert driver.poll() is None, driver.stdout.read()
            time.sleep(0.3)
        stop_server(pid)
        time.sleep(3)
        driver.send_signal(signal.SIGTERM)
        output, _ = driver.communicate(timeout=300)
        assert driver.returncode == 130 and "--resume" in output, output
        assert "MLflow could not be told" in output  # said, not a traceback, and within seconds
        shutil.rmtree(first_head)  # the old head's disk is gone

        # A new head: the same database and bucket, another directory.
        second_head.mkdir()
        (second_head / "server.ini").write_text(settings)
        pid = start_server(home, second_head, port, "--settings", str(second_head / "server.ini"))
        assert trial_runs(client, "outlive")  # the runs from before are there
        done = subprocess.run([*RUN, str(path), "-q", "--resume"], cwd=tmp_path, env=home, capture_output=True,
                              text=True, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

        runs = trial_runs(client, "outlive")
        finished = [r for r in runs if r.info.status == "FINISHED"]
        assert len(runs) == 2 and len(finished) == 2  # each trial's run once, continued across the heads
        assert {r.data.params["preset"] for r in finished} == {"darts", "da2s"}
        for run in finished:  # every epoch once, every artifact in the bucket
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "accuracy/supernet")) == [1, 2, 3]
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss/train")) == [1, 2, 3]
            assert {"genotype.json", "cells", "plots"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
            stored = keys(s3, f"mlflow/{run.info.experiment_id}/{run.info.run_id}/artifacts/")
            assert any(k.endswith("/genotype.json") for k in stored), stored
        [parent] = [r for r in client.search_runs([runs[0].info.experiment_id]) if r.data.tags.get("kind") == "sweep"]
        assert parent.info.status == "FINISHED"
        # The runs are PostgreSQL's rows.
        count = subprocess.run([*psql, "-d", "mlflow", "-tAc", "SELECT count(*) FROM runs WHERE status = 'FINISHED'"],
                               check=True, capture_output=True, text=True, env=psql_env)  # fmt: skip
        assert int(count.stdout) == len(finished) + 1
        for log in second_head.glob("*.log"):
            assert "db-secret" not in log.read_text() and PASSWORD not in log.read_text()
    finally:
        stop_server(pid)
        if driver.poll() is None:
            driver.kill()


@pytest.mark.parametrize(
    ("settings", "extra", "field"),
    [
        ("[server]\nbackend_store_uri = s3://bucket/runs\n", [], "backend_store_uri"),
        ("[server]\nbackend_store_uri = postgresql://u:pw@127.0.0.1:1/mlflow\n", [], "auth_database_uri"),
        ("[server]\nbackend_store_uri = sqlite:///x.db\nauth_database_uri = sqlite:///x.db\n", [], "auth_database_uri"),
        ("[server]\nbackend_uri = sqlite:///x.db\n", [], "[server] backend_uri"),
        ("backend_store_uri = sqlite:///x.db\n", [], "server.ini"),
        ("", ["--no-auth", "--host", "10.0.0.4"], "--no-auth"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_them(tmp_path, home, settings, extra, field):
    (tmp_path / "server.ini").write_text(settings)
    command = [*SERVER, "start", "--host", "127.0.0.1", "--settings", str(tmp_path / "server.ini"), *extra]
    done = subprocess.run(command, cwd=tmp_path, env=home, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and field in done.stderr, done.stderr
    assert "pw@" not in done.stderr  # a store's password is not echoed
    assert not (tmp_path / "home" / "mlflow").exists()  # nothing started, nothing written


def test_a_node_without_credentials_cannot_start_an_authenticated_server(tmp_path, home):
    anonymous = {k: v for k, v in home.items() if not k.startswith("MLFLOW_TRACKING_")}
    done = subprocess.run([*SERVER, "start", "--host", "127.0.0.1"], cwd=tmp_path, env=anonymous, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "error: credentials:" in done.stderr and "sweeps/server.py init" in done.stderr
    init = subprocess.run([*SERVER, "init"], env=anonymous, capture_output=True, text=True, timeout=60)
    credentials = tmp_path / "home" / ".mlflow" / "credentials"
    assert init.returncode == 0 and credentials.stat().st_mode & 0o777 == 0o600
    assert re.search(r"mlflow_tracking_password = \S{24,}", credentials.read_text())
    first = credentials.read_text()
    again = subprocess.run([*SERVER, "init"], env=anonymous, capture_output=True, text=True, timeout=60)
    assert "kept the existing" in again.stdout and credentials.read_text() == first  # never a new password
