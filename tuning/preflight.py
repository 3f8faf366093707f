"""Before the first trial: which Ray to use, whether the trials' resources can ever be granted, and
whether the sweep's output, data and tracking store are usable (check_before_ray, check_on_ray).

Ray is chosen as follows. No address: a new private instance on this machine, always (never a
cluster named in Ray's temp folder, which may be long gone). An address (`auto` on a cluster
node, or HOST:PORT): it must answer within about a minute, or the sweep stops with an error
naming `--address`.

Resources are checked per node, as Ray schedules them: a trial's CPUs and GPUs must fit on one
node. A cluster that scales itself counts with the nodes its autoscaler can add: a request that
some node type offers is accepted even while the cluster has no such node (the sweep then waits,
and says so), and only a request that no node, present or possible, can ever grant is refused.
The node types come from the autoscaler's config: the one Ray's cluster launcher leaves on the
head (`~/ray_bootstrap_config.yaml`), another file given with `--cluster-config`, or the cluster
config the autoscaler reported to Ray (KubeRay does).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from nas.config import ConfigError
from nas.data import load_cifar10
from nas.evaluate import EvalConfig
from nas.settings import SearchConfig

from .recovery import LEFTOVERS
from .storage import Storage, check_every_node_sees

log = logging.getLogger(__name__)

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
CONNECT_TIMEOUT_S = 20.0  # to reach the address at all; then up to ~40 s for Ray's own handshake


# --- which Ray ---------------------------------------------------------------------------------


def resolve_address(address: str) -> str:
    """HOST:PORT of the cluster `address` names, or a ConfigError naming `--address`.

    `auto`: $RAY_ADDRESS, else the cluster the last `ray start --head` on this machine recorded in
    Ray's temp folder (as on a `ray up` head). Unlike Ray's own `auto`, never just any Ray instance
    found running on the machine (another user's, say)."""
    from ray._common.utils import get_ray_address_file
    from ray._private import services

    named = address
    if address == "auto":
        named = os.environ.get("RAY_ADDRESS") or ""
        recorded = Path(get_ray_address_file(None))
        if not named and recorded.is_file():
            named = recorded.read_text().strip()
        if not named:
            raise ConfigError(
                "--address", address, f"no Ray cluster is recorded on this machine ({recorded}); give HOST:PORT"
            )
    try:
        resolved = services.canonicalize_bootstrap_address(named)
    except (ConnectionError, ValueError) as err:
        raise ConfigError("--address", address, f"names no Ray cluster ({err})") from None
    if not resolved:
        raise ConfigError("--address", address, "names no Ray cluster; leave --address out for a local Ray instance")
    return resolved


def check_reachable(address: str, resolved: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raises a ConfigError unless a Ray cluster answers at `resolved` (HOST:PORT) in time.

    A TCP connection first (a dead address, e.g. the leftover of a stopped cluster, fails after
    `timeout_s`), then one call to the cluster's GCS, which Ray gives up on after ~40 s."""
    host, _, port = resolved.rpartition(":")
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(3.0, timeout_s)):
                break
        except OSError as err:
            last = err
        if time.monotonic() >= deadline:
            raise ConfigError(
                "--address",
                address,
                f"no Ray cluster answers at {resolved} ({last}; tried for {timeout_s:.0f}s). Is the cluster up "
                "(`ray status`)? Leave --address out to run on a new local Ray instance",
            )
        time.sleep(1.0)
    try:
        from ray._raylet import GcsClient

        GcsClient(address=resolved).internal_kv_get(b"__da2s_probe", None, timeout=10)
    except Exception as err:
        raise ConfigError(
            "--address", address, f"{resolved} accepts connections but no Ray cluster answers there ({err})"
        ) from None


# --- whether the resources exist ---------------------------------------------------------------


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]
    max_workers: int | None = None  # None: present now (a live node), not a type to scale


def autoscaler_node_types(cluster_config: str | os.PathLike | None = None) -> list[NodeType] | None:
    """The node types the cluster's autoscaler can add, or None where no autoscaler config is found.

    `cluster_config`: a Ray cluster-launcher YAML (as `ray up` takes it, or the head's
    ~/ray_bootstrap_config.yaml); by default the head's file where this runs on a head."""
    path = Path(cluster_config).expanduser() if cluster_config else Path(BOOTSTRAP_CONFIG).expanduser()
    if cluster_config and not path.is_file():
        raise ConfigError("--cluster-config", str(cluster_config), "file not found")
    if path.is_file():
        return node_types_from_yaml(yaml.safe_load(path.read_text()), str(path))
    return _reported_node_types()


