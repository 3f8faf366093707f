"""`python -m nas` as a user runs it: search, resume, derive, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from conftest import tiny_search_config


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nas", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_search_then_derive_under_another_target(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_search_config(epochs=1)))
    out = tmp_path / "run"
    done = run_cli(
        "search", "--config", str(config), "--preset", "da2s", "--out", str(out), "--set", "target=[1, 1, 2, 3]", "-q"
    )
    assert done.returncode == 0, done.stderr
    assert "discretized, trained edge weights" in done.stdout and "[1, 1, 2, 3]" in done.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["target"] == [1, 1, 2, 3] and result["config"]["preset"] == "da2s"

    again = run_cli(
        "search", "--config", str(config), "--preset", "da2s", "--out", str(out), "--set", "target=[1, 1, 2, 3]"
    )
    assert again.returncode == 0 and "resuming" in again.stderr  # nothing left to train

    derived = run_cli("derive", str(out), "--target", "5 of 14", "--json")
    assert derived.returncode == 0, derived.stderr
    payload = json.loads(derived.stdout)
    assert sum(len(node) for node in payload["genotype"]["levels"]["normal"]["nodes"]) == 5
    assert (out / "derive" / "5of14" / "result.json").exists() and (
        out / "derive" / "5of14" / "cells" / "cell_reduce.png"
    ).exists()


def test_bad_config_is_one_line_and_exit_code_two(tmp_path):
    done = run_cli("search", "--out", str(tmp_path / "x"), "--set", "target=[2, 2, 2]")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: target: got [2, 2, 2]; expected one count per intermediate node (4 of them)"
    ]
    assert not (tmp_path / "x").exists()  # nothing was written before the error


def test_missing_data_names_the_path_and_both_options(tmp_path):
    done = run_cli(
        "search",
        "--out",
        str(tmp_path / "x"),
        "--data-root",
        str(tmp_path / "nodata"),
        "--set",
        "data.download=false",
        "--set",
        "epochs=1",
    )
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert str(tmp_path / "nodata") in line and "train.npz" in line and "download" in line
