"""Where a sweep keeps what must outlive a node: Ray's trial checkpoints, the evaluation stage's
checkpoints and results, MLflow calls still pending, the sweep's bookkeeping.

`storage:` in a sweep file is one of

- a local path (`runs/ray`): one machine only;
- a path on a filesystem that every node mounts at the same place (NFS, EFS, Lustre, ...);
- a URI of an object store: `s3://bucket/prefix` (AWS S3 or an S3-compatible store such as MinIO)
  or `gs://bucket/prefix`.

For S3 the endpoint and region come from `storage_options` in the sweep file or from the standard
environment variables (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_REGION` /
`AWS_DEFAULT_REGION`); credentials never come from the sweep file: each node finds its own (its
instance profile, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `~/.aws/credentials`).

`Storage` is one directory of it: a pyarrow filesystem and a path on it, joined with `/` (never
with `pathlib`, which would turn `s3://b/x` into `s3:/b/x`). It pickles, so trials and evaluation
tasks on other nodes receive it; credentials that the filesystem found itself are not pickled.
`check_every_node_sees` is the pre-flight check that the storage is shared on a cluster.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

from nas.config import ConfigError

log = logging.getLogger(__name__)

SCHEMES = ("s3", "gs")
# Filesystems that other machines can mount too: a path on one of them can be shared by nodes
# that an autoscaler adds later. (fuse.*: s3fs, gcsfuse, JuiceFS and similar.)
SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "glusterfs", "ceph", "beegfs", "wekafs")
WHAT_TO_USE = (
    "a multi-node sweep needs storage that every node reaches: an s3:// or gs:// URI "
    "(e.g. s3://my-bucket/da2s-nas) or a shared filesystem (NFS, EFS) mounted at the same path on every node"
)


@dataclass(frozen=True)
class Storage:
    """A directory (or file) on a local path, a shared filesystem or an object store."""

    uri: str  # as shown to users: an absolute path, or scheme://bucket/key
    fs: pafs.FileSystem
    path: str  # the path on `fs`: absolute for local paths, bucket/key for object stores

    # ------------------------------------------------------------------ naming
    @property
    def is_uri(self) -> bool:
        return "://" in self.uri

    @property
    def local_path(self) -> Path | None:
        """The path on this machine, for a local or shared-filesystem storage."""
        return None if self.is_uri else Path(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def __truediv__(self, name: str) -> Storage:
        name = str(name).strip("/")
        return Storage(f"{self.uri.rstrip('/')}/{name}", self.fs, posixpath.join(self.path, name))

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        if self.is_uri:
            raise TypeError(f"{self.uri} is not a local path")
        return self.path

    # ------------------------------------------------------------------ Ray
    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """`storage_path` and `storage_filesystem` for Ray Tune's RunConfig and Tuner.restore."""
        return (self.path, self.fs) if self.is_uri else (self.path, None)

    def check_reachable(self) -> None:
        """For an object store: its bucket answers to this machine's credentials (ConfigError if not)."""
        if not self.is_uri:
            return
        bucket = self.path.split("/", 1)[0]
        try:
            found = self.fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError as err:
            raise ConfigError("storage", self.uri, f"cannot be reached from the driver ({err})") from None
        if not found:
            raise ConfigError(
                "storage", self.uri, f"bucket {bucket!r} does not exist or these credentials cannot see it; create it"
            )

    # ------------------------------------------------------------------ reading
    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def children(self) -> list[str]:
        """Names of the entries directly inside this directory ([] if it does not exist)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in self.fs.get_file_info(selector))

    def glob(self, pattern: str) -> list[Storage]:
        """Files below this directory whose path relative to it matches `pattern` (fnmatch: `*`
        crosses `/`, so `*name` finds `name` at any depth)."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        found = []
        base = self.path.rstrip("/") + "/"
        for entry in self.fs.get_file_info(selector):
            if entry.type != pafs.FileType.File or not entry.path.startswith(base):
                continue
            relative = entry.path[len(base) :]
            if fnmatch.fnmatchcase(relative, pattern):
                found.append((entry.mtime, self / relative))
        return [f for _, f in sorted(found, key=lambda item: (item[0] is None, item[0], item[1].path))]

    # ------------------------------------------------------------------ writing
    def write_bytes(self, data: bytes) -> None:
        parent = posixpath.dirname(self.path)
        if parent and not self.is_uri:
            self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def upload(self, local: str | os.PathLike) -> None:
        """Copies the local file `local` to this path (whole, or not at all for object stores)."""
        self.write_bytes(Path(local).read_bytes())

    def download(self, local: str | os.PathLike) -> bool:
        """Copies this file to `local`; False if it does not exist."""
        try:
            data = self.read_bytes()
        except FileNotFoundError:
            return False
        target = Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        partial.write_bytes(data)
        partial.replace(target)
        return True

    def delete(self) -> None:
        info = self.info()
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type != pafs.FileType.NotFound:
            self.fs.delete_file(self.path)


