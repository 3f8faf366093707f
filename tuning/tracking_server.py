"""The tracking server of a cluster: MLflow's server with basic authentication, its runs in a database
that outlives the head (PostgreSQL on a cluster, sqlite on one machine) and its artifacts on the
sweep's object store or shared filesystem.

Where each setting comes from, first found wins:

- the store: `--backend-store-uri`, $MLFLOW_BACKEND_STORE_URI, `backend_store_uri` in the server's
  settings file (default ~/.mlflow/server.ini, section [server]), else sqlite:///~/mlflow/mlflow.db;
- the artifacts: `--artifacts-destination`, $MLFLOW_ARTIFACTS_DESTINATION, `artifacts_destination`,
  else ~/mlflow/artifacts;
- the users' database: `--auth-database-uri`, $MLFLOW_AUTH_DATABASE_URI, `auth_database_uri`, else
  sqlite beside a sqlite store (a PostgreSQL store needs one named: a second database on the same
  server);
- the administrator: the credentials every client of the server uses, MLflow's own
  ($MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD, else ~/.mlflow/credentials).

Passwords travel to the server process in its environment and a private (0600) file, never on a
command line, where every user of the machine could read them with `ps`.
"""

from __future__ import annotations

import configparser
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

SETTINGS_FILE = Path("~/.mlflow/server.ini")
CREDENTIALS_FILE = Path("~/.mlflow/credentials")  # MLflow's own client credentials file
SETTINGS = ("backend_store_uri", "artifacts_destination", "auth_database_uri")
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
USER = "sweeps"


class ServerError(Exception):
    """A setting of the tracking server that cannot work; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class ServerSettings:
    backend_store_uri: str
    artifacts_destination: str
    auth_database_uri: str | None  # None: no authentication
    username: str | None = None
    password: str | None = None

    def describe(self) -> str:
        auth = (
            f"basic authentication (administrator {self.username})" if self.auth_database_uri else "no authentication"
        )
        return f"store {hide_password(self.backend_store_uri)}, artifacts {self.artifacts_destination}, {auth}" + (
            f", users in {hide_password(self.auth_database_uri)}" if self.auth_database_uri else ""
        )


def hide_password(uri: str) -> str:
    """`uri` with the password of its user part replaced by ***, for logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def read_settings_file(path: Path) -> dict[str, str]:
    path = path.expanduser()
    if not path.exists():
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error as err:
        raise ServerError(
            str(path), f"is not an INI file ({type(err).__name__}); expected a [server] section"
        ) from None
    if not parser.has_section("server"):
        raise ServerError(str(path), f"has no [server] section (it holds {', '.join(SETTINGS)})")
    found = dict(parser["server"])
    unknown = sorted(set(found) - set(SETTINGS))
    if unknown:
        raise ServerError(f"{path} [server] {unknown[0]}", f"unknown setting; expected one of {', '.join(SETTINGS)}")
    return {k: v.strip() for k, v in found.items() if v.strip()}


def client_credentials() -> tuple[str | None, str | None]:
    """The credentials MLflow's clients send: the environment's, else ~/.mlflow/credentials."""
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    return creds.username, creds.password


def resolve_settings(
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    auth_database_uri: str | None = None,
    settings_file: Path = SETTINGS_FILE,
    auth: bool = True,
    home: Path | None = None,
) -> ServerSettings:
    home = home or Path.home()
    found = read_settings_file(settings_file)

    def pick(name: str, given: str | None) -> str | None:
        return given or os.environ.get(f"MLFLOW_{name.upper()}") or found.get(name)

    store = pick("backend_store_uri", backend_store_uri) or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    scheme = urlsplit(store).scheme.split("+")[0]
    if scheme not in DATABASES:
        raise ServerError(
            "backend_store_uri",
            f"{hide_password(store)} is not a database; expected postgresql://USER:PASSWORD@HOST:5432/DB "
            "(a shared server, e.g. Amazon RDS) or sqlite:///PATH (one machine)",
        )
    artifacts = pick("artifacts_destination", artifacts_destination) or str(home / "mlflow" / "artifacts")
    settings = ServerSettings(store, artifacts, None)
    if not auth:
        return settings
    users = pick("auth_database_uri", auth_database_uri)
    if users is None:
        if scheme != "sqlite":
            raise ServerError(
                "auth_database_uri",
                "a database for the server's users is needed beside a shared store: a second database on "
                "the same server (e.g. postgresql://USER:PASSWORD@HOST:5432/mlflow_auth)",
            )
        users = f"sqlite:///{Path(store[len('sqlite:///') :]).parent / 'auth.db'}"
    if users == store:
        raise ServerError(
            "auth_database_uri", "must be another database than backend_store_uri (both hold a `users` table's kin)"
        )
    settings.auth_database_uri = users
    settings.username, settings.password = client_credentials()
    if not settings.username or not settings.password:
        raise ServerError(
            "credentials",
            f"the server's administrator is the user its clients log in as: set MLFLOW_TRACKING_USERNAME and "
            f"MLFLOW_TRACKING_PASSWORD, or write them to {CREDENTIALS_FILE} (python sweeps/server.py init)",
        )
    return settings


