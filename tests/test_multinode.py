"""Sweeps on a real multi-node Ray cluster on this one machine: a head with no CPUs that runs the
driver, and worker nodes whose raylets run in their own mount namespace with a private directory
over the head's disk (so, as on a cloud, a node sees its own disk, not the head's); an S3 API
server (moto) on loopback as the object store; the cluster's tracking server (sweeps/server.py: MLflow
with basic authentication; every node logs with the credentials in its environment, as a node of
cluster.yaml does with ~/.mlflow/credentials). Faults are injected for real:
a worker node killed (raylet and workers) mid-trial and mid-evaluation, the driver killed mid-sweep.

Every node listens on 127.0.0.1 only (checked); nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import descendants, real_data_root, tiny_search_config, tiny_sweep_config, tool
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from test_faults import free_port
from test_sweeps import LOOPBACK, _listening_addresses
from test_tracking_server import PASSWORD, USER, start_server, stop_server

from nas.evaluate import EvalConfig, run_evaluation
from nas.genotype import PUBLISHED
from nas.search import run_search
from tuning.config import SweepConfig
from tuning.names import mlflow_name, significant
from tuning.tracking_server import credentials_status

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")]

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "sweeps" / "run.py")]
BUCKET = "sweeps"

# `ray start` that joins a cluster on loopback: Ray refuses to join while its single-machine switch
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) is set, and without the switch it advertises the machine's
# outward address. This process alone lifts the refusal and keeps the node address at 127.0.0.1;
# the raylet and workers it starts keep the switch.
JOIN = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True
services.node_ip_address_from_perspective = lambda *args, **kwargs: "127.0.0.1"
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


class LocalCluster:
    """A head (0 CPUs) and worker nodes (1 CPU each), each node its own process group."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.disk = root / "disk"  # the head's own disk: the driver's working directory lives here
        self.disk.mkdir()
        self.temp = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: Ray's socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        (root / "join.py").write_text(JOIN)
        self.count = 0

    def _ports(self) -> list[str]:
        return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats",
                "--object-store-memory=100000000", "--block"]  # fmt: skip

    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (kept open while the node runs)
        self.nodes[name] = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_head(self) -> None:
        command = [tool("ray"), "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
                   f"--temp-dir={self.temp / 'head'}", "--include-dashboard=false", *self._ports()]  # fmt: skip
        self._start("head", command)
        self.wait_started("head")

    def add_worker(self) -> str:
        """A worker node with its own disk: a private, empty directory mounted over the head's."""
        self.count += 1
        name = f"worker{self.count}"
        private = self.root / f"{name}-disk"
        private.mkdir()
        join = [sys.executable, str(self.root / "join.py"), "start", f"--address={self.address}",
                "--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={self.temp / name}", *self._ports()]  # fmt: skip
        script = f"mount --bind {private} {self.disk} && exec {' '.join(join)}"
        self._start(name, ["unshare", "-m", "sh", "-c", script])
        return name

    def ensure_workers(self, count: int) -> None:
        """At least `count` worker nodes up (a lost node replaced, as an autoscaler would)."""
        started = [self.add_worker() for _ in range(count - sum(n.startswith("worker") for n in self.nodes))]
        for name in started:
            self.wait_started(name)

    def wait_started(self, name: str, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "Ray runtime started" in (self.root / f"{name}.log").read_text():
                return
            assert self.nodes[name].poll() is None, (self.root / f"{name}.log").read_text()
            time.sleep(0.2)
        raise AssertionError(f"{name} did not start: {(self.root / f'{name}.log').read_text()}")

    def processes(self, name: str) -> set[int]:
        return descendants(self.nodes[name].pid)

    def node_of(self, pid: int) -> str:
        """The node a process belongs to."""
        found = [name for name in self.nodes if pid in self.processes(name)]
        assert found, f"no node runs process {pid}"
        return found[0]

    def kill(self, name: str) -> None:
        """The node lost: its raylet, workers and everything else of it, at once."""
        node = self.nodes.pop(name)
        _kill_all(descendants(node.pid), signal.SIGKILL)
        node.wait()

    def stop(self) -> None:
        pids = set().union(*(descendants(node.pid) for node in self.nodes.values()))
        _kill_all({node.pid for node in self.nodes.values()}, signal.SIGTERM)  # `ray start --block` stops its node
        deadline = time.time() + 10
        for node in self.nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=max(0.1, deadline - time.time()))
        _kill_all(pids, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)


