"""bench/gpu_check.py must not rot between GPU runs: its dry run (toy sizes, on the CPU) runs every
stage and writes every stage's figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_stage(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out), "--budget", "400"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads((out / "gpu_check.json").read_text())
    assert figures["env"]["device"] == "cpu"
    assert figures["cuda_tests"]["returncode"] == 0  # skipped without CUDA, but collected and run

    rows = {row["mode"]: row for row in figures["search_step"]["summary"]}
    assert set(rows) == {"naive", "fast", "fast_static"}
    for row in rows.values():
        assert row["search_images_per_s"] > 0
        assert row["compute_ops_per_step"] > 1000  # a toy supernet step still dispatches thousands

    layout = figures["layout"]
    assert layout["returncode"] == 0
    ops = {key.split("/")[0] for key in layout["isolated"]}
    assert ops == {"grouped_1x1_conv_weight_grad", "avg_pool_3x3_pad1_input_grad",
                   "avg_pool_3x3_stride2_pad1_input_grad", "max_pool_3x3_pad1_input_grad"}  # fmt: skip
    assert all(value < 1e-4 for value in layout["isolated"].values())  # the CPU gets them right
    assert layout["supernet"]

    packing = figures["packing"]
    for n in ("1", "2", "4"):
        assert packing[n]["finished"] == int(n), packing[n]
        assert packing[n]["searches_per_hour"] > 0
    assert "CUDA" in packing["mps"]  # says why MPS did not run

    cost = figures["search_cost"]
    assert cost["returncode"] == 0
    assert len(cost["epochs"]) == 2 and {"train", "eval", "discretize"} <= set(cost["epochs"][-1])
    assert cost["extrapolated_50_epochs_hours"] > 0
    assert set(figures["summary"]) == {"tests", "step", "layout", "packing", "cost"}
    assert (out / "gpu_check.log").exists()
