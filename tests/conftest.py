"""Shared fixtures: tiny search settings, and data that is real CIFAR-10 where $NAS_DATA_ROOT
points at it (as .ci/run sets when ../shared/data exists) and generated images otherwise."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from nas.data import DataConfig, make_search_data

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tool(name: str) -> str:
    """A command installed beside this Python (`ray`, `mlflow`): the tests run with the virtual
    environment's Python whether or not it is activated (on PATH)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def real_data_root() -> str | None:
    root = os.environ.get("NAS_DATA_ROOT")
    if root and os.path.isfile(os.path.join(root, "train.npz")):
        return root
    return None


def tiny_data_config(**extra) -> dict:
    """A search subset small enough for seconds-long searches."""
    data = {
        "dataset": "cifar10" if real_data_root() else "synthetic",
        "root": real_data_root(),
        "download": False,
        "subset": 192,
        "eval_split": "holdout",
        "eval_subset": 128,
        "resolution": 8,
    }
    data.update(extra)
    return data


def tiny_search_config(**overrides) -> dict:
    """A whole search in a few seconds on 2 CPU cores (4 channels, 3 cells, 8x8 images)."""
    config = {
        "epochs": 2,
        "batch_size": 32,
        "seed": 1,
        "model": {"channels": 4, "cells": 3, "nodes": 4},
        "data": tiny_data_config(),
        "discretize": {"bn_recal_batches": 2},
        "device": "cpu",
    }
    for key, value in overrides.items():
        config[key] = value
    return config


def tiny_sweep_config(name: str, **changes) -> dict:
    """A sweep of tiny searches (DARTS or DA²S, one after the other) with `changes` on top."""
    search = tiny_search_config()
    search.pop("device")  # trials choose their own
    sweep = {
        "name": name,
        "search": search,
        "space": {"preset": {"choices": ["darts", "da2s"]}},
        "sampler": {"type": "grid"},
        "concurrency": 1,
    }
    sweep.update(changes)
    return sweep


def _each_process(entry: str) -> dict[int, bytes]:
    """pid -> the content of /proc/PID/`entry`, for every process still there to read it."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                found[int(proc.name)] = (proc / entry).read_bytes()
            except OSError:
                continue
    return found


def descendants(root: int) -> set[int]:
    """`root` and every process below it (Ray's GCS, raylet, agents and workers below a driver)."""
    parents = {pid: int(stat.rsplit(b")", 1)[1].split()[1]) for pid, stat in _each_process("stat").items()}
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = {child for child, parent in parents.items() if parent == pid} - tree
        tree |= children
        frontier.extend(children)
    return tree


def processes_named(*prefixes: str) -> set[int]:
    """Processes on this machine whose command line starts with one of `prefixes` (Ray names its
    workers `ray::ImplicitFunc`, its agents `ray::DashboardAgent` and `ray::RuntimeEnvAgent`)."""
    starts = tuple(p.encode() for p in prefixes)
    return {pid for pid, cmdline in _each_process("cmdline").items() if cmdline.startswith(starts)}


@pytest.fixture(scope="session")
def tiny_data():
    return make_search_data(DataConfig(**tiny_data_config()))
