"""What a search and an evaluation share at run time: how they compute (RuntimeConfig, the device),
the per-epoch event their callbacks receive, the weight learning-rate schedule, the checkpoint and
result files of an output directory and when a run may resume from them, and phase timing.

`nas.search` and `nas.evaluate` are siblings that both build on this module; neither imports the
other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .config import ConfigError, flatten_mapping


class Diverged(RuntimeError):
    """A loss or a parameter became NaN or infinite (a search's or an evaluation's): the run's result,
    not a fault to retry (it would diverge again)."""


log = logging.getLogger(__name__)


# The files of a run's output directory: the last epoch's state, and the finished run's result.
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # the epoch before, kept in case the last cannot be read
RESULT = "result.json"


@dataclass
class RuntimeConfig:
    """How a search computes, not what: every setting gives the same result up to floating-point
    round-off (tests/test_fused.py), so a search may resume under other ones. The defaults are the
    fastest measured on each device (docs/gpu.md)."""

    # The fused forward (nas/fused.py) instead of the DARTS-style loop over every op of every edge.
    fused: bool = True
    # channels-last tensors. Unset: on the CPU (oneDNN runs the grouped convolutions faster), not on
    # CUDA, where cuDNN's weight gradients of the fused search's grouped 1x1 convolutions came out
    # wrong in channels-last (docs/gpu.md); a search on CUDA refuses it.
    channels_last: bool | None = None
    # bf16 autocast for the forward. `auto`: float32 for the search everywhere (on an H200 its step
    # is bound by kernel launches, and bf16's casts made it no faster); for the evaluation networks,
    # bf16 on GPUs that compute it natively (compute capability >= 8.0: A100, A10G, L4, H100, ...)
    # and float32 on the CPU and older GPUs (T4, V100), where bf16 is emulated and fp16 would need
    # loss scaling. `bf16` forces it anywhere; `off` never.
    amp: Literal["auto", "off", "bf16"] = "auto"
    # torch.compile the supernet (in place; CUDA mainly: on CPU it needs a C++ compiler and minutes).
    compile: bool = False
    # The first-order search step captured as one CUDA graph and replayed (nas/graphs.py, docs/gpu.md).
    # `auto`: on CUDA, eager elsewhere; `true`: refuses a device other than CUDA; both fall back to
    # eager with one warning if the capture fails. `false` (the default until a GPU run has shown the
    # graphed step equal to the eager one): eager. Second order always runs eagerly.
    cuda_graphs: Literal["auto", "true", "false"] = "false"

    def graphed_step(self, device: torch.device, order: str) -> bool:
        """Whether the search step is captured as a CUDA graph on `device`."""
        if self.cuda_graphs == "false":
            return False
        if self.cuda_graphs == "true" and device.type != "cuda":
            raise ConfigError(
                "runtime.cuda_graphs",
                "true",
                f"needs a CUDA device and this search runs on {device.type}; set auto or false",
            )
        if self.compile:
            if self.cuda_graphs == "true":
                raise ConfigError(
                    "runtime.cuda_graphs",
                    "true",
                    "and runtime.compile: true both take over the step; set one of them false (or cuda_graphs: auto)",
                )
            return False
        if device.type != "cuda":
            return False
        if order != "first":
            log.info("runtime.cuda_graphs: second order runs eagerly (nas/graphs.py says why)")
            return False
        return True

    def autocast_dtype(self, device: torch.device, workload: Literal["search", "evaluate"] = "search"):
        """The autocast dtype on `device`; None: float32, no autocast."""
        if self.amp == "bf16":
            return torch.bfloat16
        if (
            self.amp == "auto"
            and workload == "evaluate"
            and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (8, 0)
        ):
            return torch.bfloat16
        return None

    def memory_format(
        self, device: torch.device, workload: Literal["search", "evaluate"] = "search"
    ) -> torch.memory_format:
        """channels-last where asked for, and when unset on the CPU only."""
        if self.channels_last is None:
            return torch.channels_last if device.type == "cpu" else torch.contiguous_format
        if self.channels_last and device.type == "cuda" and self.fused and workload == "search":
            raise ConfigError(
                "runtime.channels_last",
                True,
                "gives wrong convolution gradients in the fused search on CUDA (cuDNN, grouped 1x1 "
                "convolutions in channels-last); leave it unset (contiguous on CUDA) or set false",
            )
        return torch.channels_last if self.channels_last else torch.contiguous_format


# Above this relative difference, a channels-last network's gradients are not the contiguous ones.
LAYOUT_TOLERANCE = 1e-3


def layout_gradient_difference(
    model: torch.nn.Module,
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    image_shape: Sequence[int],
    device: torch.device,
    batch: int = 2,
) -> float:
    """||g_cl - g|| / ||g|| over the parameters' gradients of copies of `model` on `device` in the
    channels-last and the contiguous layout, on one random batch, in IEEE float32 (no TF32), with
    the global random state restored afterwards. On an H200 (PyTorch 2.11) cuDNN gave the fused
    search's gradients 49 % off in channels-last (docs/gpu.md); this measures the network at hand on
    the GPU at hand before it trains in that layout."""
    import copy

    from .supernet import ieee_float32

    images = torch.randn((batch, *image_shape), generator=torch.Generator().manual_seed(0)).to(device)
    flat = []
    for layout in (torch.contiguous_format, torch.channels_last):
        net = copy.deepcopy(model).to(device).to(memory_format=layout).train()
        params = [p for p in net.parameters() if p.requires_grad]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), ieee_float32():
            torch.manual_seed(0)  # the same drop-path draws in both layouts
            out = forward(net, images.contiguous(memory_format=layout))
            grads = torch.autograd.grad(out.float().square().mean(), params, allow_unused=True)
        flat.append(torch.cat([g.flatten() for g in grads if g is not None]).double())
    return ((flat[1] - flat[0]).norm() / flat[0].norm().clamp_min(1e-30)).item()


def check_layout(
    model: torch.nn.Module,
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    image_shape: Sequence[int],
    device: torch.device,
) -> None:
    """Refuses `runtime.channels_last: true` on CUDA where the network's gradients in that layout
    differ from the contiguous ones (`layout_gradient_difference`); silent on the CPU."""
    if device.type != "cuda":
        return
    difference = layout_gradient_difference(model, forward, image_shape, device)
    log.info("runtime.channels_last: gradients %.1e off the contiguous layout's on %s", difference, device)
    if not difference <= LAYOUT_TOLERANCE:
        raise ConfigError(
            "runtime.channels_last",
            True,
            f"gives this network's gradients {difference:.1e} (relative) off the contiguous layout's on this GPU "
            f"(torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}); leave it unset or set false",
        )


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "no CUDA device is visible here; use cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@dataclass
class EpochEvent:
    """What a callback receives after every epoch. `metrics` are flat scalars for trackers."""

    epoch: int
    epochs: int
    record: dict[str, Any]
    metrics: dict[str, float]
    checkpoint_path: Path | None


def cosine_lr(epoch: int, epochs: int, lr: float, lr_min: float) -> float:
    """The weight learning rate of 1-based `epoch`: the reference steps its cosine schedule at the
    start of every epoch, so epoch 1 already uses the value after one step and the last lr_min."""
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


# ----------------------------------------------------------------------- checkpoints and resuming
def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint, read without executing code (`weights_only=True`)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def save_atomic(state: Mapping[str, Any], path: Path, keep: Path | None = None) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint. With
    `keep`, the file it replaces is kept there (the previous good checkpoint)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(state), tmp)
    if keep is not None and path.exists():
        os.replace(path, keep)
    os.replace(tmp, path)


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any], free: Collection[str]) -> list[str]:
    """The dotted settings, sorted, in which two configs (as nested dicts) differ, leaving out
    those in `free`: settings that change where or how fast a run computes, not what."""
    old = {k: v for k, v in flatten_mapping(saved).items() if k not in free}
    new = {k: v for k, v in flatten_mapping(current).items() if k not in free}
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def check_resumable(
    saved: Mapping[str, Any], current: Mapping[str, Any], free: Collection[str], path: Path, what: str = "search"
) -> None:
    """Raises a ConfigError naming the first setting in which the run stored at `path` differs from
    `current` (settings in `free` may differ)."""
    changed = changed_settings(saved, current, free)
    if changed:
        key = changed[0]
        old = flatten_mapping(saved).get(key)
        raise ConfigError(
            key,
            flatten_mapping(current).get(key),
            f"{path} holds a {what} with {key}={old!r}; resume it with the same config or use another output directory",
        )


@dataclass
class RunDirectory:
    """A run's output directory, kept the same way by a search and an evaluation: `result.json` once
    the run is finished, a checkpoint after every epoch (what a new start resumes from, refused when
    its settings differ from this run's outside `free`), and the epoch's callbacks after the
    checkpoint. `path` None: no files (no directory given, or a data-parallel rank but the first)."""

    path: Path | None
    settings: dict[str, Any]
    free: Collection[str]
    what: str  # "search" or "evaluation", for the messages

    def stored_result(self) -> dict[str, Any] | None:
        """result.json of an earlier start of this run (it may have ended before its last epoch); one
        that cannot be read is said and left for the last checkpoint to measure again."""
        path = None if self.path is None else self.path / RESULT
        if path is None or not path.exists():
            return None
        try:
            stored = json.loads(path.read_text())
            saved_config = stored["config"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("%s cannot be read (%s); the result is measured again from the last checkpoint", path, err)
            return None
        check_resumable(saved_config, self.settings, self.free, path, self.what)
        return stored

    def saved_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The last epoch's checkpoint of an earlier start of this run; if it cannot be read, the one
        before it (kept beside it as checkpoint.prev.pt), said so; if neither, an error naming the
        file (a run never starts over from scratch on a broken checkpoint without being told)."""
        if self.path is None:
            return None
        broken = []
        for path in (self.path / CHECKPOINT, self.path / PREVIOUS_CHECKPOINT):
            if not path.exists():
                continue
            try:
                state = load_checkpoint(path, map_location)
            except Exception as err:  # truncated, not a torch file: torch's many ways of saying it
                broken.append((path, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
                continue
            check_resumable(state["config"], self.settings, self.free, path, self.what)
            if broken:
                log.warning("%s cannot be read (%s); resuming from %s (epoch %d)", *broken[0], path, state["epoch"])
            return state
        if broken:
            path, reason = broken[0]
            raise ConfigError(
                "checkpoint", str(path), f"cannot be read ({reason}) and no readable earlier checkpoint is kept "
                "beside it; remove it (and checkpoint.prev.pt) to start this run over",
            )  # fmt: skip
        return None

    def end_epoch(
        self,
        event: EpochEvent,
        state: Callable[[], Mapping[str, Any]],
        callbacks: Sequence[Callable[[EpochEvent], None]],
        clock: PhaseClock | None = None,
    ) -> None:
        """The epoch's checkpoint (`state()`, written atomically; the previous one kept as
        checkpoint.prev.pt), then the callbacks with its path."""
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            event.checkpoint_path = self.path / CHECKPOINT
            save_atomic(state(), event.checkpoint_path, keep=self.path / PREVIOUS_CHECKPOINT)
            if clock is not None:
                clock.lap("checkpoint")
        for callback in callbacks:
            callback(event)
        if callbacks and clock is not None:
            clock.lap("callbacks")

    def write_result(self, result: Mapping[str, Any]) -> None:
        if self.path is not None:
            (self.path / RESULT).write_text(json.dumps(result, indent=2) + "\n")


# ----------------------------------------------------------------------- timing and progress
class PhaseClock:
    """Seconds per named phase of an epoch, lap by lap."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar for a person watching, or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