def _kill_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    root = tmp_path_factory.mktemp("multinode")
    s3_port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # workers import this checkout
        "PYTHONUNBUFFERED": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # A lost node is noticed within seconds.
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        # Every node finds the object store's credentials in its environment (as from an instance
        # profile on AWS); the endpoint reaches the driver through the standard variable.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{s3_port}",
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
        # The tracking server's user, on every node and for this test's own reads.
        "MLFLOW_TRACKING_USERNAME": USER,
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
    }
    credentials = pytest.MonkeyPatch()
    credentials.setenv("MLFLOW_TRACKING_USERNAME", USER)
    credentials.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the S3 server's request lines
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    nodes = LocalCluster(root, env)
    server = None
    try:
        nodes.start_head()
        workers = [nodes.add_worker(), nodes.add_worker()]
        store = root / "mlflow"
        server = start_server(
            env,
            store,
            mlflow_port,
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
        )  # while the workers start
        for name in workers:
            nodes.wait_started(name)
        pids = set().union(*(nodes.processes(n) for n in nodes.nodes))
        addresses = _listening_addresses(pids)
        assert addresses and addresses <= LOOPBACK, addresses  # every node on loopback only
        import boto3

        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        client.create_bucket(Bucket=BUCKET)
        nodes.s3 = client
        nodes.tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        assert credentials_status(nodes.tracking_uri, None, None) == 401  # nothing reaches it without them
        yield nodes
    finally:
        nodes.stop()
        if server is not None:
            stop_server(server)
        s3.stop()
        credentials.undo()


