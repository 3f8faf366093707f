"""`python -m nas search|derive ...`: one search, or one re-derivation, without Ray or MLflow."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .config import ConfigError
from .data import DataNotFoundError
from .search import SearchConfig, SearchDiverged, rederive, run_search

METRIC_ROWS = (
    ("supernet (mixed ops)", "supernet_acc", None),
    ("discretized, trained edge weights", "discretized_acc", "drop"),
    ("  after BN recalibration", "discretized_bn_recal_acc", "drop_bn_recal"),
    ("discretized, kept edges at weight 1", "discretized_unit_edges_acc", "drop_unit_edges"),
    ("  after BN recalibration", "discretized_unit_edges_bn_recal_acc", "drop_unit_edges_bn_recal"),
)


def metrics_table(metrics: dict[str, float]) -> str:
    lines = [f"{'accuracy on the evaluation set':38s} {'acc %':>7s} {'drop':>7s}"]
    for label, acc, drop in METRIC_ROWS:
        drop_text = f"{metrics[drop]:7.2f}" if drop else ""
        lines.append(f"{label:38s} {metrics[acc]:7.2f} {drop_text}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    search = sub.add_parser("search", help="run one supernet search (resumes if OUT holds a checkpoint)")
    search.add_argument("--config", help="YAML file of search settings (optional)")
    search.add_argument("--out", required=True, help="output directory: checkpoint, result.json, genotype, plots")
    search.add_argument("--preset", help="darts, da2s or multilevel (else the file's preset:, else darts defaults)")
    search.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field with a dotted key, e.g. model.channels=8 or target='3 of 14'",
    )
    search.add_argument("--data-root", help="CIFAR-10 directory (wins over data.root and $NAS_DATA_ROOT)")
    search.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a checkpoint")
    search.add_argument("-q", "--quiet", action="store_true", help="no progress bar or epoch log")

    derive = sub.add_parser("derive", help="re-derive a finished search's genotype under another target")
    derive.add_argument("dir", help="the search's output directory")
    derive.add_argument("--target", required=True, help="e.g. '[1, 1, 2, 3]' or '3 of 14'")
    derive.add_argument("--data-root", help="CIFAR-10 directory, if not the one the search used")
    derive.add_argument("--device", choices=("auto", "cpu", "cuda"))
    derive.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        if args.command == "search":
            config = SearchConfig.resolve(args.preset, args.config, args.overrides, args.data_root)
            result = run_search(config, args.out, progress=not quiet, resume=not args.no_resume)
            print(f"\ngenotype ({result.info['target']}):\n{result.genotype.describe()}\n")
            print(metrics_table(result.metrics))
            print(f"\nresults in {args.out}/ (result.json, genotype.json, cells/, plots/)")
        elif args.command == "derive":
            genotype, metrics = rederive(args.dir, args.target, data_root=args.data_root, device=args.device)
            if args.json:
                print(json.dumps({"genotype": genotype.to_dict(), "metrics": metrics}, indent=2))
            else:
                print(f"genotype ({genotype.meta['target']}):\n{genotype.describe()}\n")
                print(metrics_table(metrics))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (DataNotFoundError, SearchDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last epoch", file=sys.stderr)
        return 130
    return 0
