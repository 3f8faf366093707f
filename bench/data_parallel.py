"""Throughput of a short evaluation on 1 and on W data-parallel CPU workers, measured in one run.

    python bench/data_parallel.py [--workers 2] [--repeats 2] [--epochs 3] [--json OUT.json]

Each configuration trains darts_v2's evaluation network (8 cells, C=16, 32x32 CIFAR-10; a subset of
2048 training and 512 test images; global batch 64) with `nas.evaluate.run_evaluation` in real
gloo process groups on this machine (torch.multiprocessing, no Ray: the figures are the training's,
not Ray's start-up), every process on its share of the cores:

    1 worker x C threads        the single-process path
    W workers x C/W threads     BatchNorm per worker (sync_bn: false)
    W workers x C/W threads     BatchNorm synchronised (sync_bn: true)

and prints images per second (training images of the epochs after the first, over their wall time,
test passes included), with the ratios to the single process taken within each repeat; the
configurations alternate, repeat by repeat. Data: $NAS_DATA_ROOT if set, generated images otherwise.
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nas.evaluate import EvalConfig, run_evaluation
from nas.genotype import PUBLISHED


def settings(epochs: int, sync_bn: bool | None) -> list[str]:
    values = {"epochs": epochs, "layers": 8, "channels": 16, "batch_size": 64, "data.subset": 2048,
              "data.test_subset": 512, "device": "cpu", "data.download": False,
              "data.synthetic": not os.environ.get("NAS_DATA_ROOT")}  # fmt: skip
    if sync_bn is not None:
        values["sync_bn"] = sync_bn
    return [f"{k}={v}" for k, v in values.items()]


def _worker(rank: int, world: int, threads: int, rendezvous: str, overrides: list[str], out: str) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        config = EvalConfig.resolve("cifar10", overrides=overrides)
        result = run_evaluation(PUBLISHED["darts_v2"], config)
        if rank == 0:
            Path(out).write_text(json.dumps(result.history))
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(world: int, threads: int, overrides: list[str], scratch: Path) -> float:
    """Training images per second over the epochs after the first."""
    out = scratch / f"history-{time.monotonic_ns()}.json"
    rendezvous = scratch / f"rendezvous-{time.monotonic_ns()}"
    mp.spawn(_worker, args=(world, threads, str(rendezvous), overrides, str(out)), nprocs=world, join=True)
    history = json.loads(out.read_text())[1:]
    images = EvalConfig.resolve("cifar10", overrides=overrides).data.subset
    return images * len(history) / sum(h["seconds"] for h in history)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores to share (default: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="the first is left out (warm-up)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    threads = max(1, args.cores // args.workers)
    configurations = {
        f"1 worker x {args.cores} threads": (1, args.cores, settings(args.epochs, None)),
        f"{args.workers} workers x {threads} threads, BN per worker": (args.workers, threads, settings(args.epochs, False)),
        f"{args.workers} workers x {threads} threads, BN synchronised": (args.workers, threads, settings(args.epochs, True)),
    }  # fmt: skip
    figures: dict[str, list[float]] = {name: [] for name in configurations}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for name, (world, per_worker, overrides) in configurations.items():
                figures[name].append(measure(world, per_worker, overrides, Path(scratch)))
                print(f"repeat {repeat + 1}: {name}: {figures[name][-1]:.1f} images/s", flush=True)
    single = next(iter(figures.values()))
    print(f"\n{'configuration':45s} {'images/s (median [min-max])':>30s} {'/ 1 worker (per repeat)':>26s}")
    summary = {}
    for name, values in figures.items():
        ratios = [v / s for v, s in zip(values, single, strict=True)]
        summary[name] = {"images_per_s": values, "ratio_to_one_worker": ratios}
        print(
            f"{name:45s} {statistics.median(values):10.1f} [{min(values):.1f}-{max(values):.1f}]"
            f"{'':8s} {statistics.median(ratios):6.3f} [{min(ratios):.3f}-{max(ratios):.3f}]"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cores": args.cores, "workers": args.workers, "figures": summary}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
