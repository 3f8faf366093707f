"""The search on a CUDA GPU: the same function as on the CPU, the fast path close to float32, resume,
data that never leaves the device, and second order. Run only where CUDA is available
(`python -m pytest -m cuda`); skipped elsewhere.

Where a test compares numbers that are not bitwise equal, it writes what it measured to the JSON
file named by $NAS_CUDA_REPORT (if set) before asserting, so a run on a new GPU states its figures.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_search_config

from nas.architect import Architect
from nas.data import DataConfig, batches, make_search_data, stream_generator
from nas.ops import DA2S_OPS, DARTS_OPS
from nas.runtime import CHECKPOINT, RuntimeConfig, load_checkpoint
from nas.search import Search, run_search
from nas.settings import SearchConfig
from nas.space import SearchSpace, Target
from nas.supernet import AlphaConfig, Architecture, BetaConfig, Supernet, ieee_float32

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

sys.path.insert(0, str(Path(__file__).resolve().parent))


def report(name: str, values: dict) -> None:
    """Adds `values` under `name` to the JSON report named by $NAS_CUDA_REPORT."""
    path = os.environ.get("NAS_CUDA_REPORT")
    if not path:
        return
    data = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    data[name] = values
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cuda_data(**extra) -> dict:
    """Real CIFAR-10 where $NAS_DATA_ROOT holds it (a small copy travels to GPU machines),
    generated images otherwise."""
    root = os.environ.get("NAS_DATA_ROOT")
    real = bool(root) and os.path.isfile(os.path.join(root, "train.npz"))
    data = {"dataset": "cifar10" if real else "synthetic", "root": root if real else None, "download": False}
    data.update(extra)
    return data


@pytest.mark.parametrize(
    ("ops", "target", "edge_params"), [(DARTS_OPS, [2, 2, 2, 2], False), (DA2S_OPS, "3 of 14", True)]
)
def test_fused_equals_plain_on_cuda_in_float32(ops, target, edge_params):
    """In the layout searches use on CUDA (contiguous: in channels-last, cuDNN's weight gradients of
    the grouped 1x1 convolutions were wrong by half their norm on an H200, so a search refuses it)."""
    memory_format = RuntimeConfig().memory_format(torch.device("cuda"))
    torch.manual_seed(0)
    space = SearchSpace(ops, nodes=4, cells=5)
    plain = Supernet(space, channels=8).cuda()
    arch = Architecture(space, Target.parse(target, space), edge_params=edge_params, alpha=AlphaConfig(init_std=1.0),
                        beta=BetaConfig(init_noise=0.5)).cuda()  # fmt: skip
    fused = copy.deepcopy(plain).set_fused(True).set_memory_format(memory_format)
    x = torch.randn(16, 3, 16, 16, device="cuda")
    worst = {"logits": 0.0, "loss": 0.0, "grad": 0.0, "bn_stats": 0.0}
    with ieee_float32():
        for training in (True, False):
            plain.train(training)
            fused.train(training)
            a, b = plain(x, arch()), fused(x, arch())
            loss_a, loss_b = a.square().mean(), b.square().mean()
            worst["logits"] = max(worst["logits"], rel(b, a))
            worst["loss"] = max(worst["loss"], abs(loss_a.item() - loss_b.item()) / abs(loss_a.item()))
            grads_a = torch.autograd.grad(loss_a, [*plain.parameters(), *arch.parameters()])
            grads_b = torch.autograd.grad(loss_b, [*fused.parameters(), *arch.parameters()])
            # Over all gradients (per tensor, one whose gradient nearly cancels would dominate).
            flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
            worst["grad"] = max(worst["grad"], rel(flat(grads_b), flat(grads_a)))
            stats_a, stats_b = [], []
            for (name, sa), sb in zip(plain.state_dict().items(), fused.state_dict().values()):
                if "running_" in name:
                    stats_a.append(sa)
                    stats_b.append(sb)
                elif not sa.is_floating_point():
                    assert torch.equal(sa, sb), name
            worst["bn_stats"] = max(worst["bn_stats"], rel(flat(stats_b), flat(stats_a)))
    report(f"fused_vs_plain_float32[{'darts' if not edge_params else 'da2s'}]", worst)
    # float32 sums in another order: relative differences of a few 1e-7 per op, grown by depth.
    assert worst["logits"] < 1e-4 and worst["loss"] < 1e-4, worst
    # DA2S: beta's gradient sums the whole network's edge outputs; on the CPU in float32 it differs by
    # ~1e-3 of the gradients' norm (float64: 1e-10, tests/test_fused.py).
    assert worst["grad"] < 5e-3, worst
    assert worst["bn_stats"] < 1e-5, worst


def _search_config(preset: str, epochs: int, runtime: dict, **extra) -> SearchConfig:
    data = cuda_data(subset=4096, eval_split="holdout", eval_subset=2000)
    config = {
        "epochs": epochs,
        "batch_size": 64,
        "seed": 3,
        "model": {"channels": 8, "cells": 3},
        "data": data,
        "arch_optim": {"lr_scale": 10.0},
        "discretize": {"bn_recal_batches": 5},
        "runtime": runtime,
        "device": "cuda",
        **extra,
    }
    return SearchConfig.resolve(preset, config)


def test_resume_on_cuda_matches_an_uninterrupted_search(tmp_path):
    """A checkpoint written mid-search on the GPU resumes to the result of not stopping, as far as
    the GPU itself repeats a search (two uninterrupted runs give the baseline)."""
    config = SearchConfig.resolve("da2s", tiny_search_config(epochs=3, device="cuda"))
    straight = run_search(config)
    again = run_search(config)

    class Stop(Exception):
        pass

    def stop_after_second(event):
        if event.epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        run_search(config, tmp_path / "run", callbacks=[stop_after_second], artifacts=False)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["epoch"] == 2
    resumed = run_search(config, tmp_path / "run", artifacts=False)

    def alpha_diff(x, y):
        return max(
            (torch.tensor(x.history[-1]["softmax_alpha"][k]) - torch.tensor(y.history[-1]["softmax_alpha"][k]))
            .abs().max().item()
            for k in x.history[-1]["softmax_alpha"]
        )  # fmt: skip

    figures = {
        "repeat_alpha_diff": alpha_diff(straight, again),
        "resume_alpha_diff": alpha_diff(straight, resumed),
        "repeat_bitwise": straight.history[-1]["softmax_alpha"] == again.history[-1]["softmax_alpha"],
        "resume_bitwise": straight.history[-1]["softmax_alpha"] == resumed.history[-1]["softmax_alpha"],
        "supernet_acc": [
            straight.metrics["supernet_acc"],
            again.metrics["supernet_acc"],
            resumed.metrics["supernet_acc"],
        ],
    }
    report("resume_on_cuda", figures)
    assert len(resumed.history) == 3
    assert figures["resume_alpha_diff"] <= max(10 * figures["repeat_alpha_diff"], 1e-5), figures
    assert straight.genotype == resumed.genotype


def test_search_steps_keep_data_on_the_gpu():
    """Batches, augmentation and the step itself: no host-device copy and no synchronisation
    per step (the one copy of a pass's random numbers happens when the pass starts)."""
    config = _search_config("da2s", 1, {})
    data = make_search_data(DataConfig(**cuda_data(subset=4096, eval_split="holdout", eval_subset=256))).to("cuda")
    search = Search.build(config, 32, data.num_classes, torch.device("cuda"))
    train = batches(data.train, 64, stream_generator(3, 1, 0), augment=True)
    valid = batches(data.valid, 64, stream_generator(3, 1, 1), augment=True, cycle=True)
    weights = config.loss.weights_at(8, 8)
    for _ in range(3):
        search.step(next(train), next(valid), weights, 0.025)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(10):
                search.step(next(train), next(valid), weights, 0.025)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "Memcpy" in e.name and ("HtoD" in e.name or "DtoH" in e.name)]
    report("data_on_gpu", {"host_device_copies_in_10_steps": len(copies), "names": sorted(set(copies))})
    assert copies == []


