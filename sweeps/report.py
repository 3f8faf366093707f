"""The table of a finished sweep, read back from MLflow.

    python sweeps/report.py EXPERIMENT [--csv] [--layout table4|rows] [--out DIR] [--tracking-uri URI]

Prints Markdown (or CSV): per method and target, supernet accuracy, discretized accuracy and drop,
with and without BN recalibration (mean ± std over seeds), and the derived network's parameters;
with --layout table4 (the default for two or three methods under several targets), targets in rows and methods
side by side as in the DA²S paper's Table 4. Also writes OUT/drops.png and OUT/report.md, and prints
the links that open the sweep in the MLflow UI (see sweeps/ui.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tuning.report import (
    csv_table,
    drop_vs_error_text,
    export_alpha_plots,
    final_skip_table,
    load_trials,
    plot_drop_vs_error,
    plot_drops,
    plot_skip_counts,
    report_text,
    skip_count_histories,
    summarise,
)
from tuning.tracking import client_for, resolve_tracking_uri
from tuning.ui import instructions, relocate_artifacts, report_relocations


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="MLflow experiment (the sweep's name)")
    parser.add_argument(
        "--tracking-uri", default="auto", help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db here"
    )
    parser.add_argument("--csv", action="store_true", help="print CSV instead of Markdown")
    parser.add_argument("--layout", choices=("auto", "table4", "rows"), default="auto")
    parser.add_argument("--out", help="directory for report.md and drops.png (default: runs/reports/EXPERIMENT)")
    parser.add_argument(
        "--alpha-plots",
        metavar="TARGET",
        help="also copy each method's softmax(alpha) evolution plots under TARGET (lowest seed)",
    )
    parser.add_argument(
        "--skips",
        action="store_true",
        help="also plot skip_connect per level over the epochs (skip_connect.png) and tabulate the final counts",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    uri = resolve_tracking_uri(args.tracking_uri)
    report_relocations(relocate_artifacts(uri))
    try:
        finished, other = load_trials(uri, args.experiment)
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not finished:
        print(
            f"error: experiment {args.experiment!r} has no finished trials yet ({len(other)} others)", file=sys.stderr
        )
        return 1
    rows = summarise(finished)
    if args.csv:
        print(csv_table(rows), end="")
        return 0
    text = report_text(args.experiment, finished, other, args.layout)
    print(text)
    out = Path(args.out or Path("runs") / "reports" / args.experiment)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    written = [out / "report.md", plot_drops(rows, out / "drops.png", args.experiment)]
    if args.skips:
        histories = skip_count_histories(uri, finished)
        written.append(
            plot_skip_counts(histories, out / "skip_connect.png", f"{args.experiment}: skip_connect per level")
        )
        table = (
            "\n## skip_connect ops per level at the last epoch (mean over seeds)\n\n"
            + final_skip_table(histories)
            + "\n"
        )
        print(table)
        with open(out / "report.md", "a") as handle:
            handle.write(table)
    if comparison := drop_vs_error_text(finished):
        print(comparison)
        with open(out / "report.md", "a") as handle:
            handle.write("\n" + comparison)
        written.append(plot_drop_vs_error(finished, out / "drop_vs_accuracy.png", args.experiment))
    if args.alpha_plots:
        written += export_alpha_plots(uri, finished, args.alpha_plots, out)
    print("written: " + ", ".join(str(p) for p in written), file=sys.stderr)
    experiment_id = client_for(uri).get_experiment_by_name(args.experiment).experiment_id
    print(instructions(uri, args.experiment, experiment_id), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
