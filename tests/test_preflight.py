"""Before the first trial: which Ray a sweep uses, and whether its resources can ever be granted.

The end-to-end case runs Ray's own autoscaler with its fake multi-node provider (nodes are local
processes on loopback): a head with no CPUs, a GPU worker type with min_workers 0, a sweep asking
for gpu: 0.5. The fake GPUs are real to Ray's scheduler but not to CUDA, which is what the sweep's
device rule meets on a node with a broken driver: the trial that asks for `device: auto` must fail
with that reason; the one that asks for `device: cpu` explicitly runs (on the CPU) and finishes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import _each_process, descendants, tiny_sweep_config, tool
from mlflow.tracking import MlflowClient

from nas.config import ConfigError
from tuning.accelerators import AcceleratorError, claim_accelerators
from tuning.config import EvalResourcesConfig
from tuning.preflight import NodeType, check_request, check_workers, node_types_from_yaml

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "sweeps" / "run.py")]
WORKER = NodeType("gpu_worker", {"CPU": 8.0, "GPU": 1.0}, 4)
HEAD = NodeType("10.0.0.4", {"CPU": 0.0, "memory": 1e9})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_request_the_autoscaler_can_grant_waits_and_an_impossible_one_is_refused():
    # A fresh cluster: the head alone, with no CPUs; GPU workers come on demand.
    verdict = check_request("resources", 4, 0.5, [HEAD], [WORKER])
    assert not verdict.live and verdict.node_types == ["gpu_worker"]
    assert check_request("resources", 4, 0.5, [HEAD, NodeType("w", {"CPU": 8.0, "GPU": 1.0})], [WORKER]).live
    with pytest.raises(ConfigError) as err:
        check_request("resources", 4, 2, [HEAD], [WORKER])  # no node type has two GPUs
    assert err.value.field == "resources.gpu" and "gpu_worker {CPU: 8, GPU: 1}" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_request("evaluate.resources", 16, 1, [HEAD], [WORKER])  # GPUs exist, not with 16 CPUs
    assert err.value.field == "evaluate.resources.cpu"
    with pytest.raises(ConfigError) as err:  # a type the autoscaler may not add (max_workers: 0)
        check_request("resources", 4, 0.5, [HEAD], [NodeType("gpu_worker", {"CPU": 8.0, "GPU": 1.0}, 0)])
    assert err.value.field == "resources.gpu"
    with pytest.raises(ConfigError) as err:  # no autoscaler known: only the live nodes count
        check_request("resources", 4, 0.5, [HEAD], None)
    assert err.value.field == "resources.gpu" and "--cluster-config" in str(err.value)


def test_data_parallel_workers_must_fit_the_cluster_at_once():
    workers = lambda n, cpu=8, gpu=1: EvalResourcesConfig(cpu=cpu, gpu=gpu, workers=n)  # noqa: E731
    two_gpu_nodes = [HEAD, NodeType("a", {"CPU": 16.0, "GPU": 1.0}), NodeType("b", {"CPU": 16.0, "GPU": 2.0})]
    assert check_workers("evaluate.resources", workers(3), two_gpu_nodes, None) == []  # 1 + 2 GPUs
    with pytest.raises(ConfigError) as err:  # no autoscaler: what is there is all there will be
        check_workers("evaluate.resources", workers(4), two_gpu_nodes, None)
    assert err.value.field == "evaluate.resources.workers" and "at most 3 workers of {CPU: 8, GPU: 1}" in str(err.value)
    with pytest.raises(ConfigError) as err:  # CPUs bound it: 16 + 16 CPUs hold 2 workers of 12
        check_workers("evaluate.resources", workers(3, cpu=12), two_gpu_nodes, None)
    assert "at most 2 workers" in str(err.value)
    # With an autoscaler that may add 4 one-GPU nodes: 8 workers wait for it; 8 of 2 nodes' worth cannot.
    lines = check_workers("evaluate.resources", workers(7), two_gpu_nodes, [WORKER])
    assert lines and "the cluster holds 3 now" in lines[0]
    with pytest.raises(ConfigError):
        check_workers("evaluate.resources", workers(8), two_gpu_nodes, [WORKER])
    assert check_workers("evaluate.resources", workers(64), [HEAD], [NodeType("gpu", {"CPU": 8.0, "GPU": 1.0})])


def test_node_types_come_from_the_launcher_config_without_the_head():
    config = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0}},
            "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 2},
            "cpu": {"resources": {"CPU": 16}},
        },
    }
    types = node_types_from_yaml(config)
    assert [(t.name, t.resources, t.max_workers) for t in types] == [
        ("gpu", {"CPU": 8.0, "GPU": 1.0}, 2),
        ("cpu", {"CPU": 16.0}, 3),
    ]


def test_trials_see_only_the_accelerators_they_reserved(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    claim_accelerators(0, "auto")  # gpu: 0 hides every GPU from the trial
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    # A GPU reserved but CUDA unusable (this machine has none): a clear error, not a silent CPU run.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(AcceleratorError, match=r"reserved 0.5 GPU .*CUDA_VISIBLE_DEVICES='0'.*device: cpu"):
        claim_accelerators(0.5, "auto")
    claim_accelerators(0.5, "cpu")  # on purpose: allowed


@pytest.mark.slow
def test_stale_ray_address_file(tmp_path):
    """A cluster recorded in Ray's temp folder that is gone (stopped uncleanly): `--address auto`
    fails within a minute naming --address; without --address the sweep starts its own Ray (shown
    by tests/test_sweep_resume.py, which runs beside such a file)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump(tiny_sweep_config("stale")))
    # (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray keeps 127.0.0.1 instead of swapping in this machine's
    # outward address.)
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    done = subprocess.run(
        [*RUN, str(sweep), "--address", "auto"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert time.monotonic() - started < 60
    assert "error: --address: got 'auto'; no Ray cluster answers at 127.0.0.1:" in done.stderr
    assert not (tmp_path / "runs" / "ray" / "stale").exists()  # nothing started


# --- Ray's autoscaler with fake nodes ----------------------------------------------------------


def fake_cluster_config(port: int) -> dict:
    """The whole launcher config (the wheel lacks the upstream example to merge with)."""
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
             "rsync_filter")  # fmt: skip
    return {
        "cluster_name": "fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.2,
        "docker": {},
        "auth": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in empty},
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{port}",
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
    }


