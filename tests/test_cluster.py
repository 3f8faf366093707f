"""cluster.yaml is a valid Ray cluster-launcher config (validated offline against Ray's own schema)
and sets up what a sweep on it needs."""

from __future__ import annotations

import copy
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
    assert "pip install -e /home/ubuntu/da2s-nas" in setup and "ray[default]" in setup
    assert cluster["file_mounts"]["/home/ubuntu/da2s-nas"] == "."
    head = " ".join(cluster["head_start_ray_commands"])
    assert "mlflow server" in head and "--serve-artifacts" in head
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
