"""Search-step throughput and peak memory of the supernet.

    python bench/search_step.py [--device cpu|cuda] [--configs standard small] [--modes naive fast ...]
                                [--preset darts] [--profile] [--json] [--out FILE]

For each configuration (standard: C=16, 8 cells, batch 64; small: C=8, 5 cells, batch 32; both
on 32x32 images) it prints images per second of a first-order search step (architecture step on
a validation batch + weight step on a training batch, as `Search.step` runs it in a search) and of
a weight step alone, the GFLOP of a search step and the achieved GFLOP/s, and the peak memory (the child
process's maximum RSS on CPU; the CUDA allocator's peak on GPU). Each configuration runs in a
child process of its own, so peaks do not mix.

Modes: `fast` is the project's default runtime (fused edges; channels-last on the CPU; float32);
`naive` is the same supernet run the way the public reference code runs it (a Python loop over
every op of every edge, float32, no fusing, PyTorch's default layout). `fast_bf16` adds bf16
autocast, `fast_compile` torch.compile. All run in the same
invocation, so their ratios are measured on the same machine state. With `--profile` (CUDA) each
also reports the share of wall time in which a GPU kernel runs and the kernels launched per step:
a low share with many short kernels means the step is bound by launching work, not by computing.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

CONFIGS = {
    "standard": {"model.channels": 16, "model.cells": 8, "batch_size": 64},
    "small": {"model.channels": 8, "model.cells": 5, "batch_size": 32},
}


MODES = {
    "naive": ["runtime.fused=false", "runtime.channels_last=false", "runtime.amp=off"],
    "fast": [],  # the defaults: fused; channels-last on the CPU; float32
    "fast_bf16": ["runtime.amp=bf16"],
    "fast_compile": ["runtime.compile=true"],
}
DEFAULT_MODES = {"cpu": ["naive", "fast"], "cuda": ["naive", "fast", "fast_bf16", "fast_compile"]}


def gpu_profile(step, steps: int, sync) -> dict:
    """Kernel-level view of `steps` calls of `step` on the GPU: the share of wall time in which a
    kernel runs (the union of kernel intervals), kernels launched per step, the mean kernel length,
    and the ops with the most GPU time."""
    import torch
    from torch.autograd import DeviceType

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    sync()
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall_us = (time.perf_counter() - started) * 1e6
    intervals = sorted(
        (e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA
    )
    busy, end = 0.0, float("-inf")
    for start, stop in intervals:  # union of the intervals
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    kernel_us = sum(stop - start for start, stop in intervals)
    table = ""
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=15)
            break
        except Exception:
            continue
    return {
        "gpu_busy_share": busy / wall_us,
        "kernels_per_step": len(intervals) / steps,
        "mean_kernel_us": kernel_us / max(1, len(intervals)),
        "profiled_step_ms": wall_us / steps / 1e3,
        "top_ops": table,
    }


def measure(
    name: str, mode: str, preset: str, device: str, steps: int, warmup: int, threads: int | None, profile: bool = False
) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nas.search import Search
    from nas.settings import SearchConfig

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
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    extra = {}
    if profile and dev.type == "cuda":
        extra = gpu_profile(lambda: search.step(train, valid, weights, 0.025), max(3, steps // 2), sync)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            search.supernet(train[0], search.arch())
        flops = 5 * counter.get_total_flops()
    except Exception:  # a compiled module may not count; the parent fills in another mode's count
        flops = float("nan")
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
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        **extra,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help="default: naive fast (cpu), all (cuda)")
    parser.add_argument("--preset", default="darts", choices=("darts", "da2s", "multilevel"))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each measurement")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--profile", action="store_true", help="CUDA: GPU busy share and kernels per step")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement before it is given up")
    parser.add_argument("--out", help="also write the JSON list to this file, updated after every measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="fast", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        row = measure(
            args.child, args.mode, args.preset, args.device, args.steps, args.warmup, args.threads, args.profile
        )
        print(json.dumps(row))
        return 0

    rows, failed = [], []
    for name in args.configs:
        for mode in args.modes or DEFAULT_MODES[args.device]:
            command = [sys.executable, __file__, "--child", name, "--mode", mode, "--device", args.device]
            command += ["--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            if args.profile:
                command.append("--profile")
            started = time.perf_counter()
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                    timeout=args.timeout,
                )  # fmt: skip
                error = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]
            except subprocess.TimeoutExpired:
                error = f"gave up after {args.timeout:g} s"
            if error:
                print(f"{name} {mode}: {error}", file=sys.stderr)
                failed.append({"config": name, "mode": mode, "error": error})
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row["process_seconds"] = time.perf_counter() - started
                rows.append(row)
            if args.out:
                Path(args.out).write_text(json.dumps(rows + failed, indent=2) + "\n")
    naive = {r["config"]: r for r in rows if r["mode"] == "naive"}
    flops = {r["config"]: r["search_step_gflop"] for r in rows if math.isfinite(r["search_step_gflop"])}
    for r in rows:
        if not math.isfinite(r["search_step_gflop"]) and r["config"] in flops:
            r["search_step_gflop"] = flops[r["config"]]
            r["gflop_per_s"] = flops[r["config"]] / r["search_step_s"]
        if r["config"] in naive:
            r["speedup_vs_naive"] = r["search_images_per_s"] / naive[r["config"]]["search_images_per_s"]
    if args.out:
        Path(args.out).write_text(json.dumps(rows + failed, indent=2) + "\n")
    if args.json:
        print(json.dumps(rows + failed, indent=2))
        return 1 if failed else 0
    header = (
        f"{'config':9s} {'mode':12s} {'device':6s} {'search img/s':>12s} {'weight img/s':>12s} {'GFLOP/step':>10s} "
        f"{'GFLOP/s':>8s} {'peak GiB':>8s} {'vs naive':>8s} {'GPU busy':>8s} {'kernels':>8s}"
    )
    print(header)
    for r in rows:
        ratio = f"{r['speedup_vs_naive']:7.2f}x" if "speedup_vs_naive" in r else ""
        busy = f"{100 * r['gpu_busy_share']:7.0f}%" if "gpu_busy_share" in r else ""
        kernels = f"{r['kernels_per_step']:8.0f}" if "kernels_per_step" in r else ""
        print(
            f"{r['config']:9s} {r['mode']:12s} {r['device']:6s} {r['search_images_per_s']:12.2f} "
            f"{r['weight_images_per_s']:12.2f} {r['search_step_gflop']:10.1f} {r['gflop_per_s']:8.1f} "
            f"{r['peak_memory_gib']:8.2f} {ratio:>8s} {busy:>8s} {kernels:>8s}"
        )
    for f in failed:
        print(f"{f['config']:9s} {f['mode']:12s} failed: {f['error']}")
    if failed or not math.isfinite(sum(r["search_images_per_s"] for r in rows)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