def stop_processes_of(temp_dir: str) -> None:
    """Every process of the cluster whose files are in `temp_dir` (the head's and the fake nodes')."""
    roots = {pid for pid, cmdline in _each_process("cmdline").items() if temp_dir.encode() in cmdline}
    pids = set().union(*(descendants(pid) for pid in roots)) if roots else set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        time.sleep(1)


@pytest.fixture
def fake_autoscaling_cluster():
    temp_dir = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths live under it
    port = free_port()
    config = Path(temp_dir) / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(port)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}  # fmt: skip
    start = [tool("ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
             f"--autoscaling-config={config}", f"--temp-dir={temp_dir}", "--include-dashboard=false"]  # fmt: skip
    try:
        done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        yield f"127.0.0.1:{port}", config, Path(temp_dir)
    finally:
        stop_processes_of(temp_dir)


@pytest.mark.slow
def test_sweep_on_a_cluster_that_starts_without_workers(tmp_path, fake_autoscaling_cluster):
    address, config, temp_dir = fake_autoscaling_cluster
    sweep = tiny_sweep_config(
        "autoscale",
        space={"device": {"choices": ["cpu", "auto"]}},
        resources={"cpu": 1, "gpu": 0.5},
        concurrency=2,
        max_failures=0,
        storage_options={"shared": True},  # the simulated nodes are processes on this machine, on its disk
    )
    path = tmp_path / "autoscale.yaml"
    path.write_text(yaml.safe_dump(sweep))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run(
        [*RUN, str(path), "--address", address, "--cluster-config", str(config)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    output = done.stdout + done.stderr
    # Accepted although no node had a GPU (or a CPU) at the start, and said why it waits.
    assert "no node offers them yet; the trials wait for the autoscaler to add a node of type gpu_worker" in output
    monitor = (temp_dir / "session_latest" / "logs" / "monitor.log").read_text()
    assert "Adding 1 node(s) of type gpu_worker" in monitor  # the autoscaler added a worker
    # One trial errored (device auto, a GPU that CUDA cannot use): exit 4, listed with its reason.
    assert done.returncode == 4, output
    assert "1 errored:" in done.stderr and "AcceleratorError: this trial reserved 0.5 GPU" in done.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("autoscale")
    trials = {
        r.data.params["device"]: r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("kind") == "trial"
    }
    assert set(trials) == {"cpu", "auto"}
    finished, failed = trials["cpu"], trials["auto"]
    assert finished.info.status == "FINISHED" and "accuracy/discretized" in finished.data.metrics
    assert finished.data.params["device_effective"] == "cpu" and finished.data.params["amp_dtype"] == "float32"
    assert failed.info.status == "FAILED" and "AcceleratorError" in failed.data.tags["failure"]


def test_exit_codes_are_documented_in_help():
    done = subprocess.run([*RUN, "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    block = done.stdout.split("exit status:")[1].split("\n\n")[0]
    codes = [line.split()[0] for line in block.splitlines() if line[:5].strip()]
    assert codes == ["0", "2", "3", "4", "5", "130", "1"]
