"""Everything that needs a GPU, in one run that fits a short lease (about 8 minutes on an H100/H200):

    python bench/gpu_check.py --out OUT_DIR [--budget 480] [--data-root SMALL_CIFAR]

Stages, most important first; each runs in its own process with a time limit taken from what is
left of `--budget`. Every figure goes to OUT_DIR/gpu_check.json, rewritten after each stage (a
stage that fails or runs out of time leaves the others' results intact), and what the stages
printed to OUT_DIR/gpu_check.log:

1. `env`: PyTorch, CUDA, the GPU and its compute capability.
2. `cuda_tests`: `pytest -m cuda` (tests/test_cuda.py) and the figures the tests measured, among
   them the CUDA-graph step against the same step eager over 50 steps, with eager and graphed
   step times taken in one process (`graphed_step_*`); `--data-root` points them at a small
   CIFAR-10 copy (else generated images).
3. `search_step`: bench/search_step.py on the standard config (C=16, 8 cells, batch 64): naive
   (reference-style), the fast eager default and the fast step as a CUDA graph, each with its
   step time, ops dispatched per step, kernels per step and the GPU's busy share.
4. `layout`: bench/cuda_layout_check.py: which op, if any, computes wrong gradients in
   channels-last (grouped 1x1 convolution weight gradients, average and max pooling with padding),
   and the fused supernet's gradients per layout with cuDNN on and off.
5. `packing`: 1, 2 and 4 searches sharing the GPU as separate processes (as Ray's fractional
   `gpu: 0.5` / `0.25` trials would run them; plain `python -m nas search` processes stand in for
   trials), each a standard DA2S search of one short epoch with the graphed step: step time,
   searches per hour at paper scale (training steps and evaluation scaled to 391 steps and the 10k
   test images an epoch), GPU memory per search; for 2 and 4, also under the MPS control daemon
   (`nvidia-cuda-mps-control`, where the machine has it): without MPS, processes time-slice the GPU.
6. `search_cost`, with what time is left: a paper-scale DA2S search (`python -m nas search
   --preset da2s`, the default model and the 25k/25k split, generated images of CIFAR-10's shape,
   the graphed step) for two epochs, each epoch's wall time split into phases and the 50-epoch
   wall time extrapolated.
7. `search_step_compile` (only when named with `--with compile`): the fast path with torch.compile.

`--dry-run` runs every stage at toy sizes on the CPU (the graphed step runs eagerly there, MPS is
absent), to check the script itself; tests/test_bench.py runs it.
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
    record = run(search_command(run_dir, data_root, device, sets), budget.limit(400, 5), (out, "search cost"))
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


class MPS:
    """The CUDA MPS control daemon for the packed searches, in a directory of this run's own."""

    def __init__(self, work: Path):
        self.binary = shutil.which("nvidia-cuda-mps-control")
        self.env = {
            "CUDA_MPS_PIPE_DIRECTORY": str(work / "mps_pipe"),
            "CUDA_MPS_LOG_DIRECTORY": str(work / "mps_log"),
        }
        self.running = False

    def start(self) -> str | None:
        """None when it runs, else why not."""
        if self.binary is None:
            return "nvidia-cuda-mps-control not on PATH"
        for d in self.env.values():
            Path(d).mkdir(parents=True, exist_ok=True)
        done = subprocess.run([self.binary, "-d"], env={**os.environ, **self.env}, capture_output=True, text=True)
        if done.returncode != 0:
            return f"nvidia-cuda-mps-control -d: exit {done.returncode} {done.stderr.strip()[-300:]}"
        self.running = True
        return None

    def stop(self) -> None:
        if self.running:
            subprocess.run([self.binary], input="quit\n", env={**os.environ, **self.env}, text=True, timeout=30)
            self.running = False


