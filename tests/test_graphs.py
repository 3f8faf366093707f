"""The search step written for CUDA graphs (nas/graphs.py), checked on the CPU: it follows the
eager step, reads every changing value from its device tensors, and reads nothing to the host, so
that a captured graph replays the step it was captured from. The capture itself is checked on a GPU
(tests/test_cuda.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_search_config
from torch.utils._python_dispatch import TorchDispatchMode

from nas.config import ConfigError
from nas.data import batches, make_search_data, stream_generator
from nas.graphs import GraphedStep, StaticStep
from nas.search import Search, run_search
from nas.settings import SearchConfig

# Ops whose result the host must wait for (a value read to Python, or an output whose shape depends
# on the data): a CUDA graph cannot hold them.
HOST_READS = {
    "aten::_local_scalar_dense",  # .item(), float(t), bool(t), a tensor used as a Python number
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::unique_consecutive",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::is_nonzero",
    "aten::equal",
    "aten::repeat_interleave",
    "aten::_assert_async",
}


class HostReads(TorchDispatchMode):
    """Fails on any op of HOST_READS dispatched inside the block."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_READS:
            raise AssertionError(f"{func._schema.name} reads a value to the host inside the step")
        return func(*args, **(kwargs or {}))


def _config(preset: str, **overrides) -> SearchConfig:
    base = tiny_search_config(model={"channels": 4, "cells": 5, "nodes": 4})
    flat = [f"{k}={v}" for k, v in overrides.items()]
    return SearchConfig.resolve(preset=preset, file=base, overrides=flat)


