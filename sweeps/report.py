"""The tables and figures of a finished sweep, read back from MLflow or from a committed export.

    python sweeps/report.py EXPERIMENT [--csv] [--layout table4|rows] [--out DIR] [--tracking-uri URI]
    python sweeps/report.py EXPERIMENT --export docs/results/data/EXPERIMENT.json [--alpha-plots TARGET]
    python sweeps/report.py --from docs/results/data/EXPERIMENT.json [--out DIR]
    python sweeps/report.py --regenerate [--check]        # every page of docs/results from its exports

Prints Markdown (or CSV): per method and target, supernet accuracy, discretized accuracy and drop,
with and without BN recalibration (mean ± std over seeds), and the derived network's parameters;
with --layout table4 (the default for two or three methods under several targets), targets in rows
and methods side by side as in the DA²S paper's Table 4. Also writes OUT/drops.png and OUT/report.md,
and prints the links that open the sweep in the MLflow UI (see sweeps/ui.py). With retrained
architectures (an evaluation stage), their test accuracies beside the search metrics and the rank
correlations with permutation p-values.

--export writes the study's runs (settings, final metrics, per-epoch curves of the headline metrics,
genotypes; with --alpha-plots, the plotted searches' softmax(alpha) and edge weights per epoch) to
one JSON file to commit; --from reads such a file instead of MLflow. --regenerate rewrites the
generated blocks of docs/results/*.md (tuning/pages.py) from docs/results/data/; with --check it
writes nothing and exits 1 where a page differs from its data.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from tuning.export import add_details, add_histories, export_study, fetch_study, load_study  # noqa: E402
from tuning.pages import figure, regenerate, retrained_text, skip_histories  # noqa: E402
from tuning.report import (  # noqa: E402
    csv_table,
    final_skip_table,
    plot_drop_vs_error,
    plot_drops,
    plot_skip_counts,
    report_text,
    summarise,
    trial_records,
)
from tuning.tracking import client_for, relocate_artifacts, report_relocations, resolve_tracking_uri  # noqa: E402
from tuning.ui import instructions  # noqa: E402

RESULTS = ROOT / "docs" / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", help="MLflow experiment (the sweep's name)")
    parser.add_argument(
        "--tracking-uri", default="auto", help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db here"
    )
    parser.add_argument("--csv", action="store_true", help="print CSV instead of Markdown")
    parser.add_argument("--layout", choices=("auto", "table4", "rows"), default="auto")
    parser.add_argument("--out", help="directory for report.md and drops.png (default: runs/reports/EXPERIMENT)")
    parser.add_argument(
        "--alpha-plots",
        metavar="TARGET",
        help="also plot each method's softmax(alpha) and edge weights over the epochs under TARGET (lowest seed)",
    )
    parser.add_argument(
        "--skips",
        action="store_true",
        help="also plot skip_connect per level over the epochs (skip_connect.png) and tabulate the final counts",
    )
    parser.add_argument("--export", metavar="FILE", help="write the study's runs to FILE (JSON, to commit)")
    parser.add_argument("--from", dest="source", metavar="FILE", help="read an export instead of MLflow")
    parser.add_argument("--regenerate", nargs="?", const=str(RESULTS), metavar="DIR",
                        help="rewrite the generated blocks of DIR/*.md from DIR/data/ (default: docs/results)")  # fmt: skip
    parser.add_argument("--check", action="store_true", help="with --regenerate: write nothing, exit 1 on a difference")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.regenerate:
        return regenerate_pages(Path(args.regenerate), args.check)
    if not args.experiment and not args.source:
        parser.error("name an EXPERIMENT, or --from FILE, or --regenerate")

    uri = None
    try:
        if args.source:
            study = load_study(args.source)
        else:
            uri = resolve_tracking_uri(args.tracking_uri)
            report_relocations(relocate_artifacts(uri))
            study = add_details(uri, fetch_study(uri, args.experiment))
    except (LookupError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    name = study.experiment
    finished, other = trial_records(study)
    if not finished:
        print(f"error: experiment {name!r} has no finished trials yet ({len(other)} others)", file=sys.stderr)
        return 1
    if args.alpha_plots and uri is not None:
        chosen = {
            min(
                (t for t in finished if t.method == m and t.target == args.alpha_plots), key=lambda t: int(t.seed)
            ).run_id
            for m in {t.method for t in finished if t.target == args.alpha_plots}
        }
        add_histories(uri, study, chosen)
    rows = summarise(finished)
    if args.csv:
        print(csv_table(rows), end="")
        return 0
    text = report_text(name, finished, other, args.layout)
    out = Path(args.out or Path("runs") / "reports" / name)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.md", plot_drops(rows, out / "drops.png", name)]
    if args.skips:
        histories = skip_histories(study, finished)
        written.append(plot_skip_counts(histories, out / "skip_connect.png", f"{name}: skip_connect per level"))
        text += (
            "\n## skip_connect ops per level at the last epoch (mean over seeds)\n\n"
            + final_skip_table(histories)
            + "\n"
        )
    if comparison := retrained_text(finished):
        text += "\n## Search vs. retrained accuracy (cifar10)\n\n" + comparison + "\n"
        written.append(plot_drop_vs_error(finished, out / "drop_vs_accuracy.png", name))
    if args.alpha_plots:
        figure(study, finished, rows, {"what": "alpha", "target": args.alpha_plots}, out, name)
        written += sorted(out.glob("alpha_*.png")) + sorted(out.glob("edge_weights_*.png"))
    print(text)
    (out / "report.md").write_text(text)
    if args.export:
        written.append(export_study(uri, name, args.export, study) if uri else Path(args.export))
    print("written: " + ", ".join(str(p) for p in written), file=sys.stderr)
    if uri is not None:
        experiment_id = client_for(uri).get_experiment_by_name(name).experiment_id
        print(instructions(uri, name, experiment_id), file=sys.stderr)
    return 0


def regenerate_pages(directory: Path, check: bool) -> int:
    from tuning.pages import Pages

    pages = Pages(directory / "data")
    differing = []
    for page in sorted(directory.glob("*.md")):
        try:
            changed = regenerate(page, directory / "data", check, pages)
        except LookupError as err:
            print(f"error: {page.name}: {err}", file=sys.stderr)
            return 1
        differing += [f"{page.name}: {spec}" for spec in changed]
    verb = "differ from their data" if check else "rewritten"
    for line in differing:
        print(f"{line} ({verb.split()[0]})", file=sys.stderr)
    print(f"{len(differing)} generated blocks {verb}", file=sys.stderr)
    return 1 if check and differing else 0


if __name__ == "__main__":
    sys.exit(main())