def pack(
    n: int, timeout: float, device: str, data_root: Path, sets: list[str], work: Path, eval_images: int, env: dict
) -> dict:
    """n searches at once, as separate processes; figures from their last epoch."""
    smi = shutil.which("nvidia-smi") if device == "cuda" else None
    tag = f"pack{n}{'_mps' if env else ''}"
    started = time.monotonic()
    procs = []
    for i in range(n):
        command = search_command(work / f"{tag}_{i}", data_root, device, [*sets, f"seed={i + 1}"])
        log = open(work / f"{tag}_{i}.log", "w")  # noqa: SIM115
        child_env = {**os.environ, **env}
        procs.append((subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env), log))
    memory_samples = []
    while any(p.poll() is None for p, _ in procs) and time.monotonic() - started < timeout:
        if smi and time.monotonic() - started > 10:
            used = subprocess.run(
                [smi, "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            if used:
                memory_samples.append(used)
        time.sleep(1)
    for p, log in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        log.close()
    wall = time.monotonic() - started
    runs = []
    for i in range(n):
        path = work / f"{tag}_{i}" / "result.json"
        if path.exists():
            runs.append(epoch_summary(json.loads(path.read_text())))
        else:
            tail = (work / f"{tag}_{i}.log").read_text()[-1500:]
            runs.append({"error": f"no result within {timeout:.0f} s", "log_tail": tail})
    done = [r for r in runs if "step_seconds" in r]
    entry: dict = {"searches": n, "mps": bool(env), "wall_seconds": wall, "finished": len(done), "runs": runs,
                   "nvidia_smi_memory_mib_util_pct": memory_samples}  # fmt: skip
    if done:
        # From the searches that finished (all of them, unless `finished` says otherwise): a paper-scale
        # search is 50 epochs of 391 steps, its evaluation and discretization scaled from this run's
        # eval set to the 10k test images (the default eval split at full scale).
        step = sum(r["step_seconds"] for r in done) / len(done)
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
    return entry


def stage_packing(
    out: Path, budget: Budget, device: str, data_root: Path, sets: list[str], work: Path, eval_images: int,
    per_run: float,
) -> dict:  # fmt: skip
    """1, 2 and 4 searches per GPU, then 2 and 4 under MPS."""
    results: dict = {}
    for n in (1, 2, 4):
        timeout = budget.limit(per_run * (1 + n / 2), 60)
        results[str(n)] = (
            pack(n, timeout, device, data_root, sets, work, eval_images, {})
            if timeout >= 20
            else {"skipped": "no time left"}
        )
        write(out, "packing", results)
    mps = MPS(work)
    why = mps.start() if device == "cuda" else "MPS is CUDA's (dry run on the CPU)"
    results["mps"] = why or "running"
    if why is None:
        try:
            for n in (2, 4):
                timeout = budget.limit(per_run * (1 + n / 4), 60)
                results[f"{n}_mps"] = (
                    pack(n, timeout, device, data_root, sets, work, eval_images, mps.env)
                    if timeout >= 20
                    else {"skipped": "no time left"}
                )
                write(out, "packing", results)
        finally:
            mps.stop()
    write(out, "packing", results)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the JSON figures and logs")
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything")
    parser.add_argument("--data-root", help="a small CIFAR-10 copy (train.npz/test.npz) for the CUDA tests")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, to check this script")
    parser.add_argument(
        "--skip", nargs="*", default=[], help="stages to leave out: tests step layout packing cost"
    )  # fmt: skip
    parser.add_argument("--with", dest="extra", nargs="*", default=[], help="optional stages: compile")
    args = parser.parse_args()
    budget = Budget(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    sys.path.insert(0, str(ROOT))
    device = "cpu" if args.dry_run else "cuda"
    # In a dry run every child process computes on one thread: several share a small machine.
    child_env = {"OMP_NUM_THREADS": "1"} if args.dry_run else {}
    os.environ.update(child_env)
    env = stage_env(out, device)
    print(f"{env.get('name', device)}  torch {env['torch']}  cuda {env['cuda']}", flush=True)

    summary: dict = {}
    if "tests" not in args.skip:
        test_env = {"NAS_CUDA_REPORT": str(work / "cuda_tests.json")}
        if args.data_root:
            test_env["NAS_DATA_ROOT"] = str(Path(args.data_root).resolve())
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"]
        command += ["--durations=0"]
        record = run(command, budget.limit(170, 240), (out, "cuda tests"), test_env)
        figures = json.loads((work / "cuda_tests.json").read_text()) if (work / "cuda_tests.json").exists() else {}
        write(out, "cuda_tests", {"returncode": record.get("returncode"), "seconds": record.get("seconds"),
                                  "tail": record.get("tail", "")[-1500:], "figures": figures})  # fmt: skip
        summary["tests"] = {k: record.get(k) for k in ("returncode", "seconds")}
        print(f"cuda tests: exit {record.get('returncode')} in {record.get('seconds', 0):.0f}s", flush=True)

    step_base = [sys.executable, "bench/search_step.py", "--device", device, "--json"]
    if args.dry_run:
        step_base += ["--configs", "toy", "--steps", "1", "--warmup", "1"]
        modes = ["naive", "fast", "fast_static"]
    else:
        step_base += ["--configs", "standard", "--steps", "5", "--warmup", "3", "--profile"]
        modes = ["naive", "fast", "fast_graphs"]
    if "step" not in args.skip:
        command = [*step_base, "--modes", *modes, "--out", str(work / "search_step.json"), "--timeout", "100"]
        record = run(command, budget.limit(200, 180), (out, "search step"))
        if (work / "search_step.json").exists():
            write(out, "search_step", json.loads((work / "search_step.json").read_text()))
        summary["step"] = {k: record.get(k) for k in ("returncode", "seconds")}
        print(f"search step: exit {record.get('returncode')} in {record.get('seconds', 0):.0f}s", flush=True)

    if "layout" not in args.skip:
        command = [sys.executable, "bench/cuda_layout_check.py", "--device", device, "--json"]
        record = run(command, budget.limit(60, 150), (out, "layout"))
        lines = record.get("tail", "").strip().splitlines()
        try:
            figures = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            figures = {"error": record.get("tail", "")[-800:]}
        write(out, "layout", figures | {"returncode": record.get("returncode")})
        summary["layout"] = {"returncode": record.get("returncode")}
        print(f"layout: exit {record.get('returncode')}", flush=True)

    synth = make_synthetic_root(work / "synthetic", 2000 if args.dry_run else 50_000, 200 if args.dry_run else 10_000)
    graphs = [] if args.dry_run else ["runtime.cuda_graphs=true"]
    if "packing" not in args.skip:
        sets = [*graphs, "epochs=1", "data.subset=3840", "data.eval_subset=1000"]  # 30 steps of batch 64
        eval_images, per_run = 1000, 40
        if args.dry_run:
            sets = ["epochs=1", "data.subset=128", "data.eval_subset=32", "model.channels=4", "model.cells=3"]
            sets += ["batch_size=16", "data.resolution=8", "discretize.bn_recal_batches=1"]
            eval_images, per_run = 32, 40
        packing = stage_packing(out, budget, device, synth, sets, work, eval_images, per_run)
        summary["packing"] = {
            n: {k: v for k, v in e.items() if k in ("searches_per_hour", "finished", "skipped")}
            for n, e in packing.items()
            if isinstance(e, dict)
        }
        print(f"packing: {summary['packing']} (mps: {packing.get('mps')})", flush=True)

    if "cost" not in args.skip:
        sets = [*graphs, "epochs=2"]
        if args.dry_run:
            sets += ["data.subset=128", "data.eval_subset=32", "model.channels=4", "model.cells=3", "batch_size=16"]
            sets += ["data.resolution=8", "discretize.bn_recal_batches=1"]
        if budget.left() > 60:
            record = stage_cost(out, budget, device, synth, sets, work)
            summary["cost"] = {
                k: record.get(k) for k in ("returncode", "epoch_seconds_all_phases", "extrapolated_50_epochs_hours")
            }
        else:
            write(out, "search_cost", {"skipped": "no time left"})
            summary["cost"] = {"skipped": "no time left"}
        print(f"search cost: {summary['cost']}", flush=True)

    if "compile" in args.extra and not args.dry_run:
        command = [*step_base, "--modes", "fast_compile", "--out", str(work / "search_step_compile.json")]
        record = run([*command, "--timeout", str(max(10, budget.left() - 15))], budget.limit(600, 10), (out, "compile"))
        if (work / "search_step_compile.json").exists():
            write(out, "search_step_compile", json.loads((work / "search_step_compile.json").read_text()))
        summary["compile"] = {k: record.get(k) for k in ("returncode", "seconds")} | {"tail": record["tail"][-400:]}
        print(f"compile: exit {record.get('returncode')}", flush=True)

    for log in sorted(work.glob("pack*.log")):
        append_log(out, f"packing {log.stem}", log.read_text()[-4000:])
    write(out, "summary", summary)
    shutil.rmtree(work, ignore_errors=True)
    for stage in ("search_step", "search_step_compile"):
        for row in RESULTS.get(stage, {}).get("summary", []):
            print(
                f"{row['mode']:12s} {row['search_images_per_s']:8.1f} img/s  {row['peak_memory_gib']:6.2f} GiB  "
                f"busy {100 * row.get('gpu_busy_share', float('nan')):5.1f}%  "
                f"kernels/step {row.get('kernels_per_step', float('nan')):7.0f}  ops/step {row.get('compute_ops_per_step')}"
            )
        for row in RESULTS.get(stage, {}).get("runs", []):
            if "error" in row:
                print(f"{row['mode']:12s} failed: {row['error']}")
    failed = [name for name, stage in summary.items() if stage.get("returncode") not in (0, None)]
    if failed:
        print(f"stages that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
