"""Inside a trial or an evaluation task: the accelerators it reserved, and no others.

Ray (2.60) no longer hides GPUs from a task or trial that reserved none, so a `gpu: 0` trial on
a GPU node would share a GPU with the trials that reserved it. `claim_accelerators` hides CUDA
from such a trial before torch initialises CUDA, and makes a trial that did reserve a GPU but
cannot use CUDA (no driver, a broken install, a GPU Ray only believes in) fail with that reason
instead of running on the CPU without saying so. A trial that asks for `device: cpu` explicitly
runs on the CPU whatever it reserved.
"""

from __future__ import annotations

import os

import torch

from nas.runtime import RuntimeConfig, resolve_device


class AcceleratorError(RuntimeError):
    pass


def claim_accelerators(reserved_gpus: float, device: str) -> None:
    if reserved_gpus <= 0:
        if torch.cuda.is_initialized():
            raise AcceleratorError("CUDA was initialised before the trial could hide the GPUs it did not reserve")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    if device != "cpu" and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise AcceleratorError(
            f"this trial reserved {reserved_gpus:g} GPU (Ray assigned CUDA_VISIBLE_DEVICES={visible!r}) but CUDA is "
            f"not usable on this node (torch {torch.__version__}, CUDA build {torch.version.cuda}); check the "
            "node's NVIDIA driver, or set device: cpu to run such trials on the CPU on purpose"
        )


def effective_precision(device_name: str, runtime: RuntimeConfig, workload: str = "search") -> dict[str, str]:
    """The device and the autocast dtype a search or evaluation will use, as MLflow params."""
    device = resolve_device(device_name)
    dtype = runtime.autocast_dtype(device, workload)
    return {"device_effective": str(device), "amp_dtype": str(dtype or torch.float32).removeprefix("torch.")}
