"""C kernels for the CPU search, compiled on first use with the machine's C compiler.

PyTorch's CPU weight gradient of a depthwise convolution takes 5-10x its forward for the 5x5 and
the dilated kernels of the search space (docs/cpu.md). `depthwise_weight_grad` computes it in one
pass over the input and the output gradient (nas/cpu_kernels.c). `mixture_forward` and
`mixture_backward` are the edge mixture of a fused node (nas/mixture.py) in one pass each. Work
above `PARALLEL_WORK` multiply-adds is split over PyTorch's number of threads.

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
from collections.abc import Sequence
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
        log.warning("no C compiler found (cc, gcc, clang); the CPU search uses PyTorch's own, slower kernels")
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
    function = library.mix_forward_f32
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 6
    function = library.mix_backward_f32
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] * 5
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


# Below this many multiply-adds a kernel runs on the calling thread alone: handing a share to
# another thread costs ~0.1 ms, more than it saves on smaller work (docs/cpu.md).
PARALLEL_WORK = 4_000_000


def _thread_count(rows: int, work: int) -> int:
    return 1 if work < PARALLEL_WORK else max(1, min(torch.get_num_threads(), rows))


def _parallel(rows: int, threads: int, run) -> None:
    """run(i, first, end) for `threads` shares i of `rows`: share 0 on the calling thread, the
    others on the pool's; raises if any call returns non-zero."""
    bounds = [rows * i // threads for i in range(threads + 1)]
    others = []
    if threads > 1:
        pool = _threads(threads - 1)
        others = [pool.submit(run, i, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    codes = [run(0, bounds[0], bounds[1])] + [f.result() for f in others]
    if any(codes):
        raise RuntimeError("a C kernel failed")


def _addresses(tensors: Sequence[torch.Tensor]):
    return (ctypes.c_void_p * max(1, len(tensors)))(*[t.data_ptr() for t in tensors])


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
    n = _thread_count(rows, rows * wo * c * kernel * kernel)
    partial = torch.zeros(n, kernel * kernel, c, dtype=torch.float32)
    xs, gs = x.permute(0, 2, 3, 1), grad.permute(0, 2, 3, 1)

    def run(i: int, first: int, end: int) -> int:
        return lib.dw_weight_grad_f32(
            xs.data_ptr(), gs.data_ptr(), partial[i].data_ptr(),
            b, h, w, c, ho, wo, kernel, stride, padding, dilation, first, end,
        )  # fmt: skip

    _parallel(rows, n, run)
    return partial.sum(0).t().reshape(c, 1, kernel, kernel)


def mixture_forward(
    weights: torch.Tensor, shared: Sequence[torch.Tensor], terms: Sequence[torch.Tensor]
) -> torch.Tensor:
    """out (N, E, C) = sum_k weights[:, k, None] * shared[k][:, None, :] + sum of `terms`, for
    weights (E, K), shared (N, C) and terms (N, E, C), all dense float32 on the CPU."""
    lib = library()
    assert lib is not None
    e, k = weights.shape
    n, c = shared[0].shape if shared else (terms[0].shape[0], terms[0].shape[2])
    out = torch.empty(n, e, c, dtype=torch.float32)
    s_ptr, t_ptr = _addresses(shared), _addresses(terms)
    _parallel(
        n,
        _thread_count(n, n * e * c * (k + len(terms))),
        lambda i, first, end: lib.mix_forward_f32(
            out.data_ptr(), s_ptr, weights.data_ptr(), t_ptr, e, c, k, len(terms), first, end
        ),
    )
    return out


def mixture_backward(
    grad: torch.Tensor, weights: torch.Tensor, shared: Sequence[torch.Tensor], need_shared: bool, need_weights: bool
) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """The gradients of `mixture_forward` with respect to each shared term (N, C) and to the
    weights (E, K), given the output gradient `grad` (N, E, C), dense float32."""
    lib = library()
    assert lib is not None
    n, e, c = grad.shape
    k = weights.shape[1]
    grads = [torch.empty(n, c, dtype=torch.float32) for _ in shared] if need_shared else None
    threads = _thread_count(n, n * e * c * k)
    partial = torch.zeros(threads, e, k, c, dtype=torch.float32) if need_weights else None
    scratch = torch.empty(threads, e, k, c, dtype=torch.float32) if need_weights else None
    s_ptr = _addresses(shared)
    g_ptr = _addresses(grads) if grads is not None else None

    def run(i: int, first: int, end: int) -> int:
        return lib.mix_backward_f32(
            grad.data_ptr(), s_ptr, weights.data_ptr(), g_ptr,
            partial[i].data_ptr() if partial is not None else None,
            scratch[i].data_ptr() if scratch is not None else None,
            e, c, k, first, end,
        )  # fmt: skip

    _parallel(n, threads, run)
    return grads, (partial.sum((0, 3)) if partial is not None else None)
