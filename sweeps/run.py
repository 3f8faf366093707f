"""Run a sweep of supernet searches: Optuna proposes, Ray Tune runs, MLflow tracks.

python sweeps/run.py                          # sweeps/quick.yaml: a few minutes on a laptop
python sweeps/run.py sweeps/table4.yaml       # the DA2S Table 4 study
python sweeps/run.py SWEEP.yaml --resume      # finish an interrupted sweep
python sweeps/run.py SWEEP.yaml --address auto   # on a Ray cluster's head (ray up cluster.yaml)

exit status:
  0    every trial (and evaluation) finished; a trial or evaluation that diverged finished with
       that result
  2    refused before any trial started: a bad sweep setting, a missing or broken data or sweep
       file, storage that cannot be written, resources that no node of the cluster (present, or
       addable by its autoscaler) offers, an --address where no Ray cluster answers, a driver
       already running this sweep, or a damaged study journal on --resume; the message names the
       field or the file
  3    finished, but MLflow did not take some logging calls (unreachable); they are kept, and
       `--resume` sends them
  4    finished, but trials or evaluations errored; the summary lists each with its reason
       (`--resume` runs the errored trials again)
  5    stopped: its storage cannot take another checkpoint (a full disk); nothing written is lost,
       and `--resume` finishes the sweep once there is room
  130  interrupted (Ctrl-C or SIGTERM): the state is saved; `--resume` finishes the sweep
  1    the driver itself failed (a traceback says where)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

# MLflow's per-download progress bars (the sweep's summary reads artifacts back) are noise here.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
HERE = Path(__file__).resolve().parent
EXIT_OK, EXIT_REFUSED, EXIT_PENDING, EXIT_ERRORED, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 2, 3, 4, 5, 130
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from nas import metrics as m  # noqa: E402
from nas.config import ConfigError  # noqa: E402
from nas.data import DataNotFoundError  # noqa: E402
from tuning.config import SweepConfig  # noqa: E402
from tuning.tracking import redact  # noqa: E402
from tuning.ui import instructions  # noqa: E402


def _fmt(value, digits=2) -> str:
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return f"{value:.{digits}f}"
    return "-"


def print_summary(outcome, sweep: SweepConfig) -> None:
    objective = sweep.objectives()[0]
    rows = sorted(
        outcome.trials,
        key=lambda t: (
            t.metrics.get(objective.metric) is None,
            -(t.metrics.get(objective.metric) or 0)
            if objective.mode == "max"
            else (t.metrics.get(objective.metric) or 0),
        ),
    )
    print(f"\n{'trial':28s} {'status':10s} {'supernet':>8s} {'discr.':>8s} {'drop':>7s} {'params M':>8s}  settings")
    for t in rows:
        values = t.metrics
        params = values.get(m.PARAMS)
        settings = ", ".join(f"{k}={v}" for k, v in t.params.items())
        print(
            f"{t.trial_id:28s} {t.status:10s} {_fmt(values.get(m.SUPERNET_ACC)):>8s} "
            f"{_fmt(values.get(m.DISCRETIZED_ACC)):>8s} {_fmt(values.get(m.DROP)):>7s} "
            f"{_fmt(params / 1e6 if params else None):>8s}  {settings}"
        )
        if t.error:
            print(f"{'':28s} {t.error}")


def errored(outcome) -> list[tuple[str, str]]:
    """(id, reason) of every trial and evaluation that errored (not: diverged, which is a result)."""
    found = [(t.trial_id, t.error or "no reason recorded") for t in outcome.trials if t.status == "ERROR"]
    found += [(e.eval_id, e.error or "no reason recorded") for e in outcome.evaluations
              if e.status not in ("FINISHED", "DIVERGED")]  # fmt: skip
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "sweep", nargs="?", default=str(HERE / "quick.yaml"), help="sweep YAML (default: sweeps/quick.yaml)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="finish an interrupted sweep without repeating finished trials"
    )
    parser.add_argument(
        "--address",
        help="Ray cluster address (`auto` on a cluster node); default: a new local Ray instance. An address "
        "where no cluster answers stops the sweep within about a minute",
    )
    parser.add_argument(
        "--cluster-config", metavar="YAML",
        help="the autoscaler's cluster config, for the resource check (default with --address: "
        "~/ray_bootstrap_config.yaml, which `ray up` puts on the head)",
    )  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep field, e.g. num_samples=8 or search.epochs=2")  # fmt: skip
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the summary")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tuning").setLevel(logging.WARNING if args.quiet else logging.INFO)

    try:
        sweep = SweepConfig.load(args.sweep, args.overrides)
        from tuning.sweep import install_sigterm_as_interrupt, run_sweep

        install_sigterm_as_interrupt()
        outcome = run_sweep(sweep, resume=args.resume, address=args.address, cluster_config=args.cluster_config)
    except (ConfigError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("\nInterrupted before the sweep's trials started.", file=sys.stderr)
        return EXIT_INTERRUPTED

    if outcome.finished_already:
        name = sweep.mlflow.experiment or sweep.name
        print(f"Nothing to resume: the sweep has finished ({outcome.finished_already}).")
        print(f"MLflow:       {redact(outcome.tracking_uri)}  (experiment '{name}')")
        print(f"Report:       python sweeps/report.py {name}")
        return EXIT_OK
    print_summary(outcome, sweep)
    if outcome.evaluations:
        print(f"\n{'evaluation':28s} {'status':10s} {'top-1 err':>9s} {'top-5 err':>9s} {'params M':>8s}")
        for e in outcome.evaluations:
            values = e.metrics
            params = values.get(m.PARAMS)
            print(
                f"{e.eval_id:28s} {e.status:10s} {_fmt(values.get(m.TEST_TOP1_ERROR)):>9s} "
                f"{_fmt(values.get(m.TEST_TOP5_ERROR)):>9s} {_fmt(params / 1e6 if params else None):>8s}  {e.error or ''}"
            )
    print(f"\nRay results:  {outcome.experiment_dir}")
    print(f"MLflow:       {redact(outcome.tracking_uri)}  (experiment '{sweep.mlflow.experiment or sweep.name}')")
    print(instructions(outcome.tracking_uri, sweep.mlflow.experiment or sweep.name, outcome.experiment_id))
    print(f"Report:       python sweeps/report.py {sweep.mlflow.experiment or sweep.name}")
    if outcome.pending:
        total = sum(count for _, count in outcome.pending)
        print(f"\nMLflow did not take {total} logging calls (it was unreachable); they are kept in:", file=sys.stderr)
        for path, count in outcome.pending:
            print(f"  {path} ({count} calls)", file=sys.stderr)
        print(
            f"They are sent when MLflow is back and you run:  python sweeps/run.py {args.sweep} --resume",
            file=sys.stderr,
        )
    failures = errored(outcome)
    if failures:
        print(f"\n{len(failures)} errored:", file=sys.stderr)
        for name, reason in failures:
            print(f"  {name}: {reason}", file=sys.stderr)
    if outcome.stopped:
        print(
            f"\nThe sweep stopped: {outcome.stopped}. Nothing written is lost; make room there, then finish it "
            f"with:  python sweeps/run.py {args.sweep} --resume",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    if outcome.interrupted:
        print(
            f"\nThe sweep was interrupted. Finish it with:  python sweeps/run.py {args.sweep} --resume", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    if outcome.pending:
        return EXIT_PENDING
    return EXIT_ERRORED if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