def write_sweep(cluster: LocalCluster, name: str, epochs: int = 3, **changes) -> Path:
    search = tiny_search_config(epochs=epochs, data={**tiny_search_config()["data"], "subset": 384})
    search.pop("device")
    sweep = tiny_sweep_config(name, search=search, mlflow={"tracking_uri": cluster.tracking_uri}, **changes)
    path = cluster.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def driver(cluster: LocalCluster, sweep: Path, *extra: str, faults: str = "") -> subprocess.Popen:
    """`sweeps/run.py` on the head, started in the head's working directory, with `faults` to inject
    (NAS_FAULT, tuning/job.py)."""
    cwd = cluster.disk / "head"
    cwd.mkdir(exist_ok=True)
    return subprocess.Popen(
        [*RUN, str(sweep), "--address", cluster.address, *extra],
        cwd=cwd, env={**cluster.env, "NAS_FAULT": faults}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def fault_marker(cluster: LocalCluster, name: str) -> Path:
    """Where a paused job writes its pid: outside the nodes' private disks, so every node sees it."""
    folder = cluster.root / "faults"
    folder.mkdir(exist_ok=True)
    return folder / name


def paused(what: str, marker: Path, process: subprocess.Popen) -> int:
    """The pid of the job paused at `marker`'s fault, once it is there."""
    return int(wait_for(what, lambda: marker.exists() and marker.read_text().strip(), process))


def s3_keys(cluster: LocalCluster, prefix: str) -> list[str]:
    pages = cluster.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def runs(cluster: LocalCluster, experiment: str, kind: str | None = None) -> list:
    client = MlflowClient(cluster.tracking_uri)
    found = client.get_experiment_by_name(experiment)
    every = client.search_runs([found.experiment_id], max_results=1000) if found else []
    return [r for r in every if kind is None or r.data.tags.get("kind") == kind]


def steps(cluster: LocalCluster, run, metric: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(cluster.tracking_uri).get_metric_history(run.info.run_id, metric))


def wait_for(what, check, process: subprocess.Popen, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError(f"the driver ended before {what}: {process.stdout.read()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def uninterrupted(sweep_file: Path, params: dict) -> tuple[dict, float]:
    """The same search never interrupted, on one thread like the trial: (genotype levels, accuracy)."""
    config = SweepConfig.load(sweep_file).resolve_trial(params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = run_search(config, artifacts=False)
    finally:
        torch.set_num_threads(threads)
    return straight.genotype.to_dict()["levels"], straight.metrics["discretized_acc"]


def test_node_local_storage_is_refused_on_a_multi_node_cluster(cluster):
    storage = cluster.disk / "local-results"  # the head's own disk: the workers do not see it
    sweep = write_sweep(cluster, "local", storage=str(storage), num_samples=None)
    done = driver(cluster, sweep)
    output, _ = done.communicate(timeout=300)
    assert done.returncode == 2, output
    assert f"error: storage: got '{storage}'" in output and "cannot use it" in output
    assert "not shared" in output and "s3://" in output and "NFS" in output
    assert not storage.exists()  # nothing left behind
    assert not runs(cluster, "local")  # no trial started, no sweep run created


def test_s3_storage_survives_a_lost_node_a_lost_driver_and_a_moved_evaluation(cluster):
    cluster.ensure_workers(2)
    prefix = "sweeps/s3"
    seeds = {"type": "int", "low": 0, "high": 1_000_000}
    evaluate = {
        "top": 1,
        "settings": {"epochs": 2, "layers": 3, "channels": 4, "batch_size": 64, "device": "cpu",
                     "data": {"subset": 256, "test_subset": 64, "synthetic": True}},
    }  # fmt: skip
    sweep = write_sweep(
        cluster, "s3", storage=f"s3://{BUCKET}/sweeps", space={"preset": {"choices": ["da2s"]}, "seed": seeds},
        sampler={"type": "tpe", "seed": 3}, num_samples=3, concurrency=2, evaluate=evaluate,
    )  # fmt: skip
    trial_fault, evaluation_fault = fault_marker(cluster, "s3-trial"), fault_marker(cluster, "s3-evaluation")
    # A trial stopped right after its 2nd epoch's metrics reached MLflow, before Ray has its 2nd
    # checkpoint; the evaluation right after its 1st checkpoint reached the bucket, before its metrics.
    faults = (
        f"trial.after-epoch-metrics@2:pause:{trial_fault};evaluation.before-epoch-metrics@1:pause:{evaluation_fault}"
    )
    first = driver(cluster, sweep, faults=faults)
    try:
        # 1. The node of that trial lost at that moment: a new node replaces it.
        pid = paused("a trial between its 2nd epoch's metrics and checkpoint", trial_fault, first)
        trial_dir = os.readlink(f"/proc/{pid}/cwd")  # the trial's working directory, named after it
        killed = cluster.node_of(pid)
        assert killed.startswith("worker")
        cluster.kill(killed)
        cluster.wait_started(cluster.add_worker())
        (trial_id,) = [
            r.data.tags["trial_id"] for r in runs(cluster, "s3", "trial") if r.data.tags["trial_id"] in trial_dir
        ]

        # 2. The driver killed once that trial has finished and a third one has started.
        def restored_and_third_started():
            trials = runs(cluster, "s3", "trial")
            done = {r.data.tags["trial_id"] for r in trials if r.info.status == "FINISHED"}
            return trial_id in done and len(trials) == 3

        wait_for("the restored trial's end", restored_and_third_started, first)
        first.kill()
        first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
    # The head's disk is new: the driver's copy of the Optuna study is gone.
    journal = cluster.disk / "head" / "runs" / "optuna" / "s3" / "optuna.journal"
    assert journal.exists()
    journal.unlink()
    before = {r.data.tags["trial_id"]: r for r in runs(cluster, "s3", "trial") if r.info.status == "FINISHED"}

    # 3. Resumed from the same storage; its evaluation stage loses its node between its 1st epoch's
    # checkpoint and metrics.
    second = driver(cluster, sweep, "--resume", faults=faults)
    try:
        evaluating = cluster.node_of(
            paused("an evaluation between its 1st checkpoint and metrics", evaluation_fault, second)
        )
        assert evaluating.startswith("worker") and s3_keys(cluster, f"{prefix}/evaluations/")
        cluster.kill(evaluating)
        replacement = cluster.add_worker()
        output, _ = second.communicate(timeout=400)
        cluster.wait_started(replacement)
    finally:
        if second.poll() is None:
            second.kill()
    assert second.returncode == 0, output

    # The trial whose node was lost: restored on another node from S3, every epoch logged once.
    trials = runs(cluster, "s3", "trial")
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert len(finished) == 3 and len({r.data.tags["trial_id"] for r in finished}) == 3  # none repeated
    assert all(r.data.tags.get("lost") for r in trials if r.info.status != "FINISHED")
    assert not [r for r in runs(cluster, "s3") if r.info.status == "RUNNING"]
    for old_id, old in before.items():  # finished before the driver died: not run again
        assert next(r for r in finished if r.data.tags["trial_id"] == old_id).info.end_time == old.info.end_time
    restored = next(r for r in finished if r.data.tags["trial_id"] == trial_id)
    assert restored.data.tags.get("resumed") == "true"
    assert steps(cluster, restored, mlflow_name("valid_acc")) == [1, 2, 3]
    levels, accuracy = uninterrupted(sweep, {"preset": "da2s", "seed": int(restored.data.params["seed"])})
    stored = MlflowClient(cluster.tracking_uri).download_artifacts(
        restored.info.run_id, "genotype.json", str(cluster.root)
    )
    assert json.loads(Path(stored).read_text())["levels"] == levels
    assert restored.data.metrics[mlflow_name("discretized_acc")] == pytest.approx(significant(accuracy))

    # Optuna's study came back from S3 on the new disk and carried on: 3 COMPLETE, none RUNNING.
    study = optuna.load_study(study_name="s3", storage=JournalStorage(JournalFileBackend(str(journal))))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and not [t for t in study.trials if t.state.name == "RUNNING"]
    assert sorted(str(t.params["seed"]) for t in complete) == sorted(r.data.params["seed"] for r in finished)

    # The evaluation continued on another node from its last epoch checkpoint in S3; the 1st epoch's
    # metrics, lost with the node, were sent from that checkpoint's history.
    (evaluation,) = runs(cluster, "s3", "evaluation")
    assert evaluation.info.status == "FINISHED" and evaluation.data.tags.get("resumed") == "true"
    assert steps(cluster, evaluation, "error/test_top1") == [1, 2]
    keys = s3_keys(cluster, prefix)
    assert any(k.endswith("/result.json") and "/evaluations/" in k for k in keys)
    assert not list((cluster.disk / "head").glob("s3:*"))  # nothing written to a local "s3:" folder
    assert killed not in cluster.nodes


def test_shared_directory_storage_survives_a_lost_node_and_a_lost_driver(cluster):
    """The NFS case: a directory every node mounts at the same path."""
    cluster.ensure_workers(2)
    storage = cluster.root / "shared" / "ray"  # not covered by the workers' private disks
    sweep = write_sweep(cluster, "nfs", storage=str(storage), concurrency=1)  # darts, then da2s
    # The first trial stopped twice right after its 2nd epoch's metrics reached MLflow, before Ray
    # has its 2nd checkpoint: its node is lost the first time, the driver the second.
    node_fault, driver_fault = fault_marker(cluster, "nfs-node"), fault_marker(cluster, "nfs-driver")
    faults = f"trial.after-epoch-metrics@2:pause:{node_fault};trial.after-epoch-metrics@2:pause:{driver_fault}"
    first = driver(cluster, sweep, faults=faults)
    try:
        pid = paused("the trial between its 2nd epoch's metrics and checkpoint", node_fault, first)
        trial_dir = os.readlink(f"/proc/{pid}/cwd")  # the trial's working directory, named after it
        node = cluster.node_of(pid)
        assert node.startswith("worker")
        cluster.kill(node)
        replacement = cluster.add_worker()
        # Restored on another node from its 1st checkpoint, it stops there again: the driver is lost.
        again = paused("the restored trial at the same point", driver_fault, first)
        assert again != pid
        first.kill()
        first.communicate()
        cluster.wait_started(replacement)
    finally:
        if first.poll() is None:
            first.kill()
    lock = storage / "nfs" / "driver.lock"
    assert json.loads(lock.read_text())["pid"] == first.pid  # left by the killed driver: it must not block

    second = driver(cluster, sweep, "--resume")
    output, _ = second.communicate(timeout=400)
    assert second.returncode == 0, output
    trials = runs(cluster, "nfs", "trial")
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert sorted(r.data.params["preset"] for r in finished) == ["da2s", "darts"]  # each once
    assert all(r.data.tags.get("lost") for r in trials if r.info.status != "FINISHED")
    assert not [r for r in runs(cluster, "nfs") if r.info.status == "RUNNING"]
    restored = next(r for r in finished if r.data.tags["trial_id"] in trial_dir)
    assert restored.data.tags.get("resumed") == "true"
    for metric in ("valid_acc", "discretized_acc", "train_loss"):  # its 2nd epoch computed 3 times, logged once
        assert steps(cluster, restored, mlflow_name(metric)) == [1, 2, 3], metric
    assert not lock.exists()  # the resumed driver took it over and removed it at its end
    study = optuna.load_study(
        study_name="nfs", storage=JournalStorage(JournalFileBackend(str(storage / "nfs" / "optuna.journal")))
    )
    assert sorted(t.params["preset"] for t in study.trials if t.state.name == "COMPLETE") == ["da2s", "darts"]
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    assert not (cluster.disk / "head" / "runs" / "optuna").joinpath("nfs").exists()  # the study stays on the share


# ---------------------------------------------------------------- data-parallel evaluations

EVALUATE = [sys.executable, str(ROOT / "sweeps" / "evaluate.py")]
# A short protocol: 3 epochs of 6 global batches of 32 (16 per worker: BatchNorm synchronised).
SHORT = {"epochs": 3, "layers": 5, "channels": 8, "batch_size": 32, "data.subset": 192, "data.test_subset": 64,
         "device": "cpu", "data.synthetic": real_data_root() is None, "data.download": False}  # fmt: skip


def evaluation_driver(
    cluster: LocalCluster, *arguments: str, settings: dict | None = None, faults: str = ""
) -> subprocess.Popen:
    """`sweeps/evaluate.py` on the head, tracked by the cluster's MLflow server."""
    cwd = cluster.disk / "head"
    cwd.mkdir(exist_ok=True)
    sets = [f"--set={k}={v}" for k, v in (settings or {}).items()]
    return subprocess.Popen(
        [*EVALUATE, *arguments, *sets, "--address", cluster.address, "--tracking-uri", cluster.tracking_uri],
        cwd=cwd, env={**cluster.env, "NAS_FAULT": faults}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def evaluation_run(cluster: LocalCluster, name: str):
    (run,) = [r for r in runs(cluster, "evaluations", "evaluation") if r.data.tags["eval_id"] == name]
    return run


def _straight(out: str, settings: dict) -> None:
    config = EvalConfig.resolve("cifar10", overrides=[f"{k}={v}" for k, v in settings.items()])
    run_evaluation(PUBLISHED["darts_v2"], config, out)


def test_data_parallel_evaluation_continues_after_a_lost_node(cluster, tmp_path):
    """Two gloo workers on two nodes; the node of worker 0 is lost between the first epoch's
    checkpoint reaching S3 and its metrics reaching MLflow: Ray Train restarts the group (on a new
    node) from that checkpoint, and the first epoch's metrics are sent from its history."""
    cluster.ensure_workers(2)
    marker = fault_marker(cluster, "data-parallel")
    first = evaluation_driver(
        cluster, "darts_v2", "--workers", "2", "--storage", f"s3://{BUCKET}/evals", "--name", "lost", settings=SHORT,
        faults=f"evaluation.before-epoch-metrics@1:pause:{marker}",
    )  # fmt: skip
    try:
        node = cluster.node_of(paused("worker 0 between its 1st checkpoint and metrics", marker, first))
        assert node.startswith("worker")
        assert "evals/evaluations/lost/checkpoint.pt" in s3_keys(cluster, "evals/")
        cluster.kill(node)
        replacement = cluster.add_worker()
        output, _ = first.communicate(timeout=400)
        cluster.wait_started(replacement)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output
    assert "lost: FINISHED" in output

    run = evaluation_run(cluster, "lost")
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
    assert run.data.params["world_size"] == "2" and run.data.params["global_batch"] == "32"
    assert run.data.params["sync_bn_effective"] == "True" and run.data.params["threads"] == "1"
    assert steps(cluster, run, "error/test_top1") == [1, 2, 3]  # every epoch logged once
    assert steps(cluster, run, "loss/train") == [1, 2, 3]
    assert {"evals/evaluations/lost/checkpoint.pt", "evals/evaluations/lost/result.json"} <= set(
        s3_keys(cluster, "evals/evaluations/lost/")
    )

    # The same training never interrupted: two gloo processes on this machine, one thread each.
    from test_distributed import in_processes

    reference = tmp_path / "straight"
    reference.mkdir()
    in_processes(2, tmp_path, _straight, str(reference), SHORT)
    cluster.s3.download_file(BUCKET, "evals/evaluations/lost/checkpoint.pt", str(tmp_path / "resumed.pt"))
    resumed = torch.load(tmp_path / "resumed.pt")["model"]
    straight = torch.load(reference / "checkpoint.pt")["model"]
    worst = max((resumed[k].float() - straight[k].float()).abs().max().item() for k in straight)
    assert worst <= 1e-6, worst  # the same computation, restored exactly (measured: 0)
    assert run.data.metrics["error/test_top1"] == pytest.approx(
        significant(torch.load(reference / "checkpoint.pt")["history"][-1]["test_top1_error"]), abs=1e-6
    )


def test_data_parallel_evaluation_on_an_imagenet_folder(cluster):
    """ImageNet's layout (train/ and val/, a folder per class), JPEG files decoded by each worker's
    loader, on a directory every node sees; the checkpoint on the shared storage."""
    from PIL import Image

    cluster.ensure_workers(2)
    root = cluster.root / "imagenet"  # outside the nodes' private disks: every node sees it
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 2)):
        for label in range(3):
            folder = root / split / f"n0{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.JPEG")
    storage = cluster.root / "shared" / "evals"
    settings = {"epochs": 2, "layers": 5, "channels": 8, "batch_size": 6, "image_size": 32, "auxiliary": False,
                "data.workers": 0, "data.root": str(root), "device": "cpu"}  # fmt: skip
    done = evaluation_driver(
        cluster, "darts_v2", "--dataset", "imagenet", "--workers", "2", "--storage", str(storage),
        "--name", "folder", settings=settings,
    )  # fmt: skip
    output, _ = done.communicate(timeout=400)
    assert done.returncode == 0, output
    run = evaluation_run(cluster, "folder")
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert run.data.params["dataset"] == "imagenet" and steps(cluster, run, "error/test_top1") == [1, 2]
    assert (storage / "evaluations" / "folder" / "checkpoint.pt").exists()
    stored = json.loads((storage / "evaluations" / "folder" / "result.json").read_text())
    assert stored["info"]["world_size"] == 2 and len(stored["history"]) == 2
    assert stored["history"][0]["lr"] == pytest.approx(0.1 * 0.97)  # ImageNet's protocol, epoch 1
