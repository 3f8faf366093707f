"""Data-parallel evaluation (nas/distributed.py) in real process groups: gloo over loopback, one
process per rank, no Ray. Every image is used once per epoch across the ranks, and 2 ranks with
synchronised BatchNorm and batches of b train the same network as 1 process with batches of 2b."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nas.distributed import Group, SyncBatchNorm2d, sync_batchnorm
from nas.evaluate import EvalConfig, make_eval_data, network_for, run_evaluation
from nas.genotype import PUBLISHED

# Largest difference allowed between 2 ranks x batch b and 1 process x batch 2b after the training of
# `settings()` (3 SGD steps; the cosine schedule's rate is 0 in the last epoch). In float64 the two
# compute the same to round-off: parameters and BatchNorm statistics within 8e-15 (measured). In
# float32 a ReLU whose input lies within round-off of 0 goes one way in one run and the other way in
# the other, which changes that image's gradient: parameters within 7.8e-4 (measured; the statistics
# move more); with BatchNorm per replica, 7.1e-3 in float32 and 0.17 in float64.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-3}


def settings(**extra) -> list[str]:
    base = {"epochs": 2, "layers": 5, "channels": 8, "batch_size": 32, "device": "cpu", "drop_path": 0.0,
            "data.synthetic": True, "data.subset": 72, "data.test_subset": 40, "sync_bn": True}  # fmt: skip
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def _in_group(rank: int, world: int, rendezvous: str, job, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        job(*args)
    finally:
        dist.destroy_process_group()


def in_processes(world: int, tmp_path: Path, job, *args) -> None:
    """`job(*args)` in `world` new processes forming one gloo group."""
    mp.spawn(_in_group, args=(world, str(tmp_path / f"rendezvous-{world}"), job, args), nprocs=world, join=True)


def _record_batches(out: str, overrides: list[str]) -> None:
    group = Group.current()
    config = EvalConfig.resolve("cifar10", overrides=overrides)
    data = make_eval_data(config, torch.device("cpu"))
    epochs = {}
    for epoch in (1, 2):
        epochs[epoch] = [(images, labels, count) for images, labels, count in data.train_batches(epoch)]
    torch.save({"epochs": epochs, "test": list(data.test_batches())}, f"{out}/rank{group.rank}.pt")


def test_every_image_once_per_epoch_across_ranks(tmp_path):
    overrides = settings(**{"data.subset": 70, "batch_size": 24, "cutout": 16})  # steps of 24, 24, 22 images
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    _record_batches(str(tmp_path / "one"), overrides)  # one process, no group
    in_processes(2, tmp_path, _record_batches, str(tmp_path / "two"), overrides)
    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    for epoch in (1, 2):
        whole = one["epochs"][epoch]
        parts = [rank["epochs"][epoch] for rank in ranks]
        assert [count for _, _, count in whole] == [24, 24, 22]
        for step, (images, labels, count) in enumerate(whole):
            (a, la, ca), (b, lb, cb) = parts[0][step], parts[1][step]
            assert ca == cb == count and len(la) + len(lb) == count and abs(len(la) - len(lb)) <= 1
            # The same images, crops, flips and cutout squares as the one process's batch, split.
            assert torch.equal(torch.cat([a, b]), images) and torch.equal(torch.cat([la, lb]), labels)
    assert not torch.equal(one["epochs"][1][0][0], one["epochs"][2][0][0])  # reshuffled every epoch
    # The test set: each rank its own half, together all of it.
    test_one = torch.cat([labels for _, labels in one["test"]])
    test_two = [torch.cat([labels for _, labels in rank["test"]]) for rank in ranks]
    assert torch.equal(torch.cat(test_two), test_one) and len(test_two[0]) == len(test_two[1]) == 20


def _evaluate(out: str, overrides: list[str], dtype: torch.dtype = torch.float32) -> None:
    group = Group.current()
    torch.set_default_dtype(dtype)
    config = EvalConfig.resolve("cifar10", overrides=overrides)
    result = run_evaluation(PUBLISHED["darts_v2"], config, out)
    torch.save({"history": result.history, "info": result.info}, f"{out}/returned{group.rank}.pt")


@pytest.mark.parametrize(("sync_bn", "dtype"), [(True, torch.float64), (False, torch.float64), (True, torch.float32)])
def test_two_ranks_of_b_train_what_one_process_of_2b_trains(tmp_path, sync_bn, dtype):
    overrides = settings(sync_bn=sync_bn)
    config = EvalConfig.resolve("cifar10", overrides=overrides)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _evaluate(str(one), overrides, dtype)
    torch.set_default_dtype(torch.float32)
    in_processes(2, tmp_path, _evaluate, str(two), overrides, dtype)
    a = torch.load(one / "checkpoint.pt")
    b = torch.load(two / "checkpoint.pt")
    assert a["model"]["stem.0.weight"].dtype == dtype and len(a["history"]) == 2
    compared = (
        a["model"] if dtype == torch.float64 else dict(network_for(PUBLISHED["darts_v2"], config).named_parameters())
    )
    differences = {k: (a["model"][k] - b["model"][k]).abs().max().item() for k in compared}
    worst = max(differences.values())
    if sync_bn:
        assert worst < TOLERANCE[dtype], sorted(differences.items(), key=lambda kv: -kv[1])[:5]
        for mine, theirs in zip(a["history"], b["history"], strict=True):
            # the loss is summed in float32 (nas/evaluate.py); float32 parameters differ as stated above
            assert mine["train_loss"] == pytest.approx(
                theirs["train_loss"], rel=1e-5 if dtype == torch.float64 else 1e-4
            )
            assert mine["test_top1_error"] == pytest.approx(
                theirs["test_top1_error"], abs=1e-9 if dtype == torch.float64 else 3
            )
    else:  # BatchNorm per replica: statistics of 16 images, not 32, so the training differs
        assert worst > 1e-2
    # Only rank 0 writes (the last epoch's checkpoint and the one before it, kept in case the last
    # cannot be read); both ranks return the same history, measured on the whole test set.
    assert sorted(p.name for p in two.iterdir()) == [
        "checkpoint.prev.pt",
        "checkpoint.pt",
        "result.json",
        "returned0.pt",
        "returned1.pt",
    ]
    returned = [torch.load(two / f"returned{r}.pt") for r in range(2)]
    timeless = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in returned]
    assert timeless[0] == timeless[1]
    assert returned[0]["info"]["world_size"] == 2 and returned[0]["info"]["global_batch"] == 32
    assert len(b["torch_rng_ranks"]) == 2


def _sync_bn_gradients(out: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    group = Group.current()
    bn = SyncBatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    part = x[group.part(len(x))].clone().requires_grad_(True)
    y = bn(part)
    ((y * weight[group.part(len(x))]).sum()).backward()
    torch.save(
        {"y": y.detach(), "dx": part.grad, "dw": bn.weight.grad, "mean": bn.running_mean}, f"{out}/{group.rank}.pt"
    )


def test_synchronised_batchnorm_forward_and_backward_equal_one_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(6, 3, 4, 4, generator=g) * 3 + 1, torch.randn(6, 3, 4, 4, generator=g)
    in_processes(2, tmp_path, _sync_bn_gradients, str(tmp_path), x, weight)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    reference = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    whole = x.clone().requires_grad_(True)
    y = reference(whole)
    (y * weight).sum().backward()
    assert torch.allclose(torch.cat([p["y"] for p in parts]), y, atol=1e-5)
    assert torch.allclose(torch.cat([p["dx"] for p in parts]), whole.grad, atol=1e-5)
    # Each rank's weight gradient is its own images' share (DDP adds them up, as a mean over 2 ranks of
    # a loss scaled by 2): the two shares sum to the one process's gradient.
    assert torch.allclose(parts[0]["dw"] + parts[1]["dw"], reference.weight.grad, atol=1e-4)
    assert torch.allclose(parts[0]["mean"], reference.running_mean, atol=1e-6)


def test_sync_batchnorm_replaces_every_batchnorm_and_keeps_its_state():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
    with torch.no_grad():
        net[1][0].running_mean.fill_(0.25)
    plain = copy.deepcopy(net)
    synced = sync_batchnorm(net, torch.device("cpu"))
    assert type(synced[1][0]) is SyncBatchNorm2d and synced[1][0].running_mean[0] == 0.25
    x = torch.randn(2, 3, 5, 5)
    for mode in (True, False):  # without a process group: BatchNorm2d itself, in training and eval
        assert torch.equal(synced.train(mode)(x), plain.train(mode)(x))
    assert torch.equal(synced[1][0].running_var, plain[1][0].running_var)


@pytest.mark.parametrize(("count", "world"), [(24, 2), (22, 2), (7, 3), (2, 3), (96, 8)])
def test_parts_cover_a_batch_once(count, world):
    parts = [Group(rank, world).part(count) for rank in range(world)]
    covered = [i for part in parts for i in range(count)[part]]
    assert covered == list(range(count))
    assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
    assert sum(Group(rank, world).loss_scale(count) * (p.stop - p.start) for rank, p in enumerate(parts)) == (
        pytest.approx(world)
    )


def test_torchrun_runs_the_cli_evaluation_data_parallel(tmp_path):
    """`torchrun -m nas evaluate`: the processes join one group (gloo here); rank 0 writes and prints."""
    out = tmp_path / "out"
    sets = [f"--set={item}" for item in settings(epochs=1)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "nas", "evaluate", "darts_v2", "--out", str(out), "-q", *sets]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("test error") == 1  # rank 0 prints
    stored = json.loads((out / "result.json").read_text())
    assert stored["info"]["world_size"] == 2 and stored["info"]["sync_bn"] is True
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "result.json"]
