"""What the sweep machinery costs, and how many searches an hour a machine runs.

    python bench/sweep_overhead.py [--trials 4] [--concurrency 1 2] [--epochs 3] [--json]
    python bench/sweep_overhead.py --gpu-fractions 1 0.5 0.25      # on a GPU machine: 1, 2, 4 trials per GPU

Runs real sweeps (local Ray, Optuna, a sqlite MLflow store in a scratch directory) of the quick
sweep's searches (16x16 CIFAR-10 subset, C=8, 5 cells) and prints, for every trial, its wall time
as Ray measured it, the time its search took, and the share of the difference (starting the trial,
MLflow logging, Ray reports and checkpoint copies) in the trial's wall time; and the searches per
hour of the whole sweep. On the CPU it runs one sweep per `--concurrency` value (default: 1 and 2
trials at once), each trial reserving its share of the machine's cores (`--cpus-per-trial`, default
cores / concurrency) and computing on that many threads (tuning/threads.py), and ends with a table
of searches per hour against concurrency. Data: $NAS_DATA_ROOT if set, generated images otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuning.config import SweepConfig
from tuning.threads import trial_threads, usable_cpus


def sweep_for(args, workdir: Path, name: str, cpu: float, gpu: float, concurrency: int) -> SweepConfig:
    data = {"subset": 2048, "eval_split": "holdout", "eval_subset": 1000, "resolution": 16}
    if not os.environ.get("NAS_DATA_ROOT"):
        data["dataset"] = "synthetic"
    return SweepConfig.from_dict(
        {
            "name": name,
            "search": {"epochs": args.epochs, "batch_size": 64, "model": {"channels": 8, "cells": 5}, "data": data},
            "space": {"preset": {"choices": ["darts", "da2s"]}, "seed": {"type": "int", "low": 0, "high": 10**6}},
            "sampler": {"type": "random", "seed": 0},
            "num_samples": args.trials,
            "concurrency": concurrency,
            "resources": {"cpu": cpu, "gpu": gpu},
            "storage": str(workdir / "ray"),
            "mlflow": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"},
        }
    )


def measure(args, workdir: Path, name: str, cpu: float, gpu: float, concurrency: int) -> dict:
    from tuning.sweep import run_sweep

    sweep = sweep_for(args, workdir, name, cpu, gpu, concurrency)
    started = time.perf_counter()
    outcome = run_sweep(sweep, base_dir=workdir)
    wall = time.perf_counter() - started
    trials = []
    for trial in outcome.trials:
        m = trial.metrics
        total, search = m.get("time_total_s"), m.get("search_seconds")
        if total and search:
            trials.append(
                {"trial": trial.trial_id, "wall_s": total, "search_s": search, "overhead_share": 1 - search / total}
            )
    shares = [t["overhead_share"] for t in trials]
    return {
        "setting": name,
        "cpu_per_trial": cpu,
        "threads_per_trial": trial_threads(cpu),
        "gpu_per_trial": gpu,
        "concurrency": concurrency,
        "trials": trials,
        "mean_overhead_share": statistics.fmean(shares) if shares else float("nan"),
        "sweep_wall_s": wall,
        "searches_per_hour": len(trials) / wall * 3600,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2], help="trials at once (CPU runs)")
    parser.add_argument("--cpus-per-trial", type=float, help="default: cores / concurrency (GPU runs: 1)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--gpu-fractions", type=float, nargs="+", help="GPU share per trial, e.g. 1 0.5 0.25")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.gpu_fractions:
            import torch

            gpus = torch.cuda.device_count()
            if not gpus:
                print("error: --gpu-fractions needs a machine with GPUs", file=sys.stderr)
                return 2
            for fraction in args.gpu_fractions:
                per_gpu = round(1 / fraction)
                cpus = args.cpus_per_trial or 1.0
                rows.append(measure(args, Path(tmp) / f"g{per_gpu}", f"gpu{per_gpu}", cpus, fraction, per_gpu * gpus))
        else:
            for concurrency in args.concurrency:
                cpus = args.cpus_per_trial or float(max(1, usable_cpus() // concurrency))
                rows.append(measure(args, Path(tmp) / f"c{concurrency}", f"cpu{concurrency}", cpus, 0.0, concurrency))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(
            f"\n{row['setting']}: {row['concurrency']} trials at once, {row['cpu_per_trial']:g} CPU "
            f"({row['threads_per_trial']} threads) + {row['gpu_per_trial']:g} GPU each"
        )
        print(f"{'trial':10s} {'wall s':>8s} {'search s':>9s} {'overhead':>9s}")
        for t in row["trials"]:
            print(f"{t['trial']:10s} {t['wall_s']:8.1f} {t['search_s']:9.1f} {100 * t['overhead_share']:8.1f}%")
        print(f"mean overhead {100 * row['mean_overhead_share']:.1f}% of trial time; {row['searches_per_hour']:.1f} searches/hour "
              f"(sweep wall {row['sweep_wall_s']:.0f} s, Ray start included)")  # fmt: skip
    print(
        f"\n{'setting':8s} {'at once':>7s} {'CPU/trial':>9s} {'threads':>7s} {'mean trial s':>12s} {'searches/hour':>13s}"
    )
    for row in rows:
        walls = [t["wall_s"] for t in row["trials"]]
        mean = statistics.fmean(walls) if walls else float("nan")
        print(f"{row['setting']:8s} {row['concurrency']:7d} {row['cpu_per_trial']:9g} {row['threads_per_trial']:7d} "
              f"{mean:12.1f} {row['searches_per_hour']:13.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
