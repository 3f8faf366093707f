"""A trial computes on the CPUs it reserved: its thread count, and what it sets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tuning.threads import THREAD_VARIABLES, trial_threads


@pytest.mark.parametrize(
    ("cpus", "available", "threads"),
    [(1, 2, 1), (2, 2, 2), (0.5, 2, 1), (1.5, 4, 1), (3, 2, 2), (8, 16, 8)],
)
def test_a_trial_gets_its_whole_cpus_capped_by_the_machine(cpus, available, threads):
    assert trial_threads(cpus, available) == threads


def test_no_cpus_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match=r"resources\.cpu: got 0"):
        trial_threads(0, 2)


def test_place_threads_sets_torch_and_the_environment_of_worker_processes():
    code = (
        "import os, torch\n"
        "from tuning.threads import place_threads\n"
        "n = place_threads(1)\n"
        "print(n, torch.get_num_threads(), torch.get_num_interop_threads(),"
        f" *(os.environ[v] for v in {THREAD_VARIABLES!r}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
    assert done.stdout.split() == ["1"] * (3 + len(THREAD_VARIABLES))
