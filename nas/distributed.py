"""Data-parallel training across processes (ranks) with torch.distributed, started by a launcher: Ray
Train's TorchTrainer (the sweep's evaluation stage), torchrun, or anything that initialises the
default process group. Nothing here imports Ray. Without a process group every function is the
single-process identity, so the same training loop serves one process and many.

How a global batch is shared (docs/science.md §4.3): every rank draws the same permutation and the
same augmentation numbers for the whole global batch, and computes its own contiguous part of it;
each rank's loss is its summed loss times W / (images in the global batch), so DistributedDataParallel's
gradient average over the W ranks is the gradient of the global batch's mean loss, for any split
(the last batch of an epoch included). With synchronised BatchNorm, W ranks with batches b then
compute what one process computes with batch W·b.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Group:
    """This process's place among the data-parallel ranks (one rank, 0 of 1, without a process group)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Group:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def leader(self) -> bool:
        """Rank 0: the one that reads and writes checkpoints and results, and logs."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def part(self, count: int) -> slice:
        """This rank's contiguous part of `count` items; the parts' sizes differ by at most one."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def loss_scale(self, global_count: int) -> float:
        """The factor on a rank's summed loss that makes the gradient average over ranks the
        global batch's mean-loss gradient."""
        return self.world / global_count

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (in place where there are several)."""
        if self.parallel:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object), on every rank."""
        if not self.parallel:
            return value
        box = [value if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_tensor(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (the same shape on each), in rank order."""
        if not self.parallel:
            return [tensor]
        found = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(found, tensor)
        return found

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.parallel:
            return [value]
        found: list[Any] = [None] * self.world
        dist.all_gather_object(found, value)
        return found


def join_launcher_group(device: str = "auto") -> Group:
    """Under torchrun (or any launcher that sets WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT): the
    default process group of its processes, NCCL with each on its node's GPU LOCAL_RANK where CUDA is
    used, gloo otherwise. One process without such a launcher: no group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return Group.current()
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return Group.current()


def broadcast_buffers(module: nn.Module, group: Group) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: with BatchNorm per replica the
    ranks' statistics differ, and the network that is tested and saved is rank 0's."""
    if group.parallel:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


class _SyncBatchNorm(torch.autograd.Function):
    """Batch normalisation over the global batch: y = (x - μ)·σ⁻¹·w + b with μ and σ² over every rank's
    images, x̂ = (x - μ)·σ⁻¹. Backward: dx = w·σ⁻¹/M · (M·dy - Σdy - x̂·Σ(dy·x̂)), the sums over all M
    pixels of all ranks (one all-reduce each way); dw and db stay this rank's sums, as for any
    parameter under DistributedDataParallel, which averages them."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, mean: torch.Tensor, var: torch.Tensor, count: float):
        invstd = torch.rsqrt(var + eps)
        shape = (1, -1, 1, 1)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.count = count
        y = xhat
        if weight is not None:
            y = y * weight.view(shape) + bias.view(shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, weight, invstd = ctx.saved_tensors
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        local = Group.current().sum(torch.cat([dy.sum(dims), (dy * xhat).sum(dims)]).to(torch.float64))
        sum_dy, sum_dy_xhat = local.to(dy.dtype).chunk(2)
        scale = invstd if weight is None else invstd * weight
        dx = (dy - sum_dy.view(shape) / ctx.count - xhat * (sum_dy_xhat.view(shape) / ctx.count)) * scale.view(shape)
        dweight = dbias = None
        if weight is not None:
            dweight, dbias = (dy * xhat).sum(dims), dy.sum(dims)
        return dx, dweight, dbias, None, None, None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics span every rank's batch (CPU and CUDA, any backend);
    without a process group, or in eval mode, exactly nn.BatchNorm2d. On CUDA `sync_batchnorm` uses
    PyTorch's own nn.SyncBatchNorm instead, whose kernels are fused; this one serves gloo (CPUs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = Group.current()
        if not (self.training and group.parallel):
            return super().forward(x)
        channels = x.shape[1]
        with torch.no_grad():  # the statistics' gradient is in _SyncBatchNorm.backward
            # Each rank's count, mean and variance (two-pass, as BatchNorm's), gathered and combined:
            # N = Σ n_r, μ = Σ n_r μ_r / N, σ² = Σ n_r (σ_r² + (μ_r - μ)²) / N.
            var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
            count = torch.full((1,), x.numel() / channels, dtype=torch.float64, device=x.device)
            local = torch.cat([count, mean.to(torch.float64), var.to(torch.float64)])
            ranks = torch.stack(group.gather_tensor(local))
            counts, means, variances = ranks[:, :1], ranks[:, 1 : channels + 1], ranks[:, channels + 1 :]
            count = float(counts.sum())
            mean = (counts * means).sum(0) / count
            var = (counts * (variances + (means - mean) ** 2)).sum(0) / count
        if self.track_running_stats:
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():
                self.running_mean.mul_(1 - momentum).add_(mean.to(x.dtype), alpha=momentum)
                unbiased = var * (count / max(count - 1, 1))
                self.running_var.mul_(1 - momentum).add_(unbiased.to(x.dtype), alpha=momentum)
        return _SyncBatchNorm.apply(x, self.weight, self.bias, self.eps, mean.to(x.dtype), var.to(x.dtype), count)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with every BatchNorm2d synchronised across ranks (parameters and statistics kept)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = SyncBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            sync_batchnorm(child, device)
    return module
