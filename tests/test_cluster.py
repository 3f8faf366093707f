"""cluster.yaml is a valid Ray cluster-launcher config (validated offline against Ray's own schema)
and sets up what a sweep on it needs; its setup and start commands run as Ray's launcher runs
them, in a login shell, with the commands that reach the cloud or start Ray stubbed."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_schema_check_catches_a_broken_config(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "none"
    with pytest.raises(Exception, match=r"min_workers|not of type"):
        validate_config(prepare_config(broken))


def test_gpu_workers_project_install_and_mlflow_server(cluster):
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # AWS GPU instance families
    assert gpu["max_workers"] >= 1
    setup = " ".join(cluster["setup_commands"])
    assert 'pip install -c ~/da2s-nas/constraints.txt -e "$HOME/da2s-nas[server]"' in setup and "ray[default]" in setup
    assert cluster["file_mounts"]["/home/ubuntu/da2s-nas"] == "."
    head = " ".join(cluster["head_start_ray_commands"])
    assert "python sweeps/server.py start --host" in head and "--no-auth" not in head
    # Every node logs with the tracking server's credentials; the head's server reads its store's settings.
    assert cluster["file_mounts"]["/home/ubuntu/.mlflow/credentials"] == "~/.mlflow/credentials"
    assert cluster["file_mounts"]["/home/ubuntu/.mlflow/server.ini"] == "~/.mlflow/server.ini"
    assert "MLFLOW_TRACKING_URI" in " ".join(cluster["head_setup_commands"])


def test_only_ssh_is_open_to_the_outside(cluster):
    permissions = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in permissions] == [(22, 22)]
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "--host 0.0.0.0" not in head  # the MLflow server binds the internal address


def test_ray_token_authentication_is_on_with_one_shared_token(cluster):
    assert cluster["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert any("RAY_AUTH_MODE=token" in c for c in cluster["setup_commands"])


def test_spot_gpu_workers_with_declared_resources_image_and_instance_profile(cluster):
    from tuning.preflight import check_request, node_types_from_yaml

    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert gpu["node_config"]["IamInstanceProfile"]["Name"]
    for node_type in cluster["available_node_types"].values():  # one image, with its Python, everywhere
        assert node_type["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/")
        assert "ubuntu-24.04" in node_type["node_config"]["ImageId"]
    # What the sweep's resource check reads on the head: the table4 request fits a worker type.
    types = node_types_from_yaml(cluster)
    assert [t.name for t in types] == ["gpu_worker"] and types[0].resources == {"CPU": 8.0, "GPU": 1.0}
    assert not check_request("resources", 4, 0.5, [], types).live


# Runs every command as Ray's node updater does (its own wrapper functions), in a PID namespace of
# its own so that `pkill` sees only the processes started here.
HARNESS = r"""
import json, os, subprocess, sys
from ray.autoscaler._private.command_runner import _with_environment_variables, _with_interactive

def run(cmd):
    line = " ".join(_with_interactive(_with_environment_variables(cmd, {"RAY_HEAD_IP": "10.0.0.5"})))
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60)
    return {"command": cmd, "rc": done.returncode, "output": (done.stdout + done.stderr)[-2000:]}

def servers():
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if len(cmdline) > 2 and cmdline[1].endswith(b"/mlflow") and cmdline[2] == b"server":
            found.append(int(pid))
    return found

stages = json.loads(sys.argv[1])
report = {}
for name, commands in stages:
    report.setdefault(name, []).extend(run(c) for c in commands)
    report.setdefault("servers", []).append(servers())
print(json.dumps(report))
"""

SHIM = """#!/bin/sh
echo "$(basename "$0") $*" >> "$SHIM_LOG"
"""
# A stand-in MLflow server: a long-running process whose command line is `.../mlflow server ...`.
MLFLOW_SHIM = """#!{python}
import os, sys, time
with open(os.environ["SHIM_LOG"], "a") as log:
    log.write("mlflow " + " ".join(sys.argv[1:]) + "\\n")
if sys.argv[1:2] == ["server"]:
    time.sleep(60)
"""
# python sweeps/server.py start ...: the stand-in MLflow server, left running as the real script leaves it.
PYTHON_SHIM = (
    SHIM
    + """case "$1" in *sweeps/server.py) shift; setsid "$(dirname "$0")/mlflow" server "$@" > /dev/null 2>&1 < /dev/null &
    sleep 1 ;; esac