def _second_order_setup(device: str, dtype=torch.float32):
    """A small, well-conditioned net (16x16 images, batch 16): in float32 its finite-difference
    hypergradient agrees with float64 to about 1e-6, and the unrolled correction is a quarter of it."""
    torch.manual_seed(0)
    ops = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")
    space = SearchSpace(ops, nodes=2, cells=3)
    net = Supernet(space, channels=8).to(dtype)
    arch = Architecture(space, Target.parse("3 of 5", space), edge_params=True, alpha=AlphaConfig(init_std=0.5),
                        beta=BetaConfig(init_noise=0.3), generator=torch.Generator().manual_seed(1)).to(dtype)  # fmt: skip
    net, arch = net.to(device), arch.to(device)
    w_opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(arch.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)

    def batch():
        return torch.randn(16, 3, 16, 16, generator=g).to(device, dtype), torch.randint(0, 10, (16,), generator=g).to(
            device
        )

    x, y = batch()
    F.cross_entropy(net(x, arch()), y).backward()
    w_opt.step()
    w_opt.zero_grad()
    return net, arch, w_opt, a_opt, batch(), batch()


def test_second_order_on_cuda_matches_the_cpu_float32_hypergradient():
    weights = {"op_entropy": 0.1, "edge_entropy": 0.2, "edge_count": 0.1}
    grads = {}
    for device in ("cpu", "cuda"):
        net, arch, w_opt, a_opt, train, valid = _second_order_setup(device)
        if device == "cuda":  # the fused path, under bf16 autocast, which second order must not use
            net.set_fused(True).set_autocast(torch.bfloat16)
        architect = Architect(net, arch, a_opt, SearchConfig.resolve(overrides=["order=second"]))
        second, _ = architect.second_order_grads(valid, train, weights, 0.05, w_opt)
        first, _ = architect.first_order_grads(valid, weights)
        grads[device] = (torch.cat([g.flatten() for g in second]).cpu(), torch.cat([g.flatten() for g in first]).cpu())
        if device == "cuda":  # a whole step runs, and leaves the bf16 forward on
            architect.step(valid, train, weights, 0.05, w_opt)
            assert net.autocast_dtype == torch.bfloat16
    figures = {
        "second_order_cuda_vs_cpu": rel(grads["cuda"][0], grads["cpu"][0]),
        "unrolled_correction_share": rel(grads["cpu"][1], grads["cpu"][0]),
    }
    report("second_order_cuda_vs_cpu", figures)
    assert figures["unrolled_correction_share"] > 0.05  # the second-order term matters here
    assert figures["second_order_cuda_vs_cpu"] < 1e-3, figures


