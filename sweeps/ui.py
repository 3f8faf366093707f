"""The MLflow UI on a sweep's store, opened on the comparison of its trials.

    python sweeps/ui.py [EXPERIMENT] [--tracking-uri URI] [--port 5000]

Starts an MLflow server on 127.0.0.1 over the store (default: $MLFLOW_TRACKING_URI, else
runs/mlflow.db here) and prints, per experiment, the link that opens its runs table on the trials
(method, target, accuracies, drop; runs coloured by method) and the link to the compare view.
A store that was moved or copied keeps its artifacts: their records are pointed at the
`mlartifacts/` folder beside it first. Ctrl-C stops the server. With an http(s) tracking URI (a
running server), only the links are printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tuning.tracking import client_for, relocate_artifacts, report_relocations, resolve_tracking_uri, sqlite_file
from tuning.ui import DEFAULT_PORT, base_url, instructions, start_server, stop_server, wait_for_server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", help="the sweep's experiment (default: every experiment)")
    parser.add_argument(
        "--tracking-uri", default="auto", help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db here"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--screenshots", metavar="DIR", help="save what the links open (headless Chromium) to DIR and stop"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    uri = resolve_tracking_uri(args.tracking_uri)
    db = sqlite_file(uri)
    if db is not None and not db.exists():
        print(f"error: --tracking-uri: no MLflow store at {db}; run a sweep first or name the store", file=sys.stderr)
        return 1
    report_relocations(relocate_artifacts(uri))
    client = client_for(uri)
    if args.experiment:
        found = client.get_experiment_by_name(args.experiment)
        if found is None:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            print(f"error: experiment: no {args.experiment!r} at {uri}; experiments there: {names}", file=sys.stderr)
            return 1
        experiments = [found]
    else:
        experiments = [e for e in client.search_experiments() if e.name != "Default"]

    server = None
    if db is not None:
        server = start_server(uri, args.port)
        try:
            wait_for_server(f"http://127.0.0.1:{args.port}", server)
        except (RuntimeError, TimeoutError) as err:
            stop_server(server)
            print(f"error: --port {args.port}: {err} (is the port taken?)", file=sys.stderr)
            return 1
    for experiment in experiments:
        print(f"\n{experiment.name}")
        text = instructions(uri, experiment.name, experiment.experiment_id, args.port)
        print("\n".join(line for line in text.splitlines() if not line.startswith("Open the UI")), flush=True)
    if args.screenshots:
        from tuning.ui import screenshots

        experiment = experiments[0]
        names = [r.info.run_name for r in client.search_runs([experiment.experiment_id], "tags.kind = 'trial'")]
        try:
            written = screenshots(base_url(uri, port=args.port), experiment.experiment_id, names, args.screenshots)
        finally:
            if server is not None:
                stop_server(server)
        print("written: " + ", ".join(str(p) for p in written))
        return 0
    if server is None:
        return 0
    print("\nThe MLflow UI is running; Ctrl-C stops it.", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