def node_types_from_yaml(config: dict[str, Any], where: str = "cluster config") -> list[NodeType]:
    """The worker node types of a cluster-launcher config (the head is a live node already)."""
    types = (config or {}).get("available_node_types") or {}
    if not isinstance(types, dict) or not types:
        raise ConfigError("--cluster-config", where, "has no available_node_types")
    return [
        NodeType(name, {k: float(v) for k, v in ((spec or {}).get("resources") or {}).items()},
                 int((spec or {}).get("max_workers", config.get("max_workers", 0)) or 0))
        for name, spec in types.items()
        if name != config.get("head_node_type")
    ]  # fmt: skip


def _reported_node_types() -> list[NodeType] | None:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:
        return None
    if config is None or not config.node_group_configs:
        return None
    return [
        NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, None if g.max_count < 0 else g.max_count)
        for g in config.node_group_configs
    ]


def live_nodes() -> list[NodeType]:
    import ray

    return [
        NodeType(n.get("NodeManagerAddress", "node"), {k: float(v) for k, v in n["Resources"].items()})
        for n in ray.nodes()
        if n.get("Alive")
    ]


def _fits(request: dict[str, float], offer: dict[str, float]) -> bool:
    return all(offer.get(key, 0.0) >= amount - 1e-9 for key, amount in request.items() if amount > 0)


