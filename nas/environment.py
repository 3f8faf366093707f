"""The software a result came from: Python, the libraries whose versions can move a number (torch with
its CUDA and cuDNN, numpy; Ray, Optuna and MLflow for a sweep) and the project's own commit.

Recorded in every search's and evaluation's `result.json` and on a sweep's MLflow runs, so that two
results that differ can be traced to a change of code or of a library (docs/science.md notes that a
reordering of float arithmetic moves single searches as much as a seed). Package versions are read
from the installed distributions' metadata: nothing is imported for it (Ray need not be installed).
"""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "torchvision", "numpy", "ray", "optuna", "mlflow")
ROOT = Path(__file__).resolve().parents[1]


def commit(root: Path = ROOT) -> str:
    """The checkout's commit, with `+dirty` when tracked files differ from it; `unknown` outside a
    git checkout (an installed package) or without git."""
    if not (root / ".git").exists():
        return "unknown"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if changed.stdout.strip() else "")


def environment() -> dict[str, str]:
    """{name: version} for Python, PACKAGES (those installed), CUDA and cuDNN (`none` without them),
    and `commit`. Computed once per process."""
    return dict(_environment())


@functools.cache
def _environment() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["cuda"] = torch.version.cuda or "none"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    found["cudnn"] = str(cudnn) if cudnn else "none"
    found["commit"] = commit()
    return found


def describe(versions: dict[str, str]) -> str:
    """One line: `python 3.11.7, torch 2.14.1 (CUDA 12.8, cuDNN 91002), ... commit 1a2b3c4d`."""
    order = ("python", *PACKAGES, "commit")
    parts = []
    for name, version in sorted(
        versions.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)
    ):
        if name in ("cuda", "cudnn"):
            continue
        if name == "torch" and versions.get("cuda", "none") != "none":
            version += f" (CUDA {versions['cuda']}, cuDNN {versions.get('cudnn', 'none')})"
        if name == "commit":
            version = version[:12] + ("+dirty" if version.endswith("+dirty") else "")
        parts.append(f"{name} {version}")
    return ", ".join(parts)
