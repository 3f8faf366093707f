"""Search-step throughput and peak memory of the supernet.

    python bench/search_step.py [--device cpu|cuda] [--configs standard small] [--modes naive fast ...]
                                [--reference-dir DARTS_CHECKOUT] [--preset darts] [--profile] [--json] [--out FILE]
    python bench/search_step.py --reference-dir ~/src/darts --configs standard --repeats 3

For each configuration (standard: C=16, 8 cells, batch 64; small: C=8, 5 cells, batch 32; both
on 32x32 images) it prints images per second of a first-order search step (architecture step on
a validation batch + weight step on a training batch, as `Search.step` runs it in a search) and of
a weight step alone, the GFLOP of a search step and the achieved GFLOP/s, and the peak memory (the child
process's maximum RSS on CPU; the CUDA allocator's peak on GPU). Each configuration runs in a
child process of its own, so peaks do not mix.

Modes: `fast` is the project's default runtime (fused edges; channels-last on the CPU; float32);
`naive` is the same supernet run the way the public reference code runs it (a Python loop over
every op of every edge, float32, no fusing, PyTorch's default layout). `fast_bf16` adds bf16
autocast, `fast_compile` torch.compile. `reference` times the public DARTS code itself
(quark0/darts, `cnn/model_search.py` and `cnn/architect.py`, first-order): it is imported from the
checkout that `--reference-dir` names, never copied into this project, with its `.cuda()` calls
made no-ops on the CPU; its search step is the one of its `train_search.py` (architect step on a
validation batch, then SGD with gradient clipping on a training batch). All run in the same
invocation, so their ratios are measured on the same machine state; with `--repeats N` the modes
are run in turn N times (A B A B ...) and the table gives the median and the range of each figure
and of the ratios to `reference` and `naive`, taken repeat by repeat.

Every measurement also counts the ops one search step dispatches (`ops/step`: those that compute,
not views; on a GPU each is a kernel launch paid on the host): `cuda_settings` and
`cuda_settings_static` count, on the CPU, the eager and the graph-ready step with the settings a
CUDA search uses (fused, contiguous, no C kernels); `fast_graphs` replays a captured CUDA graph
(nas/graphs.py), so its count is the few ops around the replay.

With `--profile` each measurement also profiles a few search steps with torch.profiler: on the CPU
the ops with the most self time (a per-op table); with CUDA also the share of wall time in which a
GPU kernel runs and the kernels launched per step: a low share with many short kernels means the
step is bound by launching work, not by computing.

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
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

CONFIGS = {
    "standard": {"model.channels": 16, "model.cells": 8, "batch_size": 64},
    "small": {"model.channels": 8, "model.cells": 5, "batch_size": 32},
    "toy": {"model.channels": 4, "model.cells": 3, "batch_size": 16},  # for checking the scripts
}


MODES = {
    "reference": [],  # the public DARTS code itself (--reference-dir); not this project's supernet
    "naive": ["runtime.fused=false", "runtime.channels_last=false", "runtime.amp=off"],
    "fast": [],  # the defaults: fused; channels-last on the CPU; float32
    "fast_native_dw": [],  # fast, with PyTorch's own depthwise-conv backward (nas.depthwise off)
    "fast_no_c": [],  # fast, without the C depthwise weight gradient (as where no C compiler works)
    "fast_bf16": ["runtime.amp=bf16"],
    "fast_compile": ["runtime.compile=true"],
    # The step written for CUDA graphs (nas/graphs.py), run eagerly; and captured, replayed (CUDA).
    "fast_static": [],
    "fast_graphs": ["runtime.cuda_graphs=true"],
    # On the CPU, the settings a CUDA search runs with: fused, contiguous, no C kernels (op counts).
    "cuda_settings": ["runtime.channels_last=false"],
    "cuda_settings_static": ["runtime.channels_last=false"],
}
DEFAULT_MODES = {
    "cpu": ["naive", "fast"],
    "cuda": ["naive", "fast", "fast_graphs", "fast_bf16", "fast_compile"],
}


def count_ops(step) -> tuple[int, int]:
    """(ops dispatched, kernels of them that are not views or metadata) in one call of `step`,
    counted with a TorchDispatchMode: on a GPU, every one of the latter is a launch on the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0
            self.compute = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            if not func.is_view and func._schema.name not in ("aten::detach", "aten::empty_strided", "aten::empty"):
                self.compute += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        step()
    return counter.ops, counter.compute


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