def _describe(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or k.startswith("accelerator_type")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


@dataclass
class Verdict:
    """Where a request fits: now (`live`), or once the autoscaler adds one of `node_types`."""

    live: bool
    node_types: list[str]


def check_request(
    prefix: str, cpu: float, gpu: float, nodes: list[NodeType], scalable: list[NodeType] | None
) -> Verdict:
    """Where `cpu` CPUs and `gpu` GPUs fit together on one node: on a live one, or on one of the node
    types the autoscaler can add. Otherwise a ConfigError naming `PREFIX.gpu` (no node offers that
    many GPUs at all) or `PREFIX.cpu`."""
    request = {"CPU": cpu, "GPU": gpu}
    if any(_fits(request, n.resources) for n in nodes):
        return Verdict(True, [])
    possible = [t for t in scalable or [] if t.max_workers is None or t.max_workers > 0]
    fitting = [t.name for t in possible if _fits(request, t.resources)]
    if fitting:
        return Verdict(False, fitting)
    offers = [n.resources for n in nodes] + [t.resources for t in possible]
    field, value = (f"{prefix}.gpu", gpu) if not any(_fits({"GPU": gpu}, o) for o in offers) else (f"{prefix}.cpu", cpu)
    asked = f"cpu: {cpu:g} with gpu: {gpu:g} on one node"
    present = ", ".join(_describe(n.resources) for n in nodes) or "none"
    if scalable is None:
        reason = (
            f"no node of the Ray cluster offers {asked} (its nodes: {present}), and no autoscaler config was "
            f"found ({BOOTSTRAP_CONFIG}, or give --cluster-config) that could add one; "
            "use gpu: 0 for a machine without GPUs"
        )
    else:
        types = ", ".join(f"{t.name} {_describe(t.resources)}" for t in possible) or "none"
        reason = (
            f"no node of the Ray cluster offers {asked} (its nodes: {present}), and no node type its "
            f"autoscaler can add does (types: {types})"
        )
    raise ConfigError(field, value, reason)


def sweep_requests(sweep) -> list[tuple[str, Any]]:
    """(field, resources) of what a sweep asks for: each trial, and each evaluation worker."""
    requests = [("resources", sweep.resources)]
    if sweep.evaluate is not None:
        requests.append(("evaluate.resources", sweep.evaluate.resources))
    return requests


def check_cluster_resources(
    requests: list[tuple[str, Any]], cluster_config: str | os.PathLike | None = None, local: bool = False
) -> list[str]:
    """Pre-flight of `requests` (field, resources) on the Ray this driver is connected to: refused
    where no node, present or addable, can grant one; returns lines for the progress log."""
    nodes = live_nodes()
    scalable = None if local else autoscaler_node_types(cluster_config)
    lines = []
    for prefix, resources in requests:
        cpu, gpu = resources.cpu, resources.gpu
        verdict = check_request(prefix, cpu, gpu, nodes, scalable)
        if not verdict.live:
            lines.append(
                f"{prefix} (cpu: {cpu:g}, gpu: {gpu:g}): no node offers them yet; the trials wait for the "
                f"autoscaler to add a node of type {' or '.join(verdict.node_types)}"
            )
        if getattr(resources, "workers", 1) > 1:
            lines += check_workers(prefix, resources, nodes, scalable)
    return lines


def check_workers(prefix: str, resources, nodes: list[NodeType], scalable: list[NodeType] | None) -> list[str]:
    """A data-parallel evaluation starts once every worker has its place: refused when the cluster
    can never hold `workers` of them at once (its nodes now, and those its autoscaler may add)."""
    request = {"CPU": resources.cpu, "GPU": resources.gpu}

    def holds(offer: dict[str, float]) -> int:
        counts = [int(offer.get(k, 0.0) / v + 1e-9) for k, v in request.items() if v > 0]
        return min(counts) if counts else 0

    live = sum(holds(n.resources) for n in nodes)
    if live >= resources.workers:
        return []
    addable = [t for t in scalable or [] if holds(t.resources) > 0 and (t.max_workers is None or t.max_workers > 0)]
    unbounded = any(t.max_workers is None for t in addable)
    reachable = live + sum(holds(t.resources) * (t.max_workers or 0) for t in addable)
    if unbounded or reachable >= resources.workers:
        return [
            f"{prefix}.workers ({resources.workers} of {_describe(request)}): the cluster holds "
            f"{live} now; the evaluations wait for the autoscaler to add nodes"
        ]
    present = ", ".join(_describe(n.resources) for n in nodes) or "none"
    raise ConfigError(
        f"{prefix}.workers",
        resources.workers,
        f"the cluster can hold at most {reachable} workers of "
        f"{_describe(request)} at once (its nodes: {present}); ask for fewer workers, or fewer CPUs or GPUs each",
    )


def check_devices(sweep) -> None:
    """A device that contradicts the GPUs reserved for it: `cuda` with none reserved is refused."""
    stages = [("search.device", sweep.base_search().device, "resources.gpu", sweep.resources.gpu)]
    if sweep.evaluate is not None:
        device = EvalConfig.resolve(sweep.evaluate.datasets[0], sweep.evaluate.settings).device
        stages.append(("evaluate.settings.device", device, "evaluate.resources.gpu", sweep.evaluate.resources.gpu))
    for field, device, gpu_field, gpu in stages:
        if device == "cuda" and gpu <= 0:
            raise ConfigError(
                field,
                device,
                f"needs a GPU, and {gpu_field} is 0 (such trials see no GPU); set {gpu_field} > 0 or use auto",
            )
        if device == "cpu" and gpu > 0:
            log.warning("%s is cpu while %s is %g: these trials hold GPUs they do not use", field, gpu_field, gpu)


# --- the sweep's output, data and tracking store ------------------------------------------------


def check_before_ray(sweep, base: Path, storage: Storage, experiment_dir: Storage, search: dict[str, Any],
                     resume: bool, local: bool) -> None:  # fmt: skip
    """Every check that needs no Ray; what they try (writing to the storage) is removed again: a
    refused sweep leaves no trace."""
    storage.check_reachable()
    check_output(experiment_dir, resume)
    if storage.local_path is not None:
        check_writable(storage.local_path, "storage")
    check_devices(sweep)
    if local:
        check_gpus_here(sweep_requests(sweep))
    check_data(search)
    store = sqlite_path(sweep.mlflow.tracking_uri, base)
    if store is not None:
        check_writable(store.parent, "mlflow.tracking_uri")
    check_tracking_server(sweep.mlflow.tracking_uri)


def check_tracking_server(uri: str) -> None:
    """A tracking server answers and takes this machine's credentials (MLflow's own:
    $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD, else ~/.mlflow/credentials)."""
    from .tracking_server import client_credentials, credentials_status

    if uri == "auto":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.startswith(("http://", "https://")):
        return
    uri = uri.rstrip("/")
    username, password = client_credentials()
    status = credentials_status(uri, username, password)
    if status == 0:
        raise ConfigError("mlflow.tracking_uri", uri, "no MLflow server answers there; start it, or check the address")
    if status == 401:
        given = f"those of user {username!r} were refused" if username else "none were given"
        raise ConfigError(
            "mlflow.tracking_uri", uri,
            f"the server asks for credentials and {given}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
            f"or write them to ~/.mlflow/credentials on every node (docs/cluster.md, \"The tracking server\")",
        )  # fmt: skip
    if status == 403:
        raise ConfigError(
            "mlflow.tracking_uri", uri, f"user {username!r} may not read experiments there; ask its administrator"
        )


def check_on_ray(sweep, storage: Storage, cluster_config: str | None, address: str | None) -> None:
    """Once Ray runs: resources that no node, present or addable by the autoscaler, offers stop the
    sweep; and every node must see the storage (checkpoints written on one node are restored on
    another)."""
    for line in check_cluster_resources(sweep_requests(sweep), cluster_config, local=address is None):
        log.info("%s", line)
    types = autoscaler_node_types(cluster_config) if address is not None else None
    can_grow = any(t.max_workers is None or t.max_workers > 0 for t in types or [])
    check_every_node_sees(storage, can_grow=can_grow, declared=sweep.storage_options.shared)


def check_output(experiment_dir: Storage, resume: bool) -> None:
    """A new sweep needs a fresh directory; a resumed one, the state of the sweep it resumes."""
    try:
        exists = experiment_dir.exists()
        path, filesystem = experiment_dir.ray_storage()
        has_state = tune.Tuner.can_restore(path, storage_filesystem=filesystem) if exists else False
    except OSError as err:  # an object store that cannot be reached, or refuses these credentials
        raise ConfigError("storage", experiment_dir.uri, f"cannot be reached from the driver ({err})") from None
    if resume and not has_state:
        raise ConfigError("--resume", str(experiment_dir), "holds no sweep to resume; run without --resume to start it")
    if not resume and has_state:
        raise ConfigError(
            "name",
            experiment_dir.name,
            f"a sweep of this name already has results in {experiment_dir}: add --resume to finish it, "
            "or give the new sweep another name (nothing was changed)",
        )
    if not resume and exists and any(name not in LEFTOVERS for name in experiment_dir.children()):
        raise ConfigError("storage", str(experiment_dir), "exists and is not a sweep; choose another name or storage")


def check_writable(path: Path, name: str) -> None:
    """`path` can be created and written: tried for real (a directory made and a file written in
    it, root's permissions and read-only or pseudo filesystems included), and everything the try
    created removed again, so a refused sweep leaves no trace."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            name, str(path), f"cannot be written ({existing} is not a directory); choose a writable location"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(name, str(path), f"cannot be written ({reason}); choose a writable location") from None
    finally:
        created = path
        while created != existing and created.exists() and not any(created.iterdir()):
            created.rmdir()
            created = created.parent


def sqlite_path(uri: str, base: Path) -> Path | None:
    """Where a local sqlite MLflow store would be, before anything creates it."""
    if uri == "auto":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///runs/mlflow.db"
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///") :]
        return Path(rest) if rest.startswith("/") else base / rest
    return None if "://" in uri else base / uri


def check_gpus_here(requests: list[tuple[str, Any]]) -> None:
    """On a local run, GPUs the machine does not have stop the sweep before Ray starts."""
    import torch

    gpus = torch.cuda.device_count()
    for prefix, resources in requests:
        asked = resources.gpu * getattr(resources, "workers", 1)
        if asked > gpus:
            raise ConfigError(
                f"{prefix}.gpu", resources.gpu,
                f"this machine has {gpus} GPUs; use gpu: 0, or --address to run on a GPU cluster",
            )  # fmt: skip


def check_data(search: dict[str, Any]) -> None:
    """The data the trials will read is there (or can be downloaded): `search`, the trials' fixed
    settings with the data root made absolute."""
    data = SearchConfig.resolve(file=search).data
    if data.dataset == "cifar10":
        load_cifar10(data.root, data.download)  # raises DataNotFoundError


class WaitingTrials(tune.Callback):
    """A progress line now and then while trials wait for a node that can take them (one the
    autoscaler is adding); not while they merely wait for a busy node to free up."""

    def __init__(self, request: dict[str, float], every_s: float = 15.0):
        self.request = {k: v for k, v in request.items() if v > 0}
        self.every_s = every_s
        self._last = time.monotonic()

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        waiting = sum(t.status == "PENDING" for t in trials)
        if not waiting or any(_fits(self.request, n.resources) for n in live_nodes()):
            return
        log.info(
            "waiting   %d trial(s) for a node with %s: none in the cluster yet, the autoscaler adds them",
            waiting, _describe(self.request),
        )  # fmt: skip
