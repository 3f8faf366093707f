"""Feeds bad search settings, bad sweep files and broken files to the project and prints, as a
Markdown table, the one-line error each gets and whether anything was written (docs/reliability.md).

    python bench/bad_inputs.py

Search settings go through `SearchConfig.resolve` (what `python -m nas search` does first); sweep
files and broken files (a sweep file that is not YAML, a damaged CIFAR-10 array file) through
`sweeps/run.py` itself, in a scratch directory, checking afterwards that the directory holds
nothing new: every error comes before any trial starts. Each run's exit code is shown.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nas.config import ConfigError  # noqa: E402
from nas.settings import SearchConfig  # noqa: E402

SEARCH_CASES = [
    ("unknown key", ["epoch=3"]),
    ("misspelt nested key", ["model.chanels=8"]),
    ("bad op name", ["ops=[max_pool_3x3, conv_9x9]"]),
    ("unknown op list", ["ops=nasnet"]),
    ("per-node target of the wrong length", ["target=[2, 2, 2]"]),
    ("node asked to keep more inputs than it has", ["target=[3, 2, 2, 2]"]),
    ("K of M beyond the cell", ["target=15 of 14"]),
    ("per-cell target for another cell size", ["target=3 of 12"]),
    ("target in no known form", ["target=three"]),
    ("target for an unknown level", ["target={normal: [2,2,2,2], middle: 3 of 14}"]),
    ("negative loss weight", ["loss.op_entropy.weight=-0.1"]),
    ("edge loss without edge parameters", ["loss.edge_count.weight=0.1"]),
    ("unknown schedule", ["loss.op_entropy.schedule=linear*cosine"]),
    ("bad order", ["order=third"]),
    ("odd channel count", ["model.channels=9"]),
    ("zero epochs", ["epochs=0"]),
    ("wrong type", ["epochs=two"]),
    ("bad lr scale", ["arch_optim.lr_scale=fast"]),
    ("held-out split without a subset", ["data.eval_split=holdout"]),
    ("unsupported resolution", ["data.resolution=24"]),
    ("beta swap without beta", ["beta.swap_bug=true"]),
]

BASE_SWEEP = {
    "name": "bad",
    "search": {"epochs": 1, "model": {"channels": 4, "cells": 3}, "data": {"dataset": "synthetic"}},
    "space": {"preset": {"choices": ["darts", "da2s"]}},
    "num_samples": 2,
    "storage": "runs/ray",
}
SWEEP_CASES = [
    ("unknown sweep key", {"epochs": 3}),
    ("bad op in a space choice", {"space": {"ops": {"choices": ["darts", "nasnet"]}}}),
    ("space target that does not fit the cell", {"space": {"target": {"choices": ["[2, 2, 2, 2]", "7 of 12"]}}}),
    ("negative range for a weight", {"space": {"loss.op_entropy.weight": {"low": -1.0, "high": 1.0}}}),
    ("log range from zero", {"space": {"alpha.lr": {"low": 0.0, "high": 1.0, "log": True}}}),
    ("unknown objective metric", {"objective": {"metric": "accuracy"}}),
    ("NSGA-II with one objective", {"sampler": {"type": "nsga2"}}),
    (
        "grid with a continuous parameter",
        {"sampler": {"type": "grid"}, "space": {"alpha.lr": {"low": 0.1, "high": 1.0}}},
    ),
    ("ASHA on a final-only metric", {"scheduler": {"type": "asha", "metric": "params"}}),
    ("GPU fraction above one", {"resources": {"gpu": 1.5}}),
    ("GPUs on a machine without any", {"resources": {"cpu": 1, "gpu": 1}}),
    ("missing data", {"search": {"epochs": 1, "data": {"root": "no-such-dir", "download": False}}}),
    ("unwritable output path", {"storage": "a-file/ray"}),
    ("storage on an unknown kind of store", {"storage": "ftp://host/ray"}),
    ("credentials in the storage URI", {"storage": "s3://KEY:SECRET@bucket/ray"}),
    ("credentials in the sweep's storage options", {"storage_options": {"secret_key": "SECRET"}}),
    ("evaluation setting that does not exist", {"evaluate": {"settings": {"layer": 8}}}),
    ("storage that cannot be created", {"storage": "/proc/x/ray"}),
]


def _cifar(work: Path, breaks) -> None:
    """A CIFAR-10 folder of arrays under `work/cifar`, its train.npz then broken by `breaks`."""
    rng = np.random.default_rng(0)
    root = work / "cifar"
    root.mkdir()
    x, y = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 20)
    np.savez(root / "train.npz", x_train=x, y_train=y)
    np.savez(root / "test.npz", x_test=x[:10], y_test=y[:10])
    breaks(root / "train.npz", x, y)


def _truncate(path: Path, x, y) -> None:
    path.write_bytes(path.read_bytes()[:3000])


CIFAR = {"search": {"epochs": 1, "data": {"root": "cifar", "download": False}}, "select_on_test_set": True}
# (label, what the file holds, how the scratch directory is prepared, settings the sweep file adds)
FILE_CASES = [
    ("sweep file that is a list", "`- name: a` / `- name: b`", lambda w: (w / "bad.yaml").write_text("- name: a\n- name: b\n"), None),
    ("sweep file that is not YAML", "`space: {preset: [darts`", lambda w: (w / "bad.yaml").write_text("name: x\nspace: {preset: [darts\n"), None),
    ("sweep file that is binary", "a PNG's first bytes", lambda w: (w / "bad.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe"), None),
    ("truncated CIFAR-10 array file", "train.npz cut to 3000 bytes", lambda w: _cifar(w, _truncate), CIFAR),
    ("CIFAR-10 images channels-first", "train.npz x_train (20, 3, 32, 32)",
     lambda w: _cifar(w, lambda p, x, y: np.savez(p, x_train=x.transpose(0, 3, 1, 2), y_train=y)), CIFAR),
    ("CIFAR-10 labels outside 0-9", "train.npz y_train + 10",
     lambda w: _cifar(w, lambda p, x, y: np.savez(p, x_train=x, y_train=y + 10)), CIFAR),
    ("CIFAR-10 array file of pickled objects", "train.npz x_train dtype=object",
     lambda w: _cifar(w, lambda p, x, y: np.savez(p, x_train=np.array([{}] * 20, dtype=object), y_train=y)), CIFAR),
]  # fmt: skip


def search_rows() -> list[tuple[str, str, str]]:
    rows = []
    for label, overrides in SEARCH_CASES:
        try:
            SearchConfig.resolve(overrides=overrides)
            rows.append((label, " ".join(f"--set {o}" for o in overrides), "(accepted!)"))
        except ConfigError as err:
            rows.append((label, " ".join(f"--set {o}" for o in overrides), f"error: {err}"))
    return rows


def _run_sweep_file(prepare) -> str:
    """`sweeps/run.py bad.yaml` in a scratch directory that `prepare(work)` filled: its exit code,
    its error line, and what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "a-file").write_text("")
        prepare(work)
        before = set(work.rglob("*"))
        done = subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), "bad.yaml", "-q"], cwd=work,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error:")]
        written = sorted(str(p.relative_to(work)) for p in set(work.rglob("*")) - before)
        message = f"exit {done.returncode}: " + (lines[-1] if lines else done.stderr.strip()[-200:])
        if "Traceback" in done.stderr:
            message += "  [with a traceback]"
        if written:
            message += f"  [wrote: {', '.join(written)}]"
        # the scratch directory's name is different on every run
        return message.replace(str(work) + os.sep, "").replace(os.path.realpath(work) + os.sep, "")


def sweep_rows() -> list[tuple[str, str, str]]:
    rows = []
    for label, changes in SWEEP_CASES:
        sweep = {**BASE_SWEEP, **changes}
        message = _run_sweep_file(lambda work, sweep=sweep: (work / "bad.yaml").write_text(yaml.safe_dump(sweep)))
        rows.append((label, "`" + yaml.safe_dump(changes, default_flow_style=True).strip() + "`", message))
    return rows


def file_rows() -> list[tuple[str, str, str]]:
    rows = []
    for label, given, prepare, changes in FILE_CASES:

        def setup(work, prepare=prepare, changes=changes):
            prepare(work)
            if changes is not None:
                (work / "bad.yaml").write_text(yaml.safe_dump({**BASE_SWEEP, **changes}))

        rows.append((label, given, _run_sweep_file(setup)))
    return rows


def main() -> int:
    print("| bad input | given as | what the user gets |")
    print("|---|---|---|")
    for label, given, message in search_rows() + sweep_rows() + file_rows():
        print(f"| {label} | {given.replace('|', '/')} | {message.replace('|', '/')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
