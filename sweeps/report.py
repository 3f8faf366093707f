"""The table of a finished sweep, read back from MLflow.

    python sweeps/report.py EXPERIMENT [--csv] [--layout table4|rows] [--out DIR] [--tracking-uri URI]

Prints Markdown (or CSV): per method and target, supernet accuracy, discretized accuracy and drop,
with and without BN recalibration (mean ± std over seeds), and the derived network's parameters;
with --layout table4 (the default when a sweep has several methods), targets in rows and methods
side by side as in the DA²S paper's Table 4. Also writes OUT/drops.png and OUT/report.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tuning.report import csv_table, load_trials, markdown_table, plot_drops, summarise, table4
from tuning.tracking import resolve_tracking_uri


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="MLflow experiment (the sweep's name)")
    parser.add_argument(
        "--tracking-uri", default="auto", help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db here"
    )
    parser.add_argument("--csv", action="store_true", help="print CSV instead of Markdown")
    parser.add_argument("--layout", choices=("auto", "table4", "rows"), default="auto")
    parser.add_argument("--out", help="directory for report.md and drops.png (default: runs/reports/EXPERIMENT)")
    args = parser.parse_args(argv)

    uri = resolve_tracking_uri(args.tracking_uri)
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
    several_methods = len({r.method for r in rows}) > 1
    layout = args.layout if args.layout != "auto" else ("table4" if several_methods else "rows")
    text = f"# {args.experiment}\n\n{len(finished)} finished trials"
    if other:
        states = ", ".join(sorted({t.status + (" early-stopped" if "early_stopped" in t.tags else "") for t in other}))
        text += f"; {len(other)} not counted ({states})"
    text += "\n\n"
    if layout == "table4":
        text += table4(rows) + "\n\nAll columns:\n\n"
    text += markdown_table(rows) + "\n"
    print(text)
    out = Path(args.out or Path("runs") / "reports" / args.experiment)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    plot = plot_drops(rows, out / "drops.png", args.experiment)
    print(f"written: {out / 'report.md'}, {plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
