"""Sweeps on a Slurm cluster (cluster/slurm.sbatch): a real Slurm on this machine (Debian's
slurm-wlm and munge, controller and node daemon on loopback, started here with a configuration of
their own), one node of 2 CPUs and one GPU that Slurm counts (its device file is /dev/null: the
node has none that CUDA can use, and the trials ask for none).

Debian's slurmd is built without --enable-multiple-slurmd, so this machine runs one node daemon:
the tests show one node (the multi-node path of the script, a worker per further node, is the
same srun line with more nodes). Ray stays on 127.0.0.1 (Ray's single-machine switch)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "cluster" / "slurm.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd")

pytestmark = pytest.mark.slow
EPOCHS = 25  # about 30 s per search here: 4 searches outlast the signal, which comes 30-90 s into the job


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(Path(d) / name) for d in ("/usr/sbin", "/sbin") if (Path(d) / name).exists()), None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slurm:
    """A Slurm controller and node daemon of their own, under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.processes: list[subprocess.Popen] = []
        for folder in ("state", "spool", "log", "munge"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        munge = self.root / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        socket_path = munge / "munge.socket"
        subprocess.run(
            [_which("munged"), "--force", f"--key-file={key}", f"--socket={socket_path}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
             f"--seed-file={munge / 'munged.seed'}"],
            check=True, capture_output=True,
        )  # fmt: skip
        (self.root / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File=/dev/null\n")
        self.conf.write_text(
            "\n".join([
                "ClusterName=nas-test",
                f"SlurmctldHost={self.host}(127.0.0.1)",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "SlurmUser=root", "SlurmdUser=root",
                "AuthType=auth/munge", f"AuthInfo=socket={socket_path}",
                f"StateSaveLocation={self.root / 'state'}", f"SlurmdSpoolDir={self.root / 'spool'}",
                f"SlurmctldPidFile={self.root / 'slurmctld.pid'}", f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
                "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
                "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
                "MpiDefault=none", "ReturnToService=2", "JobRequeue=1", "KillWait=30", "GresTypes=gpu",
                f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=4000 Gres=gpu:1 State=UNKNOWN",
                f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
                "",
            ])
        )  # fmt: skip
        for daemon in ("slurmctld", "slurmd"):
            with open(self.root / "log" / f"{daemon}.out", "w") as log:  # the daemon keeps its own copy
                self.processes.append(
                    subprocess.Popen([_which(daemon), "-D", "-f", str(self.conf)], env=self.env, stdout=log, stderr=log)
                )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T").stdout.strip()
            if state == "idle":
                return
            time.sleep(1)
        raise RuntimeError(f"the Slurm node never became idle (state {state!r}): {self.logs()}")

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted((self.root / "log").glob("*")))

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(word.split("=", 1) for word in text.split() if "=" in word)

    def stop(self) -> None:
        self.run("scancel", "--full", "--user", "root")
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        pid = self.root / "munge" / "munged.pid"
        if pid.exists():
            subprocess.run(["kill", pid.read_text().strip()], check=False)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [d for d in (*DAEMONS, "sbatch", "scontrol") if _which(d) is None]
    if missing:
        pytest.skip(f"Slurm is not installed here (no {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test's Slurm daemons run as root")
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def sweep_file(work: Path, name: str, epochs: int, seeds: list[int]) -> Path:
    sweep = {
        "name": name,
        "search": {"epochs": epochs, "batch_size": 32, "model": {"channels": 4, "cells": 3, "nodes": 4},
                   "data": {"dataset": "synthetic", "subset": 192, "eval_split": "holdout", "eval_subset": 128,
                            "resolution": 8},
                   "discretize": {"bn_recal_batches": 2}},
        "space": {"preset": {"choices": ["darts", "da2s"]}, "seed": {"choices": seeds}},
        "sampler": {"type": "grid"},
        "concurrency": 1,
        "resources": {"cpu": 1},
        "storage": "runs/ray",
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def submit(slurm: Slurm, work: Path, sweep: Path, *options: str) -> str:
    # The checkout's run.py, this Python's Ray; Ray on loopback; the job's output in `work`.
    env_path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    done = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", f"--chdir={work}", "--export=ALL", *options, str(SBATCH), sweep.name],
        env={**slurm.env, "PATH": env_path, "NAS_RUN": str(ROOT / "sweeps" / "run.py"), "NAS_PYTHON": sys.executable,
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "NAS_RAY_PORT": str(free_port())},
        cwd=work, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def wait_for(slurm: Slurm, job_id: str, timeout: float, skip_requeue_delay: bool = False) -> dict[str, str]:
    """The job's record once it has ended for good (a requeued job starts again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = slurm.job(job_id)
        if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return job
        if skip_requeue_delay and job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime":
            slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")  # Slurm waits ~2 min otherwise
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not end in {timeout:.0f} s: {slurm.job(job_id)}\n{slurm.logs()}")


def trial_runs(work: Path, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    return client, [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("kind") == "trial"]


def test_a_sweep_submitted_with_sbatch_finishes_with_its_runs(slurm, tmp_path):
    sweep = sweep_file(tmp_path, "tiny", epochs=2, seeds=[1])
    job_id = submit(slurm, tmp_path, sweep, "--time=10", "--signal=B:USR1@60")
    job = wait_for(slurm, job_id, timeout=400)
    output = (tmp_path / f"slurm-nas-sweep-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", output[-3000:]
    assert job["Restarts"] == "0"
    assert "all 1 Ray nodes joined" in output and "the sweep's driver exited with 0" in output
    assert "1 GPUs per node" in output  # taken from Slurm's allocation
    assert (tmp_path / f"slurm-nas-sweep-{job_id}-ray.log").exists()  # Ray's own output apart
    _, runs = trial_runs(tmp_path, "tiny")
    assert sorted(r.data.params["preset"] for r in runs) == ["da2s", "darts"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_sweep_longer_than_its_time_limit_is_requeued_and_finished(slurm, tmp_path):
    """A 3-minute job whose sweep needs longer: Slurm's warning 90 s before the limit stops the
    driver (exit 130, its state saved), the job requeues itself, and the next attempt resumes."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    sweep = sweep_file(tmp_path, "long", epochs=EPOCHS, seeds=[1, 2])
    job_id = submit(slurm, tmp_path, sweep, "--time=3", "--signal=B:USR1@90")
    job = wait_for(slurm, job_id, timeout=900, skip_requeue_delay=True)
    output = (tmp_path / f"slurm-nas-sweep-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", output[-3000:]
    attempts = int(job["Restarts"])
    assert attempts >= 1, output[-3000:]
    assert f"[slurm job {job_id}, attempt 0] the time limit is near" in output
    assert "The sweep was interrupted. Finish it with" in output  # the driver's exit 130
    assert " INTERRUPTED " in output  # the trial the signal cut, listed as such (its values are partial)
    assert "requeued: the next attempt runs the sweep with --resume" in output
    assert "--resume" in output.split(f"[slurm job {job_id}, attempt 1]", 1)[1]
    assert "the sweep's driver exited with 0" in output

    client, runs = trial_runs(tmp_path, "long")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    keys = sorted((r.data.params["preset"], r.data.params["seed"]) for r in finished)
    assert keys == [("da2s", "1"), ("da2s", "2"), ("darts", "1"), ("darts", "2")]  # each trial once
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for run in finished:  # the trial the walltime cut resumed its run: every epoch once
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "accuracy/supernet"))
        assert steps == list(range(1, EPOCHS + 1)), steps
    study = optuna.load_study(
        study_name="long",
        storage=JournalStorage(JournalFileBackend(str(tmp_path / "runs" / "ray" / "long" / "optuna.journal"))),
    )
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4 and not [t for t in study.trials if t.state.name == "RUNNING"]
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 4

    # Another --resume (a job requeued once more, a repeated command): nothing left, said at once.
    done = subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), sweep.name, "--resume"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "Nothing to resume: the sweep has finished" in done.stdout, done.stderr
    assert "Started a local Ray instance" not in done.stderr  # ended before Ray
