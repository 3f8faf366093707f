"""C kernels for the CPU search, compiled on first use with the machine's C compiler.

PyTorch's CPU weight gradient of a depthwise convolution takes 5-10x its forward for the 5x5 and
the dilated kernels of the search space (docs/cpu.md). `depthwise_weight_grad` computes it in one
pass over the input and the output gradient (nas/cpu_kernels.c), on PyTorch's number of threads.

The C source is compiled once per machine into a cache folder ($NAS_KERNEL_CACHE, else
~/.cache/nas/kernels, else the temporary folder), under a name that hashes the source, the
compiler, its flags and the CPU, so that a folder shared between machines of different kinds keeps
one build for each. Where no C compiler works, or with NAS_NATIVE_KERNELS=0, `available()` is
False and the callers use PyTorch's own kernels: the same function, only slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _cpu_signature() -> str:
    """The CPU's model and feature flags (a build with -march=native runs only where they match)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return platform.machine() + "\n".join(dict.fromkeys(wanted))


def _cache_dirs() -> list[Path]:
    if os.environ.get("NAS_KERNEL_CACHE"):
        return [Path(os.environ["NAS_KERNEL_CACHE"])]
    return [Path.home() / ".cache" / "nas" / "kernels", Path(tempfile.gettempdir()) / "nas-kernels"]


def _build(compiler: str) -> Path | None:
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    for folder in _cache_dirs():
        target = folder / f"cpu_kernels-{key}.so"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
            os.close(fd)
        except OSError:
            continue  # not writable: the next folder
        try:
            subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCE)], check=True, capture_output=True, timeout=120)
            os.replace(partial, target)  # atomic: processes building at once all end with one whole file
            return target
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            log.warning(
                "C kernels not built (%s %s); using PyTorch's own", error, detail.decode(errors="replace")[:500]
            )
            return None
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return None


def _load() -> ctypes.CDLL | None:
    if os.environ.get("NAS_NATIVE_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        log.warning(
            "no C compiler found (cc, gcc, clang); the CPU search uses PyTorch's slower depthwise weight gradient"
        )
        return None
    path = _build(compiler)
    if path is None:
        return None
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        log.warning("C kernels not loaded (%s); using PyTorch's own", error)
        return None
    function = library.dw_weight_grad_f32
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 12
    return library


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on the first call; None where they cannot be had."""
    global _library, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _library = _load()
                _tried = True
    return _library


def available() -> bool:
    return library() is not None


def disable() -> None:
    """PyTorch's own kernels from now on in this process (as with NAS_NATIVE_KERNELS=0)."""
    global _library, _tried
    with _lock:
        _library, _tried = None, True


def _forget_pool() -> None:  # a forked child has the pool object but none of its threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


os.register_at_fork(after_in_child=_forget_pool)


def _threads(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != n:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nas-kernel"), n
    return _pool


def takes_weight_grad(x: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether `depthwise_weight_grad` takes these tensors: float32 channels-last on the CPU."""
    return (
        x.device.type == "cpu"
        and x.dtype == grad.dtype == torch.float32
        and x.dim() == grad.dim() == 4
        and x.permute(0, 2, 3, 1).is_contiguous()
        and grad.permute(0, 2, 3, 1).is_contiguous()
        and available()
    )


def depthwise_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, kernel: int, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """The (C, 1, kernel, kernel) weight gradient of a depthwise convolution with square geometry
    (stride, padding, dilation the same along both axes), for x and the output gradient `grad`
    where `takes_weight_grad(x, grad)`."""
    lib = library()
    assert lib is not None
    b, c, h, w = x.shape
    ho, wo = grad.shape[-2:]
    rows = b * ho
    n = max(1, min(torch.get_num_threads(), rows))
    partial = torch.zeros(n, kernel * kernel, c, dtype=torch.float32)
    bounds = [rows * i // n for i in range(n + 1)]
    xs, gs = x.permute(0, 2, 3, 1), grad.permute(0, 2, 3, 1)

    def run(i: int) -> int:
        return lib.dw_weight_grad_f32(
            xs.data_ptr(), gs.data_ptr(), partial[i].data_ptr(),
            b, h, w, c, ho, wo, kernel, stride, padding, dilation, bounds[i], bounds[i + 1],
        )  # fmt: skip

    codes = [run(0)] if n == 1 else list(_threads(n).map(run, range(n)))
    if any(codes):
        raise RuntimeError("dw_weight_grad_f32 failed")
    return partial.sum(0).t().reshape(c, 1, kernel, kernel)