# ---------------------------------------------------------------------- opening


def _scheme(text: str) -> str | None:
    return text.split("://", 1)[0].lower() if "://" in text else None


def check_storage_text(text: str, field: str = "storage") -> None:
    """Rejects what cannot be a sweep's storage, without touching it (config validation)."""
    scheme = _scheme(text)
    if not text.strip():
        raise ConfigError(field, text, "expected a path, or an s3:// or gs:// URI")
    if scheme is None:
        return
    if scheme not in SCHEMES:
        raise ConfigError(
            field, text, "expected a path (local, or a shared filesystem such as NFS/EFS) or an s3:// or gs:// URI"
        )
    rest = text.split("://", 1)[1]
    if "@" in rest.split("/", 1)[0]:
        raise ConfigError(
            field,
            f"{scheme}://***@{rest.split('@', 1)[1]}",
            "credentials never go in the sweep file: give each node its own (an instance profile, or the "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables, or ~/.aws/credentials)",
        )
    if not rest.split("/", 1)[0]:
        raise ConfigError(field, text, f"names no bucket; expected {scheme}://BUCKET/PREFIX")


def _endpoint(given: str | None) -> tuple[str | None, str | None]:
    """(host:port, scheme) of an S3-compatible endpoint: the sweep's, else the standard variables."""
    endpoint = given or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None, None
    scheme, _, host = endpoint.rpartition("://")
    return host.rstrip("/"), (scheme or "https")


def open_storage(
    text: str, base: str | os.PathLike | None = None, endpoint: str | None = None, region: str | None = None
) -> Storage:
    """The storage named by a sweep's `storage:` (relative paths against `base`)."""
    check_storage_text(text)
    scheme = _scheme(text)
    if scheme is None:
        path = (Path(base or os.getcwd()) / os.path.expanduser(text)).resolve()
        return Storage(str(path), pafs.LocalFileSystem(), str(path))
    rest = text.split("://", 1)[1].strip("/")
    uri = f"{scheme}://{rest}"
    if scheme == "s3":
        host, http = _endpoint(endpoint)
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region is None and host is None:
            try:  # AWS itself: the bucket's own region
                region = pafs.resolve_s3_region(rest.split("/", 1)[0])
            except Exception as err:
                raise ConfigError(
                    "storage", text, f"its bucket's region could not be found ({err}); set storage_options.region"
                ) from None
        # allow_delayed_open: files below the part size go up in one PutObject request, not as a
        # multipart upload (fewer requests; and S3-compatible servers differ most in multipart).
        filesystem = pafs.S3FileSystem(
            region=region or "us-east-1",
            endpoint_override=host,
            scheme=http or "https",
            connect_timeout=10,
            allow_delayed_open=True,
        )
    else:
        host, http = _endpoint(endpoint) if endpoint else (None, None)
        options: dict[str, Any] = {"endpoint_override": host, "scheme": http} if host else {}
        filesystem = pafs.GcsFileSystem(**options)
    return Storage(uri, filesystem, rest)


# ---------------------------------------------------------------------- shared or not


