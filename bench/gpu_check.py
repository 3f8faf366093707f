"""Everything that needs a GPU, in one run that fits a short lease (about 8 minutes on an H100/H200):

    python bench/gpu_check.py --out OUT_DIR [--budget 540] [--data-root SMALL_CIFAR]

Stages, most important first; each runs in its own process with a time limit taken from what is
left of `--budget`. Every figure goes to OUT_DIR/gpu_check.json, rewritten after each stage (a
stage that fails or runs out of time leaves the others' results intact), and what the stages
printed to OUT_DIR/gpu_check.log:

1. `env`: PyTorch, CUDA, the GPU and its compute capability.
2. `cuda_tests`: `pytest -m cuda` (tests/test_cuda.py) and the figures the tests measured;
   `--data-root` points them at a small CIFAR-10 copy (else generated images).
3. `search_step`: bench/search_step.py on the standard config (C=16, 8 cells, batch 64): naive
   (reference-style) vs the fast path and its ablations, with the GPU's busy share.
4. `search_cost` (off by default: on an H200 it alone needs about 8 minutes; run it on its own
   with `--skip tests step packing compile`): a paper-scale DA2S search (`python -m nas search
   --preset da2s`, the default model and the 25k/25k split, generated images of CIFAR-10's shape)
   for two epochs, with each epoch's wall time split into phases and the 50-epoch wall time
   extrapolated.
5. `packing`: 1, 2 and 4 searches sharing the GPU as separate processes (as Ray's fractional
   `gpu: 0.5` / `0.25` trials would run them; plain `python -m nas search` processes stand in for
   trials), each a standard DA2S search of one 60-step epoch: step time, searches per hour at paper
   scale (training steps and evaluation scaled to 391 steps and the 10k test images an epoch), and GPU
   memory per search.
6. `search_step_compile`: the fast path with torch.compile, if time is left.

`--dry-run` runs every stage at toy sizes on the CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_EPOCHS = 50
REFERENCE_STEPS = 391  # ceil(25000 / 64)


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, wanted: float, reserve: float = 0.0) -> float:
        return max(0.0, min(wanted, self.left() - reserve))


def run(command: list[str], timeout: float, log: tuple[Path, str] | None = None, env: dict | None = None) -> dict:
    """Runs `command` in the checkout; returns its exit code, seconds and output tail."""
    started = time.monotonic()
    if timeout < 5:
        return {"command": command, "skipped": "no time left"}
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code = "timeout"
        out = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
    if log is not None:
        append_log(*log, out)
    return {"command": command, "returncode": code, "seconds": time.monotonic() - started, "tail": out[-3000:]}


RESULTS: dict = {}


def write(out: Path, name: str, data) -> None:
    """Adds one stage's figures to OUT/gpu_check.json (rewritten after every stage)."""
    RESULTS[name.removesuffix(".json")] = data
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2) + "\n")


def append_log(out: Path, title: str, text: str) -> None:
    with open(out / "gpu_check.log", "a") as log:
        log.write(f"\n===== {title}\n{text}\n")