def test_fast_path_keeps_the_float32_alpha_trajectory():
    """The default CUDA path (fused edges, cuDNN's TF32 convolutions) against the plain IEEE
    float32 search: 6 epochs of 32 steps (192 architecture and weight steps) on 4096 images."""
    fast = run_search(_search_config("da2s", 6, {}))
    with ieee_float32():
        exact = run_search(_search_config("da2s", 6, {"fused": False, "channels_last": False, "amp": "off"}))
    figures = {"epochs": []}
    for a_rec, b_rec in zip(exact.history, fast.history):
        diffs, moved = [], []
        for level in a_rec["softmax_alpha"]:
            a = torch.tensor(a_rec["softmax_alpha"][level])
            b = torch.tensor(b_rec["softmax_alpha"][level])
            diffs.append((a - b).abs().max().item())
            moved.append((a - 1.0 / a.shape[1]).abs().max().item())
        figures["epochs"].append(
            {
                "max_alpha_diff": max(diffs),
                "alpha_moved": max(moved),
                "supernet_acc_fp32": a_rec["valid_acc"],
                "supernet_acc_fast": b_rec["valid_acc"],
            }
        )
    figures["final_fp32"] = {k: exact.metrics[k] for k in ("supernet_acc", "discretized_acc")}
    figures["final_fast"] = {k: fast.metrics[k] for k in ("supernet_acc", "discretized_acc")}
    figures["same_genotype"] = exact.genotype == fast.genotype
    figures["seconds"] = {"fp32_plain": exact.info["seconds"], "fast": fast.info["seconds"]}
    report("fast_vs_float32_trajectory", figures)
    last = figures["epochs"][-1]
    assert last["alpha_moved"] > 0.05  # the architecture travelled
    assert last["max_alpha_diff"] < 0.5 * last["alpha_moved"], last
    assert abs(fast.metrics["supernet_acc"] - exact.metrics["supernet_acc"]) < 4.0, figures


def _graph_searches(preset: str):
    """Four copies of one search on CUDA: the default eager step, the static step run eagerly (twice:
    how far the GPU repeats itself), and the static step captured as a CUDA graph; with full
    batches (the graph's shape) to feed them."""
    from nas.graphs import GraphedStep, StaticStep

    config = _search_config(preset, 2, {"cuda_graphs": "true"}, model={"channels": 8, "cells": 5})
    data = make_search_data(config.data).to("cuda")
    searches = []
    for kind in ("eager", "static", "static_again", "graphed"):
        search = Search.build(config, 32, data.num_classes, torch.device("cuda"))
        if kind == "eager":
            search.graphed = None
        elif kind.startswith("static"):
            search.graphed = GraphedStep(StaticStep(search), capture=False)
        searches.append(search)
    assert searches[3].graphed is not None and searches[3].graphed.capture
    train = batches(data.train, 64, stream_generator(3, 1, 0), augment=True, cycle=True)
    valid = batches(data.valid, 64, stream_generator(3, 1, 1), augment=True, cycle=True)
    return config, searches, train, valid


