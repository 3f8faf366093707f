"""tuning.storage on its own: local paths and an S3 API server (moto, on loopback) behave alike,
URIs are never joined as local paths, bad storage settings are refused with the field named, and
the shared-or-not decision for clusters that an autoscaler can grow."""

from __future__ import annotations

import logging
import os

import pytest
from conftest import tiny_sweep_config
from test_faults import free_port

from nas.config import ConfigError
from tuning.config import SweepConfig
from tuning.preflight import check_output
from tuning.recovery import known_trial_ids, replay_all_pending
from tuning.storage import check_for_added_nodes, filesystem_type, open_storage


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 API server on loopback with one bucket; the standard variables point at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in (*env, "AWS_ENDPOINT_URL_S3", "AWS_REGION")}
    os.environ.update(env)
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="results")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize("where", ["local", "s3"])
def test_local_path_and_object_store_behave_alike(tmp_path, s3, where):
    if where == "local":
        root = open_storage("runs/ray", tmp_path)
        assert root.uri == str(tmp_path / "runs" / "ray") and root.local_path == tmp_path / "runs" / "ray"
    else:
        root = open_storage("s3://results/sweeps/", endpoint=s3, region="us-east-1")
        assert root.uri == "s3://results/sweeps" and root.local_path is None
        assert root.ray_storage()[0] == "results/sweeps"  # Ray's storage_path: no scheme with a filesystem
    experiment = root / "demo"
    pending = experiment / "trial_1" / "checkpoint_000002" / "mlflow_pending.json"
    assert str(pending) == f"{root.uri}/demo/trial_1/checkpoint_000002/mlflow_pending.json"  # never s3:/
    assert not experiment.exists() and experiment.children() == [] and experiment.glob("*x") == []
    pending.write_text('{"run": {}, "ops": []}')
    (experiment / "mlflow_parent_run_id").write_text("abc\n")
    (experiment / "evaluations" / "t-cifar10" / "mlflow_pending.json").write_text("{}")
    assert experiment.exists() and (experiment / "mlflow_parent_run_id").read_text() == "abc\n"
    assert set(experiment.children()) == {"trial_1", "mlflow_parent_run_id", "evaluations"}
    found = sorted(f.uri for f in experiment.glob("*mlflow_pending.json"))
    assert found == sorted([pending.uri, (experiment / "evaluations" / "t-cifar10" / "mlflow_pending.json").uri])
    assert (experiment / "mlflow_parent_run_id").download(tmp_path / "copy" / "marker")
    assert (tmp_path / "copy" / "marker").read_text() == "abc\n"
    assert not (experiment / "missing").download(tmp_path / "nothing")
    (experiment / "uploaded").upload(tmp_path / "copy" / "marker")
    assert (experiment / "uploaded").read_text() == "abc\n"
    pending.delete()
    assert not pending.exists()
    # The sweep's own bookkeeping through it: a directory holding no Ray state is no sweep to resume.
    with pytest.raises(ConfigError, match="holds no sweep to resume"):
        check_output(experiment, resume=True)
    assert known_trial_ids(experiment) == set()
    (experiment / "evaluations" / "t-cifar10" / "mlflow_pending.json").delete()
    assert replay_all_pending(experiment) == []
    assert not list(tmp_path.glob("s3:*"))  # nothing written to a local folder named after the scheme


def test_endpoint_and_region_from_the_standard_variables(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    store = open_storage("s3://results/env")
    assert store.fs.region == "eu-west-1"
    (store / "x").write_text("y")
    assert (store / "x").read_text() == "y"


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"storage": "s3://AKIA:secret@results/x"}, "storage", "credentials never go in the sweep file"),
        ({"storage": "ftp://host/x"}, "storage", "s3:// or gs:// URI"),
        ({"storage": "s3:///x"}, "storage", "names no bucket"),
        ({"storage_options": {"secret_key": "x"}}, "storage_options.secret_key", "credentials never go"),
        ({"storage_options": {"endpoint": "minio:9000"}}, "storage_options.endpoint", "http://HOST:PORT"),
        ({"storage_options": {"endpont": "x"}}, "storage_options.endpont", "did you mean 'endpoint'"),
    ],
)
def test_bad_storage_settings_are_refused(changes, field, message):
    with pytest.raises(ConfigError) as info:
        SweepConfig.from_dict(tiny_sweep_config("bad", **changes))
    assert info.value.field == field and message in str(info.value)
    assert "secret" not in str(info.value).replace("secret_key", "")  # the credential is not echoed


def test_unreachable_object_store_is_refused_before_ray(tmp_path, s3):
    from tuning.sweep import run_sweep

    sweep = SweepConfig.from_dict(
        tiny_sweep_config("gone", storage="s3://no-such-bucket/x", storage_options={"endpoint": s3})
    )
    with pytest.raises(ConfigError) as info:
        run_sweep(sweep, base_dir=tmp_path)
    assert info.value.field == "storage" and "bucket 'no-such-bucket' does not exist" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_clusters_that_can_grow_need_a_shared_filesystem(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    efs = tmp_path / "efs"  # as if EFS were mounted here
    efs.mkdir()
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
        f"40 22 0:50 / {efs} rw,relatime shared:5 - nfs4 fs-1.efs.us-west-2.amazonaws.com:/ rw,vers=4.1\n"
    )
    assert filesystem_type(efs / "ray" / "sweep", str(mountinfo)) == "nfs4"  # not created yet: its mount counts
    assert filesystem_type(tmp_path / "runs", str(mountinfo)) == "ext4"
    assert filesystem_type(tmp_path / "efs-not", str(mountinfo)) == "ext4"
    local = open_storage(str(tmp_path / "runs"))
    with pytest.raises(ConfigError) as info:
        check_for_added_nodes(local, can_grow=True, kind="ext4")
    assert info.value.field == "storage" and "s3://" in str(info.value) and "NFS" in str(info.value)
    check_for_added_nodes(local, can_grow=True, kind="nfs4")  # EFS / NFS: every node can mount it
    check_for_added_nodes(local, can_grow=True, kind="fuse.juicefs")
    check_for_added_nodes(local, can_grow=True, kind="ext4", declared=True)  # storage_options.shared
    check_for_added_nodes(local, can_grow=False)  # a fixed set of nodes: asked one by one instead
    check_for_added_nodes(open_storage("s3://results/x", endpoint="http://127.0.0.1:9"), can_grow=True)