def stage_env(out: Path, device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            info["nvidia_smi"] = subprocess.run([smi], capture_output=True, text=True).stdout
    write(out, "env", info)
    return info


def make_synthetic_root(path: Path, n_train: int, n_test: int) -> Path:
    """Generated images of CIFAR-10's shape as train.npz/test.npz, made once for every process."""
    import numpy as np

    from nas.data import synthetic_cifar

    train, test = synthetic_cifar(n_train, n_test, seed=0)
    path.mkdir(parents=True, exist_ok=True)
    hwc = lambda s: s.images.permute(0, 2, 3, 1).numpy()  # noqa: E731
    np.savez(path / "train.npz", x_train=hwc(train), y_train=train.labels.numpy().astype("uint8"))
    np.savez(path / "test.npz", x_test=hwc(test), y_test=test.labels.numpy().astype("uint8"))
    return path


def search_command(out_dir: Path, data_root: Path, device: str, sets: list[str]) -> list[str]:
    command = [sys.executable, "-m", "nas", "search", "--preset", "da2s", "--out", str(out_dir), "--no-resume", "-q"]
    command += ["--data-root", str(data_root), "--set", f"device={device}", "--set", "data.download=false"]
    for s in sets:
        command += ["--set", s]
    return command


def epoch_summary(result: dict) -> dict:
    """Per-epoch phase seconds and the steady-state figures of a search's result.json."""
    history = result["history"]
    steps = result["info"]["steps_per_epoch"]
    phases = [h.get("phase_seconds", {}) for h in history]
    last = phases[-1]
    return {
        "steps_per_epoch": steps,
        "epochs": [{"seconds": h["seconds"], **p} for h, p in zip(history, phases)],
        "step_seconds": last.get("train", float("nan")) / steps,
        "final_metrics_seconds": result["info"].get("final_metrics_seconds"),
        "total_seconds": result["info"]["seconds"],
        "peak_gpu_memory_gib": result["info"].get("peak_gpu_memory_gib"),
    }


def stage_cost(out: Path, budget: Budget, device: str, data_root: Path, sets: list[str], work: Path) -> dict:
    run_dir = work / "cost"
    record = run(search_command(run_dir, data_root, device, sets), budget.limit(200, 120), (out, "search cost"))
    if (run_dir / "result.json").exists():
        result = json.loads((run_dir / "result.json").read_text())
        summary = epoch_summary(result)
        last = summary["epochs"][-1]
        epoch_seconds = sum(v for k, v in last.items() if k != "seconds")
        record.update(summary)
        record["epoch_seconds_all_phases"] = epoch_seconds
        record["extrapolated_50_epochs_hours"] = (
            REFERENCE_EPOCHS * epoch_seconds + (summary["final_metrics_seconds"] or 0)
        ) / 3600
    write(out, "search_cost", record)
    return record


def stage_packing(
    out: Path, budget: Budget, device: str, data_root: Path, sets: list[str], work: Path, eval_images: int
) -> dict:
    """n searches at once, as separate processes; figures from their last epoch."""
    results = {}
    smi = shutil.which("nvidia-smi")
    for n in (1, 2, 4):
        timeout = budget.limit(130, 10)
        if timeout < 30:
            results[str(n)] = {"skipped": "no time left"}
            continue
        started = time.monotonic()
        procs = []
        for i in range(n):
            command = search_command(work / f"pack{n}_{i}", data_root, device, [*sets, f"seed={i + 1}"])
            log = open(work / f"pack{n}_{i}.log", "w")  # noqa: SIM115
            procs.append((subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
        memory_samples = []
        while any(p.poll() is None for p, _ in procs) and time.monotonic() - started < timeout:
            if smi and time.monotonic() - started > 20:
                used = subprocess.run(
                    [smi, "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True,
                ).stdout.strip()  # fmt: skip
                if used:
                    memory_samples.append(used)
            time.sleep(2)
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
        wall = time.monotonic() - started
        runs = []
        for i in range(n):
            path = work / f"pack{n}_{i}" / "result.json"
            if path.exists():
                runs.append(epoch_summary(json.loads(path.read_text())))
            else:
                tail = (work / f"pack{n}_{i}.log").read_text()[-1500:]
                runs.append({"error": tail or f"no result within {timeout:.0f} s"})
        done = [r for r in runs if "step_seconds" in r]
        entry = {"wall_seconds": wall, "runs": runs, "nvidia_smi_memory_mib_util_pct": memory_samples}
        if len(done) == n:
            step = sum(r["step_seconds"] for r in done) / n
            # A paper-scale search: 50 epochs of 391 steps; evaluation and discretization scaled from
            # this run's eval set to the 10k test images (the default eval split at full scale).
            last = done[0]["epochs"][-1]
            eval_share = (last.get("eval", 0) + last.get("discretize", 0)) * 10_000 / eval_images
            epoch = step * REFERENCE_STEPS + eval_share
            entry.update(
                step_seconds_per_search=step,
                images_per_s_total=n * 64 / step,
                estimated_paper_search_hours=REFERENCE_EPOCHS * epoch / 3600,
                searches_per_hour=n * 3600 / (REFERENCE_EPOCHS * epoch),
                peak_gpu_memory_gib_per_search=max(r["peak_gpu_memory_gib"] or 0 for r in done),
            )
        results[str(n)] = entry
        write(out, "packing", results)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the JSON figures and logs")
    parser.add_argument("--budget", type=float, default=540, help="seconds for everything")
    parser.add_argument("--data-root", help="a small CIFAR-10 copy (train.npz/test.npz) for the CUDA tests")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, to check this script")
    parser.add_argument(
        "--skip", nargs="*", default=["cost"],
        help="stages to leave out: tests step cost packing compile (default: cost, which alone needs ~8 minutes "
        "on an H200; run it with --skip tests step packing compile)",
    )  # fmt: skip
    args = parser.parse_args()
    budget = Budget(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    sys.path.insert(0, str(ROOT))
    device = "cpu" if args.dry_run else "cuda"
    env = stage_env(out, device)
    print(f"{env.get('name', device)}  torch {env['torch']}  cuda {env['cuda']}", flush=True)

    summary = {}
    if "tests" not in args.skip:
        test_env = {"NAS_CUDA_REPORT": str(work / "cuda_tests.json")}
        if args.data_root:
            test_env["NAS_DATA_ROOT"] = str(Path(args.data_root).resolve())
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"]
        command += ["--durations=0"]
        record = run(command, budget.limit(200, 300), (out, "cuda tests"), test_env)
        summary["tests"] = {k: record.get(k) for k in ("returncode", "seconds")} | {"tail": record["tail"][-600:]}
        if (work / "cuda_tests.json").exists():
            write(out, "cuda_tests", json.loads((work / "cuda_tests.json").read_text()))
        print(f"cuda tests: exit {record.get('returncode')} in {record.get('seconds', 0):.0f}s", flush=True)

    step_base = [sys.executable, "bench/search_step.py", "--device", device, "--json"]
    if args.dry_run:
        step_base += ["--configs", "small", "--steps", "1", "--warmup", "1"]
    else:
        step_base += ["--configs", "standard", "--steps", "5", "--warmup", "2", "--profile"]
    if "step" not in args.skip:
        modes = ["naive", "fast"] if args.dry_run else ["naive", "fast", "fast_bf16"]
        command = [*step_base, "--modes", *modes, "--out", str(work / "search_step.json"), "--timeout", "100"]
        record = run(command, budget.limit(180, 250), (out, "search step"))
        if (work / "search_step.json").exists():
            write(out, "search_step", json.loads((work / "search_step.json").read_text()))
        summary["step"] = {k: record.get(k) for k in ("returncode", "seconds")}
        print(f"search step: exit {record.get('returncode')} in {record.get('seconds', 0):.0f}s", flush=True)

    synth = make_synthetic_root(work / "synthetic", 2000 if args.dry_run else 50_000, 200 if args.dry_run else 10_000)
    if "cost" not in args.skip:
        sets = ["epochs=2"]
        if args.dry_run:
            sets += ["data.subset=256", "model.channels=4", "model.cells=3", "batch_size=32", "data.resolution=8"]
        record = stage_cost(out, budget, device, synth, sets, work)
        summary["cost"] = {
            k: record.get(k) for k in ("returncode", "epoch_seconds_all_phases", "extrapolated_50_epochs_hours")
        }
        print(f"search cost: {summary['cost']}", flush=True)

    if "packing" not in args.skip:
        sets = ["epochs=1", "data.subset=7680", "data.eval_subset=2000"]  # 60 steps of batch 64
        if args.dry_run:
            sets = ["epochs=2", "data.subset=256", "data.eval_subset=64", "model.channels=4", "model.cells=3"]
            sets += ["batch_size=32", "data.resolution=8"]
        packing = stage_packing(out, budget, device, synth, sets, work, 64 if args.dry_run else 2000)
        summary["packing"] = {
            n: {k: v for k, v in e.items() if k in ("searches_per_hour", "peak_gpu_memory_gib_per_search", "skipped")}
            for n, e in packing.items()
        }
        print(f"packing: {summary['packing']}", flush=True)

    if "compile" not in args.skip and not args.dry_run:
        command = [*step_base, "--modes", "fast_compile", "--out", str(work / "search_step_compile.json")]
        record = run([*command, "--timeout", str(max(10, budget.left() - 15))], budget.limit(600, 10), (out, "compile"))
        if (work / "search_step_compile.json").exists():
            write(out, "search_step_compile", json.loads((work / "search_step_compile.json").read_text()))
        summary["compile"] = {k: record.get(k) for k in ("returncode", "seconds")} | {"tail": record["tail"][-400:]}
        print(f"compile: exit {record.get('returncode')}", flush=True)

    for n in ("1", "2", "4"):
        for i in range(int(n)):
            log = work / f"pack{n}_{i}.log"
            if log.exists():
                append_log(out, f"packing {n} run {i}", log.read_text()[-4000:])
    write(out, "summary", summary)
    shutil.rmtree(work, ignore_errors=True)
    for row in RESULTS.get("search_step", []) + RESULTS.get("search_step_compile", []):
        if "error" in row:
            print(f"{row['mode']:12s} failed: {row['error']}")
            continue
        print(
            f"{row['mode']:12s} {row['search_images_per_s']:8.1f} img/s  {row['peak_memory_gib']:6.2f} GiB  "
            f"busy {100 * row.get('gpu_busy_share', float('nan')):5.1f}%  "
            f"kernels/step {row.get('kernels_per_step', float('nan')):7.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