def _flat_state(search: Search) -> torch.Tensor:
    tensors = [*search.supernet.parameters(), *search.arch.parameters()]
    tensors += [b for b in search.supernet.buffers() if b.is_floating_point()]
    return torch.cat([t.detach().flatten().double() for t in tensors])


@pytest.mark.parametrize("preset", ["darts", "da2s", "multilevel"])
def test_graphed_step_replays_the_static_step_for_50_steps(preset):
    """The captured graph against the same step run eagerly, and against the default eager step
    (torch.optim's arithmetic: round-off apart), over 50 steps with the learning rates and loss
    weights changing in place on the way."""
    import time

    config, (eager, static, again, graphed), train, valid = _graph_searches(preset)
    used = {name for name, term in config.loss.terms().items() if term.weight}
    seconds = {"eager": 0.0, "static": 0.0, "static_again": 0.0, "graphed": 0.0}
    first_step = None
    for step in range(50):
        lr = 0.025 * (1 - step / 100)
        alpha_lr = 0.0 if step < 10 else 3e-3
        weights = {name: (0.0 if step < 20 else 0.1 * (1 + step / 50)) * (name in used) for name in
                   ("op_entropy", "edge_entropy", "edge_count")}  # fmt: skip
        batch = next(train), next(valid)
        for name, search in zip(seconds, (eager, static, again, graphed)):
            search.weight_optimizer.param_groups[0]["lr"] = lr
            search.arch_optimizer.param_groups[0]["lr"] = alpha_lr
            torch.cuda.synchronize()
            started = time.perf_counter()
            search.step(*batch, weights, lr)
            torch.cuda.synchronize()
            if step >= 5:
                seconds[name] += time.perf_counter() - started
        if step == 0:  # one step from the same state
            first_step = rel(_flat_state(graphed), _flat_state(static))
    assert graphed.graphed.captures == 1 and graphed.graphed.replays == 50
    reference = _flat_state(static)
    figures = {
        "graphed_vs_static_after_1_step_rel": first_step,
        "graphed_vs_static_rel": rel(_flat_state(graphed), reference),
        "graphed_vs_static_bitwise": bool(torch.equal(_flat_state(graphed), reference)),
        "static_repeat_rel": rel(_flat_state(again), reference),
        "static_vs_eager_rel": rel(reference, _flat_state(eager)),
        "alpha_graphed_vs_eager_max_abs": max(
            (a - b).abs().max().item() for a, b in zip(graphed.arch.alphas, eager.arch.alphas)
        ),
        "step_ms": {k: 1e3 * v / 45 for k, v in seconds.items()},
        "speedup_graphed_vs_eager": seconds["eager"] / seconds["graphed"],
    }
    report(f"graphed_step_{preset}", figures)
    # The graph replays the step: as close to it as the GPU repeats the step eagerly.
    assert figures["graphed_vs_static_rel"] <= max(10 * figures["static_repeat_rel"], 1e-5), figures
    # torch.optim's arithmetic against the graph-ready one: round-off, grown over 50 steps.
    assert figures["static_vs_eager_rel"] < 1e-2, figures


def test_graphed_search_matches_the_eager_search(caplog):
    """A whole search with runtime.cuda_graphs: true (its short last batches run eagerly, the graph
    is checked before every step) against the same search eager: the same up to the round-off the
    two step implementations differ by, and the graph really captured (no fallback warning)."""
    data = cuda_data(subset=1000, eval_split="holdout", eval_subset=500)
    with caplog.at_level("WARNING", logger="nas.graphs"):
        graphed = run_search(_search_config("da2s", 3, {"cuda_graphs": "true"}, data=data))
    eager = run_search(_search_config("da2s", 3, {}, data=data))
    report("graphed_search", {
        "drop": [graphed.metrics["drop"], eager.metrics["drop"]],
        "train_loss_last": [graphed.history[-1]["train_loss"], eager.history[-1]["train_loss"]],
        "same_genotype": graphed.genotype == eager.genotype,  # may differ where two ops are near-tied
        "warnings": [r.getMessage() for r in caplog.records],
    })  # fmt: skip
    assert not [r for r in caplog.records if "capturing the search step failed" in r.getMessage()]
    assert graphed.history[-1]["train_loss"] == pytest.approx(eager.history[-1]["train_loss"], rel=2e-2)