def _pair(config: SearchConfig):
    """The same search twice: eager, and with the static step (run eagerly on the CPU)."""
    data = make_search_data(config.data)
    steps = -(-len(data.train) // config.batch_size)
    eager = Search.build(config, steps, data.num_classes, torch.device("cpu"))
    static = Search.build(config, steps, data.num_classes, torch.device("cpu"))
    static.graphed = GraphedStep(StaticStep(static))
    return data, eager, static


def _sync(source: Search, target: Search) -> None:
    """Puts `source`'s weights, BN statistics, alpha/beta and optimiser states into `target`, so that
    the next step of each starts from the same state (bitwise)."""
    with torch.no_grad():
        for module in ("supernet", "arch"):
            pairs = zip(getattr(source, module).state_dict().values(), getattr(target, module).state_dict().values())
            for a, b in pairs:
                b.copy_(a)
    for name in ("weight_optimizer", "arch_optimizer"):
        src, dst = getattr(source, name), getattr(target, name)
        params = lambda opt: [p for group in opt.param_groups for p in group["params"]]  # noqa: E731
        for a, b in zip(params(src), params(dst)):
            dst.state[b] = {k: v.clone() if torch.is_tensor(v) else v for k, v in src.state.get(a, {}).items()}


def _parts(search: Search) -> dict[str, torch.Tensor]:
    """The state a step changes, by kind, as float64 vectors."""
    flat = lambda ts: torch.cat([t.detach().double().flatten() for t in ts]) if ts else torch.zeros(0)  # noqa: E731
    return {
        "weights": flat(list(search.supernet.parameters())),
        "bn statistics": flat([b for b in search.supernet.buffers() if b.is_floating_point()]),
        "alpha": flat(list(search.arch.alphas)),
        "beta": flat(list(search.arch.betas)),
    }


# The two implementations compute the same gradients from the same state and differ in the
# optimisers' float32 round-off (learning rates as float32 tensors, bias corrections in float32,
# two roundings where torch fuses a multiply-add): about 1e-5 of a step's change. The weight step
# sees alpha after its update, and that difference moved the weights' change by up to 1e-3 (on
# generated images, all of it in one element). A value baked into the step instead of the one
# written into its tensor is off by a large part of the change.
TOLERANCE = 1e-2


def _relative(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().double(), y.detach().double()
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


def _same_change(before: dict, eager: Search, static: Search, what: str) -> None:
    """Each kind of state changed by the same amount in both searches' step (from the same state)."""
    after_e, after_s = _parts(eager), _parts(static)
    for kind, start in before.items():
        change_e, change_s = after_e[kind] - start, after_s[kind] - start
        if not change_e.any():
            assert torch.equal(change_s, change_e), f"{what}: {kind} moved in one search only"
            continue
        assert _relative(change_s, change_e) < TOLERANCE, f"{what}, {kind}: {_relative(change_s, change_e):.2e}"


def _step(searches, batch, lr: float, arch_lrs, weights):
    results = []
    for search in searches:
        search.weight_optimizer.param_groups[0]["lr"] = lr
        for group, rate in zip(search.arch_optimizer.param_groups, arch_lrs):
            group["lr"] = rate
        results.append(search.step(*batch, weights, lr))
    return results


@pytest.mark.parametrize("preset", ["darts", "da2s", "multilevel"])
def test_static_step_follows_the_eager_step_and_the_values_written_into_its_tensors(preset):
    config = _config(preset)
    data, eager, static = _pair(config)
    controls = static.graphed.controls
    train = batches(data.train, config.batch_size, stream_generator(1, 1, 0), augment=True, cycle=True)
    valid = batches(data.valid, config.batch_size, stream_generator(1, 1, 1), augment=True, cycle=True)
    schedule = [
        (0.025, 0.0, {"op_entropy": 0.0, "edge_entropy": 0.0, "edge_count": 0.0}),  # alpha in warm-up
        (0.025, 0.0, {"op_entropy": 0.0, "edge_entropy": 0.0, "edge_count": 0.0}),
        (0.011, 3e-3, {"op_entropy": 0.05, "edge_entropy": 0.3, "edge_count": 0.02}),
        (0.004, 6e-3, {"op_entropy": 0.2, "edge_entropy": 0.1, "edge_count": 0.5}),
    ]
    pointers = [t.data_ptr() for t in (controls.lr, *controls.arch_lrs, *controls.loss_weights.values())]
    used = {name for name, term in config.loss.terms().items() if term.weight}  # as weights_at gives them
    alpha_moved = []
    for number, (lr, alpha_lr, weights) in enumerate(schedule):
        weights = {name: value if name in used else 0.0 for name, value in weights.items()}
        _sync(eager, static)
        before = _parts(eager)
        batch = next(train), next(valid)
        (loss_e, logits_e, info_e), (loss_s, logits_s, info_s) = _step((eager, static), batch, lr, [alpha_lr, 0.01],
                                                                       weights)  # fmt: skip
        assert _relative(loss_s, loss_e) < 1e-4 and _relative(logits_s, logits_e) < 1e-4
        assert info_s.keys() == info_e.keys()
        for key in info_e:  # computed before any update: the same ops on the same state
            assert torch.equal(info_s[key], info_e[key]), key
        _same_change(before, eager, static, f"{preset}, step {number + 1}")
        alpha_moved.append(not torch.equal(_parts(static)["alpha"], before["alpha"]))
    # The step read the new values from the same tensors, written in place: alpha did not move
    # while its rate was 0 and moved after.
    assert pointers == [t.data_ptr() for t in (controls.lr, *controls.arch_lrs, *controls.loss_weights.values())]
    assert controls.lr.item() == pytest.approx(0.004)
    assert alpha_moved == [False, False, True, True]


def test_a_loss_weight_written_in_place_changes_the_next_step():
    """Two calls of the same step function, the edge-count weight changed in place in between: the
    second call gives the eager result for the new weight, not for the one the step first saw."""
    config = _config("da2s")
    data, eager, static = _pair(config)
    old = Search.build(config, 6, data.num_classes, torch.device("cpu"))  # eager, the weight unchanged
    train = batches(data.train, config.batch_size, stream_generator(1, 1, 0), augment=True, cycle=True)
    valid = batches(data.valid, config.batch_size, stream_generator(1, 1, 1), augment=True, cycle=True)
    rates = [3e-3, 0.05]  # alpha's, beta's
    first = {"op_entropy": 0.1, "edge_entropy": 0.4, "edge_count": 0.08}
    step = static.graphed
    step.controls.set(0.025, rates, first)
    _step((eager,), (next(train), next(valid)), 0.025, rates, first)
    _sync(eager, static)
    step(next(train), next(valid))  # the first call, with the first weight
    _sync(eager, static)
    _sync(eager, old)
    step.controls.loss_weights["edge_count"].fill_(5.0)  # in place, as StepControls.set writes
    before = _parts(eager)
    batch = next(train), next(valid)
    _step((eager,), batch, 0.025, rates, {**first, "edge_count": 5.0})
    _step((old,), batch, 0.025, rates, first)
    step(*batch)
    _same_change(before, eager, static, "after the weight changed")
    # and the change for the old weight is not what it gave
    moved = _parts(static)["beta"] - before["beta"]
    assert _relative(moved, _parts(old)["beta"] - before["beta"]) > 10 * TOLERANCE


@pytest.mark.parametrize(("preset", "cuda_layout"), [("da2s", False), ("multilevel", False), ("da2s", True)])
def test_static_step_reads_nothing_to_the_host(preset, cuda_layout, monkeypatch):
    """Also with the settings a CUDA search runs (contiguous tensors, the PyTorch form of the fused
    mixture instead of the CPU's C kernels)."""
    if cuda_layout:
        monkeypatch.setattr("nas.mixture.enabled", False)
        monkeypatch.setattr("nas.depthwise.enabled", False)
    config = _config(preset, **({"runtime.channels_last": "false"} if cuda_layout else {}))
    data, eager, static = _pair(config)
    train = batches(data.train, config.batch_size, stream_generator(1, 1, 0), augment=True, cycle=True)
    valid = batches(data.valid, config.batch_size, stream_generator(1, 1, 1), augment=True, cycle=True)
    weights = config.loss.weights_at(config.epochs, config.epochs)
    static.graphed.controls.set(0.025, [3e-3, 3e-3], weights)
    # batches are drawn outside: their indexing is not part of the captured step
    pairs = [(next(train), next(valid)) for _ in range(2)]
    with HostReads():
        for train_batch, valid_batch in pairs:  # the first creates the optimisers' state
            static.graphed(train_batch, valid_batch)
    # The detector is not blind: torch.optim.Adam (not capturable) reads its step count to the host.
    with pytest.raises(AssertionError, match="_local_scalar_dense"), HostReads():
        eager.step(*pairs[0], weights, 0.025)


def test_an_epoch_with_the_static_step_matches_the_eager_epoch():
    """Search.epoch sets the cosine learning rate, alpha's warm-up rate and the scheduled loss
    weights every epoch; the static step gets them through its tensors (and runs the short last
    batch of the pass as well). Each epoch starts both searches from the same state."""
    config = _config("da2s", epochs=3, batch_size=40, **{"alpha.warmup": 0.4})
    data, eager, static = _pair(config)
    assert len(data.train) % config.batch_size != 0  # a short last batch
    for epoch in (1, 2, 3):
        _sync(eager, static)
        before = _parts(eager)
        record_e, _ = eager.epoch(data, epoch)
        record_s, _ = static.epoch(data, epoch)
        assert record_s["alpha_lr"] == record_e["alpha_lr"]
        for key in ("train_loss", "arch_ce", "valid_loss"):
            assert record_s[key] == pytest.approx(record_e[key], rel=1e-4), key
        _same_change(before, eager, static, f"epoch {epoch}")
    assert record_e["alpha_lr"] > 0.0  # the last epoch is past the warm-up


def test_a_graph_is_dropped_when_a_tensor_it_reads_was_replaced(monkeypatch):
    """The state's addresses are compared once per epoch, not per step; a replaced optimiser
    state drops the graph, an unchanged state keeps it."""
    config = _config("da2s", epochs=2)
    data, _, static = _pair(config)
    graphed = static.graphed
    graphed.step.ensure_state()
    checks = []
    check = graphed.check_state
    monkeypatch.setattr(graphed, "check_state", lambda: (checks.append(1), check()))
    static.epoch(data, 1)
    assert len(checks) == 1  # once for the epoch's many steps
    captured = object()  # stands for a captured graph (none is captured on the CPU)
    graphed.graph, graphed._pointers = captured, graphed._state_pointers()
    graphed.check_state()
    assert graphed.graph is captured
    moments = next(iter(static.arch_optimizer.state.values()))
    moments["exp_avg"] = moments["exp_avg"].clone()
    graphed.check_state()
    assert graphed.graph is None


def test_cuda_graphs_setting_is_checked():
    base = tiny_search_config()
    with pytest.raises(ConfigError, match=r"runtime\.cuda_graphs.*'auto', 'true', 'false'"):
        SearchConfig.resolve(file=base, overrides=["runtime.cuda_graphs=sometimes"])
    config = SearchConfig.resolve(file=base, overrides=["runtime.cuda_graphs=true"])
    with pytest.raises(ConfigError, match=r"runtime\.cuda_graphs.*needs a CUDA device"):
        run_search(config)
    cpu = torch.device("cpu")
    assert (
        SearchConfig.resolve(file=base, overrides=["runtime.cuda_graphs=auto"]).runtime.graphed_step(cpu, "first")
        is False
    )
    both = SearchConfig.resolve(file=base, overrides=["runtime.cuda_graphs=true", "runtime.compile=true"])
    with pytest.raises(ConfigError, match=r"runtime\.cuda_graphs"):
        both.runtime.graphed_step(torch.device("cuda"), "first")
    assert SearchConfig.resolve(file=base).runtime.cuda_graphs == "false"


def test_static_step_refuses_second_order():
    config = _config("darts", order="second")
    data = make_search_data(config.data)
    search = Search.build(config, 6, data.num_classes, torch.device("cpu"))
    with pytest.raises(ValueError, match="first order"):
        StaticStep(search)


def test_layout_gradient_difference_is_measured_on_the_network_itself():
    """The check that guards channels-last on CUDA, run on the CPU: the two layouts agree there
    (oneDNN), and a network whose gradients depend on the layout is caught."""
    from nas.genotype import resolve_genotype
    from nas.network import EvalNetwork
    from nas.runtime import LAYOUT_TOLERANCE, layout_gradient_difference

    net = EvalNetwork(resolve_genotype("darts_v2"), channels=8, layers=5, auxiliary=True)
    net.drop_path_prob = 0.2  # random, the same draws in both layouts
    same = layout_gradient_difference(net, lambda n, x: n(x)[0], (3, 32, 32), torch.device("cpu"))
    assert same < 1e-5

    class LayoutDependent(torch.nn.Module):  # scales its output by whether its input is channels-last
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            out = self.conv(x)
            return out * (2.0 if x.is_contiguous(memory_format=torch.channels_last) else 1.0)

    wrong = layout_gradient_difference(LayoutDependent(), lambda n, x: n(x), (3, 8, 8), torch.device("cpu"))
    assert wrong > LAYOUT_TOLERANCE
