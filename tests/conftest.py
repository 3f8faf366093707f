"""Shared fixtures: tiny search settings, and data that is real CIFAR-10 where $NAS_DATA_ROOT
points at it (as .ci/run sets when ../shared/data exists) and generated images otherwise."""

from __future__ import annotations

import os

import pytest
import torch

from nas.data import DataConfig, make_search_data

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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


@pytest.fixture(scope="session")
def tiny_data():
    return make_search_data(DataConfig(**tiny_data_config()))
