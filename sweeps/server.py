"""The tracking server of a cluster (or of a shared machine): MLflow with basic authentication.

    python sweeps/server.py init                  # once, on your machine: ~/.mlflow/credentials
                                                  # (a new password) and ~/.mlflow/server.ini
    python sweeps/server.py start --host IP [--port 5000] [--foreground]
    python sweeps/server.py start --host 127.0.0.1 --port 5001 --no-auth --foreground   # the UI

`start` returns once the server answers and takes the administrator's credentials, and leaves it
running (its log: ~/mlflow/server.log); with --foreground it stays until Ctrl-C. Its store, its
artifacts and its users' database come from ~/.mlflow/server.ini (or the flags, or
$MLFLOW_BACKEND_STORE_URI / $MLFLOW_ARTIFACTS_DESTINATION / $MLFLOW_AUTH_DATABASE_URI); its
administrator is the user of ~/.mlflow/credentials (or $MLFLOW_TRACKING_USERNAME /
$MLFLOW_TRACKING_PASSWORD), the credentials the sweep's driver and trials log with. A new head
started on the same database and artifact store shows every run of the old one. See
docs/cluster.md, "The tracking server".

Exit codes: 0 running (or stopped by Ctrl-C with --foreground), 2 a setting that cannot work
(named), 1 the server did not start (the end of its log is printed).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tuning.tracking_server import (
    CREDENTIALS_FILE,
    SETTINGS_FILE,
    ServerError,
    resolve_settings,
    start,
    stop,
    write_credentials,
    write_settings_template,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="write ~/.mlflow/credentials and ~/.mlflow/server.ini if missing")
    init.add_argument("--credentials", type=Path, default=CREDENTIALS_FILE)
    init.add_argument("--settings", type=Path, default=SETTINGS_FILE)
    run = commands.add_parser("start", help="start the server")
    run.add_argument("--host", required=True, help="the address to listen on (the head's internal address)")
    run.add_argument("--port", type=int, default=5000)
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--settings", type=Path, default=SETTINGS_FILE)
    run.add_argument("--backend-store-uri")
    run.add_argument("--artifacts-destination")
    run.add_argument("--auth-database-uri")
    run.add_argument("--no-auth", action="store_true", help="no authentication (only on a loopback address)")
    run.add_argument("--log", type=Path, default=Path("~/mlflow/server.log"))
    run.add_argument("--foreground", action="store_true", help="stay until Ctrl-C, then stop the server")
    args = parser.parse_args(argv)

    if args.command == "init":
        for path, wrote in ((args.credentials, write_credentials(args.credentials)),
                            (args.settings, write_settings_template(args.settings))):  # fmt: skip
            print(f"{'wrote' if wrote else 'kept the existing'} {path}")
        print(f"Fill in {args.settings} for a record that outlives the head (docs/cluster.md).")
        return 0

    if args.no_auth and not args.host.startswith("127."):
        print(f"error: --no-auth: only on a loopback address (127.x), not {args.host}", file=sys.stderr)
        return 2
    try:
        settings = resolve_settings(
            args.backend_store_uri, args.artifacts_destination, args.auth_database_uri, args.settings,
            auth=not args.no_auth,
        )  # fmt: skip
        log = args.log.expanduser()
        process = start(settings, args.host, args.port, args.workers, log, log.parent / ".server")
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if err.field == "server" else 2
    print(f"MLflow server on http://{args.host}:{args.port} (pid {process.pid}): {settings.describe()}")
    if not args.foreground:
        return 0
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        process.wait()
    except KeyboardInterrupt:
        stop(process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
