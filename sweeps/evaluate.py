"""Train one architecture from scratch on a Ray cluster, data-parallel on several workers, tracked in
MLflow: the evaluation stage of a sweep, for a genotype of your choice.

python sweeps/evaluate.py darts_v2                                   # CIFAR-10, the published protocol
python sweeps/evaluate.py runs/da2s --workers 8 --gpu 1 --cpu 8 --address auto \\
    --storage s3://BUCKET/da2s-nas/ray                                # 8 GPUs of a cluster
python sweeps/evaluate.py pdarts --dataset imagenet --workers 8 --gpu 1 --cpu 12 \\
    --set batch_size=1024 --set lr_scaling=linear --set warmup_epochs=5 --address auto --storage ...

GENOTYPE: a published cell (darts_v1, darts_v2, pdarts, pc_darts_cifar, pc_darts_imagenet), a genotype
JSON file, or a search's output directory. `--set` overrides the protocol (nas/evaluate.py's
EvalConfig: epochs, layers, channels, batch_size (the global batch), lr_scaling, warmup_epochs,
sync_bn, data.root, ...). The checkpoint of every epoch goes to STORAGE/evaluations/NAME; the same
command again continues an unfinished evaluation from its last epoch and returns at once for a
finished one. The MLflow run (experiment `evaluations` unless --experiment) holds the curves, the
final top-1/top-5 errors and the world size and global batch.

exit status: 0 finished (a divergence, NaN losses, is a result and says so); 2 refused before training (a bad setting, missing data, resources or
storage the cluster cannot offer; the message names the option); 3 finished, but MLflow did not take
some logging calls (kept in the storage; the same command sends them); 4 the evaluation failed (the
reason is printed); 130 interrupted (the same command continues it).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from nas import metrics as m  # noqa: E402
from nas.config import ConfigError, apply_overrides, from_dict  # noqa: E402
from nas.data import DataNotFoundError, load_cifar10, resolve_root  # noqa: E402
from nas.evaluate import EvalConfig  # noqa: E402
from nas.genotype import resolve_genotype  # noqa: E402

EXIT_OK, EXIT_REFUSED, EXIT_PENDING, EXIT_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
# Names of the evaluation stage's settings as this command's options, for its error messages.
OPTIONS = {"resources.workers": "--workers", "resources.cpu": "--cpu", "resources.gpu": "--gpu"}


def option_name(field: str) -> str:
    field = field.removeprefix("evaluate.")
    if field in OPTIONS:
        return OPTIONS[field]
    return "--set " + field.removeprefix("settings.") if field.startswith("settings.") else field


def default_name(genotype: str, dataset: str) -> str:
    stem = Path(genotype).name if ("/" in genotype or os.sep in genotype) else genotype
    return re.sub(r"[^0-9A-Za-z._-]+", "-", f"{Path(stem).stem}-{dataset}").strip("-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("genotype", help="published name, genotype JSON, or a search's output directory")
    parser.add_argument("--dataset", choices=("cifar10", "imagenet"), default="cifar10")
    parser.add_argument("--workers", type=int, default=1, help="data-parallel workers (default 1: one process)")
    parser.add_argument("--cpu", type=float, default=1.0, help="CPUs per worker (default 1)")
    parser.add_argument("--gpu", type=float, default=0.0, help="GPUs per worker: 0 or 1 (default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the protocol, e.g. epochs=20 or batch_size=768")  # fmt: skip
    parser.add_argument(
        "--name", help="the evaluation's name: its storage folder and MLflow run (default: GENOTYPE-DATASET)"
    )
    parser.add_argument(
        "--storage", default="runs/ray", help="a path, a shared filesystem, or s3:// / gs:// (default runs/ray)"
    )
    parser.add_argument(
        "--tracking-uri", default="auto", help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db here"
    )
    parser.add_argument("--experiment", default="evaluations", help="MLflow experiment (default: evaluations)")
    parser.add_argument("--address", help="Ray cluster address (`auto` on a cluster node); default: a local Ray")
    parser.add_argument(
        "--cluster-config", metavar="YAML", help="the autoscaler's cluster config, for the resource check"
    )
    parser.add_argument("--max-failures", type=int, default=2, help="restarts after a lost worker or node (default 2)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tuning").setLevel(logging.WARNING if args.quiet else logging.INFO)

    try:
        outcome = evaluate(args)
    except (ConfigError, DataNotFoundError) as err:
        if isinstance(err, ConfigError):
            err = ConfigError(option_name(err.field), err.value, err.allowed)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("\nInterrupted; the last epoch's checkpoint is kept. Continue with the same command.", file=sys.stderr)
        return EXIT_INTERRUPTED
    summary, tracking_uri = outcome
    metrics = summary.metrics
    print(
        f"\n{summary.eval_id}: {summary.status}"
        + (f", test error {metrics[m.TEST_TOP1_ERROR]:.2f}% (top-5 {metrics[m.TEST_TOP5_ERROR]:.2f}%)"
           if m.TEST_TOP1_ERROR in metrics else "")
    )  # fmt: skip
    from tuning.tracking import redact

    print(f"MLflow: {redact(tracking_uri)} (experiment '{args.experiment}')")
    if summary.status == "DIVERGED":  # its result, as a sweep counts it
        print(f"diverged: {summary.error}", file=sys.stderr)
        return EXIT_OK
    if summary.status != "FINISHED":
        print(f"error: {summary.error}", file=sys.stderr)
        return EXIT_FAILED
    if summary.error:  # finished, with MLflow calls left in a pending file
        print(f"warning: {summary.error}; the same command sends them when MLflow is back", file=sys.stderr)
        return EXIT_PENDING
    return EXIT_OK


def evaluate(args):
    """(the evaluation's summary, the tracking URI), once every check has passed and it ran."""
    from tuning import preflight
    from tuning.config import EvaluateConfig
    from tuning.evaluation import EvaluationJob, changed_settings_of, existing_run, run_jobs
    from tuning.job import faults
    from tuning.storage import check_every_node_sees, open_storage
    from tuning.sweep import _init_ray, install_sigterm_as_interrupt
    from tuning.tracking import client_for, ensure_experiment, local_artifact_root, resolve_tracking_uri

    base = Path.cwd()
    genotype = resolve_genotype(args.genotype)
    settings = apply_overrides({}, args.overrides)
    root = (settings.get("data") or {}).get("root")
    if root:  # workers may run in other directories
        settings["data"]["root"] = str((base / Path(root).expanduser()).resolve())
    resources = {"workers": args.workers, "cpu": args.cpu, "gpu": args.gpu}
    stage = from_dict(
        EvaluateConfig, {"datasets": [args.dataset], "resources": resources, "settings": settings}, "evaluate"
    )
    config = EvalConfig.resolve(args.dataset, settings)
    if args.max_failures < 0:
        raise ConfigError("--max-failures", args.max_failures, "a number of restarts, 0 or more")
    name = args.name or default_name(args.genotype, args.dataset)
    if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z._-]*", name):
        raise ConfigError("--name", name, "letters, digits, '.', '_' and '-' (it names a folder and a run)")
    storage = open_storage(args.storage, base)
    storage.check_reachable()
    if storage.local_path is not None:
        preflight.check_writable(storage.local_path, "--storage")
    requests = [("resources", stage.resources)]
    if config.device == "cuda" and args.gpu <= 0:
        raise ConfigError("--set device", "cuda", "needs --gpu 1 (with --gpu 0 the workers see no GPU), or use auto")
    if args.address is None:
        preflight.check_gpus_here(requests)
        if config.dataset == "cifar10" and not config.data.synthetic:
            load_cifar10(resolve_root(config.data.root), config.data.download)
    tracking_uri = resolve_tracking_uri(args.tracking_uri, base)
    client = client_for(tracking_uri)
    experiment_id = ensure_experiment(client, args.experiment, local_artifact_root(tracking_uri))
    job = EvaluationJob(
        eval_id=name, trial_id=name, trial_run_id=None, dataset=args.dataset, genotype=genotype.to_dict(),
        settings=settings, store=storage / "evaluations" / name, tracking_uri=tracking_uri,
        experiment_id=experiment_id, sweep=args.experiment, resources=stage.resources, faults=faults(),
    )  # fmt: skip
    earlier = existing_run(job)
    if earlier is not None and (changed := changed_settings_of(job, earlier)):
        raise ConfigError(
            "--name",
            name,
            f"already names an evaluation with other settings ({', '.join(changed[:3])}: "
            f"{earlier.data.params.get(changed[0])!r} there); choose another --name, or its settings to continue it",
        )
    if earlier is not None and earlier.info.status == "FINISHED":
        return run_jobs([job], args.max_failures)[0], tracking_uri  # its result, without starting Ray

    install_sigterm_as_interrupt()
    _init_ray(args.address)
    for line in preflight.check_cluster_resources(requests, args.cluster_config, local=args.address is None):
        logging.getLogger("tuning").info("%s", line)
    check_every_node_sees(storage)
    (summary,) = run_jobs([job], args.max_failures)
    return summary, tracking_uri


if __name__ == "__main__":
    sys.exit(main())