def filesystem_type(path: str | os.PathLike, mounts: str = "/proc/self/mountinfo") -> str:
    """The type of the filesystem holding `path` (its nearest existing ancestor), from mountinfo."""
    target = Path(path).resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    best, kind = "", "unknown"
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        after = line.split(" - ", 1)[1].split()
        inside = str(target) == point or str(target).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, after[0]
    return kind


def is_shared_filesystem(kind: str) -> bool:
    return kind in SHARED_FILESYSTEMS or kind.startswith("fuse.")


def check_for_added_nodes(storage: Storage, can_grow: bool, kind: str | None = None, declared: bool = False) -> None:
    """Nodes that an autoscaler adds later cannot be asked now: a path for a cluster that can grow
    must lie on a filesystem other machines mount too (`kind`: its type, looked up if None), or be
    `declared` shared (storage_options.shared)."""
    if not can_grow or storage.is_uri or declared:
        return
    kind = kind or filesystem_type(storage.path)
    if not is_shared_filesystem(kind):
        raise ConfigError(
            "storage",
            storage.uri,
            f"is on this node's own disk ({kind}), and the cluster's autoscaler adds nodes that cannot see it; "
            + WHAT_TO_USE
            + " (if every node mounts this path, say so: storage_options.shared: true)",
        )


def _sees(marker: Storage, expected: str) -> str | None:
    """Runs on one node: None when `marker` holds `expected` there, else what it found."""
    try:
        text = marker.read_text()
    except FileNotFoundError:
        return "the driver's test file is not there"
    except Exception as err:
        return f"it cannot be read there ({type(err).__name__}: {err})"
    return None if text == expected else "it holds another test file there"


def check_every_node_sees(
    storage: Storage, *, can_grow: bool = False, declared: bool = False, timeout: float = 120.0
) -> None:
    """Before any trial starts, on a Ray cluster (or one whose autoscaler can add nodes): every
    node must see the sweep's storage. The driver writes a test file there and a task pinned to
    each other alive node reads it; a path that nodes added later would not see (not on a shared
    filesystem, not `declared` shared) is refused too. `can_grow`: the autoscaler may add nodes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    check_for_added_nodes(storage, can_grow, declared=declared)
    if not others:
        return
    # The test file goes where the sweep's directories will be; what this check creates, it removes.
    created = None
    if not storage.is_uri:
        created = Path(storage.path)
        while not created.parent.exists():
            created = created.parent
        created = None if created.exists() else created
    marker = storage / f".shared-check-{uuid.uuid4().hex}"
    expected = uuid.uuid4().hex
    try:
        try:
            marker.write_text(expected)
        except Exception as err:
            raise ConfigError("storage", storage.uri, f"cannot be written ({type(err).__name__}: {err})") from None
        task = ray.remote(num_cpus=0, max_retries=0)(_sees)
        refs = {
            node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                marker, expected
            )
            for node in others
        }
        _, waiting = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        problems = {}
        for node, ref in refs.items():
            if ref in waiting:
                log.warning("storage check: node %s did not answer within %.0fs; not checked", node[:8], timeout)
                continue
            try:
                problem = ray.get(ref)
            except Exception as err:  # the node went away meanwhile
                log.warning("storage check: node %s could not run the check (%s)", node[:8], err)
                continue
            if problem:
                problems[node] = problem
    finally:
        try:
            marker.delete()
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
        except Exception as err:
            log.warning("storage check: could not remove %s (%s)", marker.uri, err)
    if problems:
        node, problem = next(iter(problems.items()))
        count = f"{len(problems)} of the cluster's {len(others) + 1} nodes" if len(problems) > 1 else "a node"
        if storage.is_uri:
            advice = (
                "give every node access to it (an instance profile, or AWS_* environment variables on every "
                "node; the endpoint and region go in storage_options)"
            )
        else:
            advice = f"it is not shared; {WHAT_TO_USE}"
        raise ConfigError("storage", storage.uri, f"{count} cannot use it (node {node[:8]}: {problem}); {advice}")
