"""Search-step throughput and peak memory of the supernet.

    python bench/search_step.py [--device cpu|cuda] [--configs standard small] [--modes naive fast]
                                [--preset darts] [--json]

For each configuration (standard: C=16, 8 cells, batch 64; small: C=8, 5 cells, batch 32; both
on 32x32 images) it prints images per second of a first-order search step (architecture step on
a validation batch + weight step on a training batch, as `Search.step` runs it in a search) and of
a weight step alone, the GFLOP of a search step and the achieved GFLOP/s, and the peak memory (the child
process's maximum RSS on CPU; the CUDA allocator's peak on GPU). Each configuration runs in a
child process of its own, so peaks do not mix.

Modes: `fast` is the project's default runtime (fused edges, channels-last, bf16 autocast on
CUDA); `naive` is the same supernet run the way the public reference code runs it (a Python loop
over every op of every edge, float32, no fusing, PyTorch's default layout). Both run in the same
invocation, so their ratio is measured on the same machine state.

FLOPs: PyTorch's FlopCounterMode counts the forward pass correctly but ignores `groups` in the
backward of a depthwise convolution (a ~30x overcount), so the backward is modelled instead: a
weight step costs the forward, the input gradients and the weight gradients (3x the forward: about
115 GFLOP for the standard config), and a first-order architecture step the forward and the input
gradients (2x); a search step is 5x the forward.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "standard": {"model.channels": 16, "model.cells": 8, "batch_size": 64},
    "small": {"model.channels": 8, "model.cells": 5, "batch_size": 32},
}


MODES = {
    "naive": ["runtime.fused=false", "runtime.channels_last=false", "runtime.amp=off"],
    "fast": [],
}


def measure(name: str, mode: str, preset: str, device: str, steps: int, warmup: int, threads: int | None) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nas.search import Search, SearchConfig

    if threads:
        torch.set_num_threads(threads)
    overrides = [f"{k}={v}" for k, v in CONFIGS[name].items()] + [f"device={device}"] + MODES[mode]
    config = SearchConfig.resolve(preset, overrides=overrides)
    dev = torch.device(device)
    search = Search.build(config, steps_per_epoch=391, num_classes=10, device=dev)
    search.supernet.train()
    g = torch.Generator().manual_seed(0)

    def batch():
        images = torch.randn(config.batch_size, 3, 32, 32, generator=g).to(dev)
        return images, torch.randint(0, 10, (config.batch_size,), generator=g).to(dev)

    train, valid = batch(), batch()
    weights = config.loss.weights_at(config.epochs, config.epochs)  # every term active

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n):
        for _ in range(warmup):
            fn()
        sync()
        started = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - started) / n

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    search_seconds = timed(lambda: search.step(train, valid, weights, 0.025), steps)
    weight_seconds = timed(lambda: search.weight_step(train), steps)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        search.supernet(train[0], search.arch())
    flops = 5 * counter.get_total_flops()
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {
        "config": name,
        "mode": mode,
        "preset": preset,
        "device": device,
        "threads": torch.get_num_threads(),
        "batch_size": config.batch_size,
        "search_step_s": search_seconds,
        "search_images_per_s": config.batch_size / search_seconds,
        "weight_step_s": weight_seconds,
        "weight_images_per_s": config.batch_size / weight_seconds,
        "search_step_gflop": flops / 1e9,
        "gflop_per_s": flops / 1e9 / search_seconds,
        "peak_memory_gib": peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--preset", default="darts", choices=("darts", "da2s", "multilevel"))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each measurement")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="fast", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(
            json.dumps(measure(args.child, args.mode, args.preset, args.device, args.steps, args.warmup, args.threads))
        )
        return 0

    rows = []
    for name in args.configs:
        for mode in args.modes:
            command = [sys.executable, __file__, "--child", name, "--mode", mode, "--device", args.device]
            command += ["--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    naive = {r["config"]: r for r in rows if r["mode"] == "naive"}
    for r in rows:
        if r["config"] in naive:
            r["speedup_vs_naive"] = r["search_images_per_s"] / naive[r["config"]]["search_images_per_s"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = (
        f"{'config':9s} {'mode':6s} {'device':6s} {'search img/s':>12s} {'weight img/s':>12s} {'GFLOP/step':>10s} "
        f"{'GFLOP/s':>8s} {'peak GiB':>8s} {'vs naive':>8s}"
    )
    print(header)
    for r in rows:
        ratio = f"{r['speedup_vs_naive']:7.2f}x" if "speedup_vs_naive" in r else ""
        print(
            f"{r['config']:9s} {r['mode']:6s} {r['device']:6s} {r['search_images_per_s']:12.2f} "
            f"{r['weight_images_per_s']:12.2f} {r['search_step_gflop']:10.1f} {r['gflop_per_s']:8.1f} "
            f"{r['peak_memory_gib']:8.2f} {ratio:>8s}"
        )
    if not math.isfinite(sum(r["search_images_per_s"] for r in rows)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