exit 0
"""
)
# python3 -m venv DIR: an empty activate script.
PYTHON3_SHIM = (
    SHIM
    + """[ "$1 $2" = "-m venv" ] && mkdir -p "$3/bin" && : > "$3/bin/activate"
exit 0
"""
)


def run_launcher_commands(tmp_path: Path, stages: list) -> tuple[dict, list[str]]:
    home, shims = tmp_path / "home", tmp_path / "shims"
    home.mkdir()
    shims.mkdir()
    (home / "da2s-nas").mkdir()  # the checkout, as file_mounts puts it
    for name in ("ray", "pip", "aws", "nvidia-smi", "nvidia-cuda-mps-control", "sudo", "apt-get"):
        (shims / name).write_text(SHIM)
    (shims / "python").write_text(PYTHON_SHIM)
    (shims / "python3").write_text(PYTHON3_SHIM)
    (shims / "hostname").write_text(SHIM + "echo 10.0.0.4\n")
    (shims / "mlflow").write_text(MLFLOW_SHIM.format(python=sys.executable))
    for shim in shims.iterdir():
        shim.chmod(0o755)
    # As on Ubuntu: a login shell reads ~/.profile, which reads ~/.bashrc. (/etc/profile resets
    # PATH before, so nothing but the stubs and the system's own tools is found.)
    (home / ".profile").write_text(f'export PATH="{shims}:$PATH"\n[ -f ~/.bashrc ] && . ~/.bashrc\n')
    (home / ".bashrc").write_text("# ~/.bashrc\n")
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    log = tmp_path / "shims.log"
    env = {"HOME": str(home), "SHIM_LOG": str(log), "PATH": f"{shims}:/usr/bin:/bin", "TERM": "dumb",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(harness), json.dumps(stages)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), log.read_text().splitlines() if log.exists() else []


def test_setup_and_start_commands_run_under_rays_login_shell(cluster, tmp_path):
    head = cluster["setup_commands"] + cluster["head_setup_commands"]
    start = cluster["head_start_ray_commands"]
    worker = cluster["setup_commands"] + cluster["worker_setup_commands"] + cluster["worker_start_ray_commands"]
    # The head started twice (`ray up` again on a running cluster): the second start replaces the
    # first MLflow server instead of killing its own shell.
    report, calls = run_launcher_commands(tmp_path, [["head", head], ["start", start], ["restart", start],
                                                     ["worker", worker]])  # fmt: skip
    for stage in ("head", "start", "restart", "worker"):
        for result in report[stage]:
            assert result["rc"] == 0, result
    first, second = report["servers"][1], report["servers"][2]
    assert len(first) == 1 and len(second) == 1 and first != second  # the old server stopped, a new one runs
    assert [c for c in calls if c.startswith("ray start --head")] == [
        "ray start --head --port=6379 --object-manager-port=8076 --autoscaling-config=~/ray_bootstrap_config.yaml "
        "--dashboard-host=127.0.0.1"
    ] * 2
    # (Ray's wrapper exports RAY_HEAD_IP as a JSON string, quotes included.)
    assert any(c.startswith("ray start --address=") and "10.0.0.5" in c and ":6379" in c for c in calls)
    assert (
        f"python -m pip install -c {tmp_path}/home/da2s-nas/constraints.txt -e {tmp_path}/home/da2s-nas[server] "
        "ray[default]==2.60.0 boto3>=1.4.8"
    ) in calls
    assert any(c.startswith("nvidia-smi") for c in calls)  # the workers check their GPU
    assert "nvidia-cuda-mps-control -d" in calls  # and start MPS for trials sharing it
    home = tmp_path / "home"
    bashrc = (home / ".bashrc").read_text()
    assert "source ~/venv/bin/activate" in bashrc and "NAS_DATA_ROOT=$HOME/data" in bashrc
    assert "MLFLOW_TRACKING_URI=http://10.0.0.4:5000" in bashrc
    assert [c for c in calls if "sweeps/server.py" in c] == [
        "python sweeps/server.py start --host 10.0.0.4 --port 5000"
    ] * 2


def test_the_shell_check_catches_a_self_killing_command(tmp_path):
    """The command this config once had: its pattern is in its own shell's command line."""
    report, _ = run_launcher_commands(tmp_path, [["start", ['pkill -f "mlflow server" || true']]])
    assert report["start"][0]["rc"] == 143  # killed by its own SIGTERM