def _make_local_dirs(settings: ServerSettings) -> None:
    for uri in (settings.backend_store_uri, settings.auth_database_uri or ""):
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    if "://" not in settings.artifacts_destination:
        Path(settings.artifacts_destination).mkdir(parents=True, exist_ok=True)


def server_command(host: str, port: int, workers: int, auth: bool) -> list[str]:
    command = [sys.executable, "-m", "mlflow", "server", "--serve-artifacts", "--host", host, "--port", str(port),
               "--workers", str(workers)]  # fmt: skip
    return [*command, "--app-name", "basic-auth"] if auth else command


def server_environment(settings: ServerSettings, private_dir: Path) -> dict[str, str]:
    """The server's environment: its store, artifacts and (with authentication) a 0600 INI file for
    the users' database and the administrator's password."""
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": settings.backend_store_uri,
        "MLFLOW_ARTIFACTS_DESTINATION": settings.artifacts_destination,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # MLflow's GenAI job runner, unused here
    }
    if settings.auth_database_uri is None:
        return env
    config = private_dir / "auth.ini"
    # READ: every user the administrator adds sees every study; only a run's owner (and the
    # administrator) changes or deletes it.
    write_private(
        config,
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {settings.auth_database_uri}\n"
        f"admin_username = {settings.username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        replace=True,
    )
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(config),
        MLFLOW_AUTH_ADMIN_USERNAME=settings.username or "",
        MLFLOW_AUTH_ADMIN_PASSWORD=settings.password or "",
        # CSRF protection of the UI's forms; the same key for every worker of this start
        MLFLOW_FLASK_SERVER_SECRET_KEY=os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32),
    )
    return env


def _request(url: str, username: str | None = None, password: str | None = None) -> int:
    """The HTTP status of a GET of `url` (with basic credentials when given); 0 if nothing answers."""
    request = urllib.request.Request(url)
    if username is not None:
        request.add_header("Authorization", "Basic " + b64encode(f"{username}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 120) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            return False
        if _request(f"{url}/health") == 200:
            return True
        time.sleep(0.5)
    return False


def credentials_status(url: str, username: str | None, password: str | None) -> int:
    """What the server answers these credentials on a read of its experiments (200, 401, 403...)."""
    return _request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", username, password)


def start(
    settings: ServerSettings, host: str, port: int, workers: int, log: Path, private_dir: Path
) -> subprocess.Popen:
    """The server, started in its own session (it outlives this process), logging to `log`; returned
    once it answers, and, with authentication, once it takes the administrator's credentials."""
    _make_local_dirs(settings)
    log.parent.mkdir(parents=True, exist_ok=True)
    auth = settings.auth_database_uri is not None
    with open(log, "ab") as out:
        process = subprocess.Popen(
            server_command(host, port, workers, auth), env=server_environment(settings, private_dir),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    if not wait_until_up(url, process):
        stop(process)
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise ServerError("server", f"did not start; the end of {log}:\n  " + "\n  ".join(tail))
    if auth:
        status = credentials_status(url, settings.username, settings.password)
        if status != 200:
            stop(process)
            raise ServerError(
                "credentials",
                f"the server answers {status} to its administrator {settings.username!r}: the users' database "
                f"{hide_password(settings.auth_database_uri or '')} holds that user with another password (it "
                "keeps the first one; change it there, or give the credentials it has)",
            )
    return process


def stop(process: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def write_private(path: Path, text: str, replace: bool = False) -> bool:
    """`text` in a file only its owner reads (0600, in a 0700 folder if it makes one); an existing
    file is kept (False) unless `replace`."""
    path = path.expanduser()
    if path.exists() and not replace:
        return False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    with os.fdopen(os.open(path, flags, 0o600), "w") as out:
        out.write(text)
    return True


def write_credentials(path: Path, username: str = USER) -> bool:
    """A credentials file with a new random password, unless one is there (False then)."""
    password = secrets.token_urlsafe(24)
    return write_private(
        path, f"[mlflow]\nmlflow_tracking_username = {username}\nmlflow_tracking_password = {password}\n"
    )


SETTINGS_TEMPLATE = """\
# The cluster's MLflow server (python sweeps/server.py start). Without settings here it keeps its
# runs in sqlite on the head's disk, which a lost head takes with it. For a record that outlives
# the head, name a PostgreSQL database (e.g. Amazon RDS), a second one for the server's users, and
# a bucket prefix for the artifacts:
[server]
# backend_store_uri = postgresql://mlflow:PASSWORD@HOST:5432/mlflow
# auth_database_uri = postgresql://mlflow:PASSWORD@HOST:5432/mlflow_auth
# artifacts_destination = s3://YOUR-BUCKET/da2s-nas/mlflow
"""


def write_settings_template(path: Path) -> bool:
    return write_private(path, SETTINGS_TEMPLATE)
