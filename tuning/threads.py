"""Each trial computes on the CPUs it reserved, no more.

A trial that reserved N CPUs (`resources: {cpu: N}`) runs its tensor work on N threads (intra-op
and inter-op), and the libraries its worker processes load (OpenMP, MKL, OpenBLAS) read N from the
environment. Several trials on one machine then share its cores instead of each starting a thread
per core: with two trials of one CPU on a 2-core machine each gets one core, where two trials of
two threads each would oversubscribe it (OpenMP threads that wait for each other at every op's
barrier run many times slower when they do not all have a core).
"""

from __future__ import annotations

import contextlib
import os

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def trial_threads(cpus: float, available: int | None = None) -> int:
    """Threads for a trial that reserved `cpus` CPUs: the whole CPUs of its reservation (a fraction
    of a CPU shares one thread's worth), at least 1, at most the CPUs this process may use."""
    if cpus <= 0:
        raise ValueError(f"resources.cpu: got {cpus!r}; a trial needs a positive number of CPUs")
    available = usable_cpus() if available is None else available
    return max(1, min(int(cpus), available))


def place_threads(cpus: float) -> int:
    """Sets this process's threads to `trial_threads(cpus)` (torch intra- and inter-op, and the
    environment of the processes it starts); returns the number."""
    import torch

    threads = trial_threads(cpus)
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
    # settable only before the process's first inter-op work (not again in a reused worker)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)
    return threads
