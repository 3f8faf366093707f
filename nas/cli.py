"""`python -m nas search|derive|info|evaluate ...`: one search, one re-derivation, the size of a
genotype's network, or its training from scratch, without Ray or MLflow."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .config import ConfigError
from .data import DataNotFoundError
from .distributed import join_launcher_group
from .evaluate import MOBILE_MACS, EvalConfig, run_evaluation
from .genotype import PUBLISHED, resolve_genotype
from .metrics import (
    DISCRETIZED_ACC,
    DISCRETIZED_BN_RECAL_ACC,
    DISCRETIZED_UNIT_EDGES_ACC,
    DISCRETIZED_UNIT_EDGES_BN_RECAL_ACC,
    DROP,
    DROP_BN_RECAL,
    DROP_UNIT_EDGES,
    DROP_UNIT_EDGES_BN_RECAL,
    SUPERNET_ACC,
    TEST_TOP1_ERROR,
    TEST_TOP5_ERROR,
)
from .network import network_info
from .runtime import Diverged
from .search import rederive, run_search
from .settings import SearchConfig

EXIT_STATUS = """exit status:
  0    done
  1    the run diverged (a NaN; the message names the epoch), or failed (a traceback says where)
  2    refused before training: a bad setting, a missing or broken data file, a checkpoint that
       cannot be read; the message names the field or the file
  130  interrupted (Ctrl-C): the same command resumes from the last epoch"""

METRIC_ROWS = (
    ("supernet (mixed ops)", SUPERNET_ACC, None),
    ("discretized, trained edge weights", DISCRETIZED_ACC, DROP),
    ("  after BN recalibration", DISCRETIZED_BN_RECAL_ACC, DROP_BN_RECAL),
    ("discretized, kept edges at weight 1", DISCRETIZED_UNIT_EDGES_ACC, DROP_UNIT_EDGES),
    ("  after BN recalibration", DISCRETIZED_UNIT_EDGES_BN_RECAL_ACC, DROP_UNIT_EDGES_BN_RECAL),
)


def metrics_table(metrics: dict[str, float]) -> str:
    lines = [f"{'accuracy on the evaluation set':38s} {'acc %':>7s} {'drop':>7s}"]
    for label, acc, drop in METRIC_ROWS:
        drop_text = f"{metrics[drop]:7.2f}" if drop else ""
        lines.append(f"{label:38s} {metrics[acc]:7.2f} {drop_text}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nas",
        description=__doc__,
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    search.add_argument(
        "--derive",
        dest="derive_targets",
        action="append",
        default=[],
        metavar="TARGET",
        help="also derive and measure the finished search under TARGET, e.g. '3 of 14' (repeatable; only for "
        "searches without edge parameters, whose training the target does not change: docs/science.md D14)",
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

    info = sub.add_parser("info", help="parameters and multiply-adds of a genotype's evaluation network")
    info.add_argument(
        "genotype", help=f"a genotype JSON file, a search's output directory, or one of: {', '.join(PUBLISHED)}"
    )
    info.add_argument("--dataset", choices=("cifar10", "imagenet"), default="cifar10")
    info.add_argument("--layers", type=int, help="cells (default: 20 on CIFAR-10, 14 on ImageNet)")
    info.add_argument("--channels", type=int, help="initial channels (default: 36 on CIFAR-10, 48 on ImageNet)")
    info.add_argument("--json", action="store_true", help="print a JSON object")

    evaluate = sub.add_parser(
        "evaluate", help="train a genotype's network from scratch (the paper's protocol by default)"
    )
    evaluate.add_argument(
        "genotype", help=f"a genotype JSON file, a search's output directory, or one of: {', '.join(PUBLISHED)}"
    )
    evaluate.add_argument("--dataset", choices=("cifar10", "imagenet"))
    evaluate.add_argument("--out", required=True, help="output directory: checkpoint every epoch, result.json")
    evaluate.add_argument("--config", help="YAML file of evaluation settings (optional)")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a field, e.g. epochs=20 or layers=8")  # fmt: skip
    evaluate.add_argument("--data-root", help="CIFAR-10 or ImageNet directory")
    evaluate.add_argument("--no-resume", action="store_true")
    evaluate.add_argument("-q", "--quiet", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        if args.command == "search":
            overrides = list(args.overrides)
            if args.derive_targets:
                overrides.append(f"derive_targets={json.dumps(args.derive_targets)}")
            config = SearchConfig.resolve(args.preset, args.config, overrides, args.data_root)
            result = run_search(config, args.out, progress=not quiet, resume=not args.no_resume)
            print(f"\ngenotype ({result.info['target']}):\n{result.genotype.describe()}\n")
            print(metrics_table(result.metrics))
            for derivation in result.derivations:
                print(f"\nderived under {derivation.target} (derive/{derivation.slug}/):")
                print(f"{derivation.genotype.describe()}\n")
                print(metrics_table(derivation.metrics))
            print(f"\nresults in {args.out}/ (result.json, genotype.json, cells/, plots/)")
        elif args.command == "derive":
            genotype, metrics = rederive(args.dir, args.target, data_root=args.data_root, device=args.device)
            if args.json:
                print(json.dumps({"genotype": genotype.to_dict(), "metrics": metrics}, indent=2))
            else:
                print(f"genotype ({genotype.meta['target']}):\n{genotype.describe()}\n")
                print(metrics_table(metrics))
        elif args.command == "info":
            details = network_info(resolve_genotype(args.genotype), args.dataset, args.layers, args.channels)
            details["mobile_setting_ok"] = args.dataset != "imagenet" or details["macs"] <= MOBILE_MACS
            if args.json:
                print(json.dumps(details))
            else:
                flag = "" if details["mobile_setting_ok"] else "  (above the 600M mobile setting)"
                print(
                    f"{args.genotype} on {args.dataset}: {details['layers']} cells, C={details['channels']}: "
                    f"{details['params'] / 1e6:.2f}M parameters (auxiliary head excluded), "
                    f"{details['macs'] / 1e6:.0f}M multiply-adds{flag}"
                )
        elif args.command == "evaluate":
            genotype = resolve_genotype(args.genotype)
            config = EvalConfig.resolve(args.dataset, args.config, args.overrides, args.data_root)
            group = join_launcher_group(config.device)  # data-parallel under torchrun (docs/science.md §4.3)
            result = run_evaluation(genotype, config, args.out, progress=not quiet, resume=not args.no_resume)
            m = result.metrics
            if group.leader:
                print(
                    f"test error {m[TEST_TOP1_ERROR]:.2f}% (top-5 {m[TEST_TOP5_ERROR]:.2f}%), "
                    f"{m['params'] / 1e6:.2f}M parameters, {m['macs'] / 1e6:.0f}M multiply-adds; results in {args.out}/result.json"
                )
    except (ConfigError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Diverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last epoch", file=sys.stderr)
        return 130
    return 0