def cpu_profile(step, steps: int) -> dict:
    """Per-op view of `steps` calls of `step` on the CPU: the ops with the most self time."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        wall_us = (time.perf_counter() - started) * 1e6
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return {"profiled_step_ms": wall_us / steps / 1e3, "top_ops": table}


def reference_steps(name: str, reference_dir: str, device):
    """The public DARTS code's first-order search step, weight step and forward, imported from a
    checkout of quark0/darts at run time (its `cnn/` folder goes on sys.path)."""
    import importlib
    from types import SimpleNamespace

    import torch
    from torch import nn

    cnn = Path(reference_dir).expanduser().resolve()
    if (cnn / "cnn" / "model_search.py").exists():
        cnn = cnn / "cnn"
    if not (cnn / "model_search.py").exists() or not (cnn / "architect.py").exists():
        raise SystemExit(f"--reference-dir: no cnn/model_search.py and cnn/architect.py under {reference_dir}")
    if device.type == "cpu":  # the code calls .cuda() on tensors and modules
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        nn.Module.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, str(cnn))
    model_search = importlib.import_module("model_search")
    architect = importlib.import_module("architect")
    settings = CONFIGS[name]
    criterion = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    model = model_search.Network(settings["model.channels"], 10, settings["model.cells"], criterion).to(device)
    # train_search.py's defaults
    optimizer = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    args = SimpleNamespace(momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-4, arch_weight_decay=1e-3)
    arch = architect.Architect(model, args)
    model.train()

    def weight_step(batch):
        images, labels = batch
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    def step(train, valid):
        arch.step(train[0], train[1], valid[0], valid[1], 0.025, optimizer, unrolled=False)
        weight_step(train)

    return step, weight_step, model


def project_steps(name: str, mode: str, preset: str, device):
    from nas.graphs import GraphedStep, StaticStep
    from nas.search import Search
    from nas.settings import SearchConfig

    overrides = [f"{k}={v}" for k, v in CONFIGS[name].items()] + [f"device={device.type}"] + MODES[mode]
    config = SearchConfig.resolve(preset, overrides=overrides)
    search = Search.build(config, steps_per_epoch=391, num_classes=10, device=device)
    if mode.endswith("_static"):
        search.graphed = GraphedStep(StaticStep(search), capture=False)
    search.supernet.train()
    weights = config.loss.weights_at(config.epochs, config.epochs)  # every term active

    def step(train, valid):
        search.step(train, valid, weights, 0.025)

    return step, search.weight_step, lambda images: search.supernet(images, search.arch())


def measure(
    name: str,
    mode: str,
    preset: str,
    device: str,
    steps: int,
    warmup: int,
    threads: int | None,
    profile: bool = False,
    reference_dir: str | None = None,
) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if mode == "reference":
        if not reference_dir:
            raise SystemExit("mode reference needs --reference-dir (a checkout of quark0/darts)")
        step, weight_step, forward = reference_steps(name, reference_dir, dev)
    else:
        if mode == "fast_native_dw":
            import nas.depthwise

            nas.depthwise.enabled = False
        if mode in ("fast_no_c", "cuda_settings", "cuda_settings_static"):
            import nas.native

            nas.native.disable()
        step, weight_step, forward = project_steps(name, mode, preset, dev)
    batch_size = CONFIGS[name]["batch_size"]
    g = torch.Generator().manual_seed(0)

    def batch():
        images = torch.randn(batch_size, 3, 32, 32, generator=g).to(dev)
        return images, torch.randint(0, 10, (batch_size,), generator=g).to(dev)

    train, valid = batch(), batch()

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
    search_seconds = timed(lambda: step(train, valid), steps)
    weight_seconds = timed(lambda: weight_step(train), steps)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    extra = {}
    if mode != "reference":
        extra["ops_per_step"], extra["compute_ops_per_step"] = count_ops(lambda: step(train, valid))
    if profile and dev.type == "cuda":
        extra = gpu_profile(lambda: step(train, valid), max(3, steps // 2), sync)
    elif profile:
        extra = cpu_profile(lambda: step(train, valid), max(1, steps // 2))
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward(train[0])
        flops = 5 * counter.get_total_flops()
    except Exception:  # a compiled module may not count; the parent fills in another mode's count
        flops = float("nan")
    return {
        "config": name,
        "mode": mode,
        "preset": "darts (reference code)" if mode == "reference" else preset,
        "device": device,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "search_step_s": search_seconds,
        "search_images_per_s": batch_size / search_seconds,
        "weight_step_s": weight_seconds,
        "weight_images_per_s": batch_size / weight_seconds,
        "search_step_gflop": flops / 1e9,
        "gflop_per_s": flops / 1e9 / search_seconds,
        "peak_memory_gib": peak,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        **extra,
    }


def run_child(args, name: str, mode: str) -> tuple[dict | None, str | None]:
    command = [sys.executable, __file__, "--child", name, "--mode", mode, "--device", args.device]
    command += ["--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.profile:
        command.append("--profile")
    if args.reference_dir:
        command += ["--reference-dir", args.reference_dir]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=args.timeout
        )
        error = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]
    except subprocess.TimeoutExpired:
        error = f"gave up after {args.timeout:g} s"
    if error:
        return None, error
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["process_seconds"] = time.perf_counter() - started
    return row, None


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (config, mode): medians and ranges over the repeats, and the ratios of search
    throughput to `reference` and `naive`, each taken within a repeat (modes of one repeat ran
    back to back) before its median is taken."""
    by_key: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_key.setdefault((r["config"], r["mode"]), []).append(r)
    flops = {r["config"]: r["search_step_gflop"] for r in rows if math.isfinite(r["search_step_gflop"])}
    out = []
    for (config, mode), group in by_key.items():
        summary = dict(group[0])
        summary["repeats"] = len(group)
        for key in ("search_images_per_s", "weight_images_per_s", "peak_memory_gib", "search_step_s"):
            values = [r[key] for r in group]
            summary[key] = statistics.median(values)
            summary[key + "_range"] = [min(values), max(values)]
        if not math.isfinite(summary["search_step_gflop"]) and config in flops:
            summary["search_step_gflop"] = flops[config]
        summary["gflop_per_s"] = summary["search_step_gflop"] / summary["search_step_s"]
        for base in ("reference", "naive"):
            ratios = [
                r["search_images_per_s"] / b["search_images_per_s"]
                for r in group
                for b in rows
                if b["config"] == config and b["mode"] == base and b["repeat"] == r["repeat"]
            ]
            if ratios and mode != base:
                summary[f"speedup_vs_{base}"] = statistics.median(ratios)
                summary[f"speedup_vs_{base}_range"] = [min(ratios), max(ratios)]
        summary.pop("top_ops", None)
        out.append(summary)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--modes", nargs="+", choices=list(MODES),
        help="default: naive fast (cpu; reference first with --reference-dir), all but reference (cuda)",
    )  # fmt: skip
    parser.add_argument("--reference-dir", help="a checkout of quark0/darts (its cnn/ folder): adds mode reference")
    parser.add_argument("--preset", default="darts", choices=("darts", "da2s", "multilevel"))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each measurement")
    parser.add_argument("--repeats", type=int, default=1, help="run all modes in turn this many times (A B A B)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--profile", action="store_true", help="per-op profile table (CPU); GPU busy share (CUDA)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement before it is given up")
    parser.add_argument("--out", help="also write the JSON list to this file, updated after every measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="fast", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        row = measure(
            args.child, args.mode, args.preset, args.device, args.steps, args.warmup, args.threads, args.profile,
            args.reference_dir,
        )  # fmt: skip
        print(json.dumps(row))
        return 0

    modes = args.modes or (["reference"] if args.reference_dir else []) + DEFAULT_MODES[args.device]
    if "reference" in modes and not args.reference_dir:
        parser.error("mode reference needs --reference-dir (a checkout of quark0/darts)")
    rows, failed = [], []
    for name in args.configs:
        for repeat in range(args.repeats):
            for mode in modes:
                row, error = run_child(args, name, mode)
                if error:
                    print(f"{name} {mode}: {error}", file=sys.stderr)
                    failed.append({"config": name, "mode": mode, "repeat": repeat, "error": error})
                else:
                    row["repeat"] = repeat
                    rows.append(row)
                    if "top_ops" in row and not args.json:
                        print(f"\n{name} {mode} (repeat {repeat}): {row['profiled_step_ms']:.0f} ms per profiled step")
                        print(row["top_ops"], flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(rows + failed, indent=2) + "\n")
    summary = summarise(rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": rows + failed, "summary": summary}, indent=2) + "\n")
    if args.json:
        print(json.dumps({"runs": rows + failed, "summary": summary}, indent=2))
        return 1 if failed else 0

    def spread(r, key, fmt):
        low, high = r.get(key + "_range", (None, None))
        return f" [{fmt.format(low)}-{fmt.format(high)}]" if r.get("repeats", 1) > 1 and low is not None else ""

    print(f"median of {args.repeats} repeat(s), [min-max] where repeated; ratios taken within each repeat")
    header = (
        f"{'config':9s} {'mode':12s} {'device':6s} {'search img/s':>22s} {'weight img/s':>12s} {'GFLOP/step':>10s} "
        f"{'GFLOP/s':>8s} {'peak GiB':>18s} {'vs reference':>20s} {'vs naive':>20s} {'GPU busy':>8s} {'kernels':>8s} "
        f"{'ops/step':>9s}"
    )
    print(header)
    for r in summary:
        ratios = []
        for base in ("reference", "naive"):
            key = f"speedup_vs_{base}"
            ratios.append(f"{r[key]:.2f}x{spread(r, key, '{:.2f}')}" if key in r else "")
        busy = f"{100 * r['gpu_busy_share']:7.0f}%" if "gpu_busy_share" in r else ""
        kernels = f"{r['kernels_per_step']:8.0f}" if "kernels_per_step" in r else ""
        ops = f"{r['compute_ops_per_step']:9d}" if "compute_ops_per_step" in r else ""
        images = f"{r['search_images_per_s']:.2f}{spread(r, 'search_images_per_s', '{:.2f}')}"
        peak = f"{r['peak_memory_gib']:.2f}{spread(r, 'peak_memory_gib', '{:.2f}')}"
        print(
            f"{r['config']:9s} {r['mode']:12s} {r['device']:6s} {images:>22s} "
            f"{r['weight_images_per_s']:12.2f} {r['search_step_gflop']:10.1f} {r['gflop_per_s']:8.1f} "
            f"{peak:>18s} {ratios[0]:>20s} {ratios[1]:>20s} {busy:>8s} {kernels:>8s} {ops:>9s}"
        )
    for r in summary:
        if "speedup_vs_reference" in r:
            low, high = r["speedup_vs_reference_range"]
            print(
                f"{r['config']} {r['mode']} / reference: {r['speedup_vs_reference']:.2f}x search-step throughput "
                f"(median of {r['repeats']}, range {low:.2f}-{high:.2f})"
            )
    for f in failed:
        print(f"{f['config']:9s} {f['mode']:12s} failed: {f['error']}")
    if failed or not math.isfinite(sum(r["search_images_per_s"] for r in rows)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
