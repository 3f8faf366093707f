"""Entropy and edge-count terms against hand-computed values; schedules against docs/science.md §5.5."""

from __future__ import annotations

import math

import pytest
import torch

from nas.losses import LossTerm, edge_count_loss, edge_entropy, entropy, op_entropy, warmup_epoch
from nas.ops import DA2S_OPS, DARTS_OPS
from nas.settings import SearchConfig
from nas.space import SearchSpace, Target
from nas.supernet import Architecture, BetaConfig, sharpen


def make_arch(target, ops=DARTS_OPS, **kwargs) -> Architecture:
    space = SearchSpace(ops, cells=5)
    return Architecture(space, Target.parse(target, space), **kwargs)


def test_entropy_of_uniform_and_one_hot():
    assert entropy(torch.full((8,), 1 / 8)).item() == pytest.approx(math.log(8))
    assert entropy(torch.tensor([1.0, 0.0, 0.0])).item() == 0.0
    p = torch.tensor([0.5, 0.25, 0.25])
    assert entropy(p).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(4))


def test_op_entropy_sums_edges_and_levels():
    arch = make_arch([2, 2, 2, 2])
    with torch.no_grad():
        for alpha in arch.alphas:
            alpha.zero_()
        arch.alphas[1][0] = torch.tensor([0.0] * 7 + [100.0])  # one edge (nearly) one-hot
    expected = (2 * 14 - 1) * math.log(8)
    assert op_entropy(arch).item() == pytest.approx(expected, rel=1e-6)


def test_sharpening_is_the_da2s_function():
    t = torch.tensor([1.0, 0.0, -0.5, -1.0, -2.0])
    assert sharpen(t).tolist() == [2.0, 0.0, -1.0, -8.0, -64.0]


def test_edge_entropy_and_count_of_hand_set_betas():
    arch = make_arch([2, 2, 2, 2], ops=DA2S_OPS, edge_params=True)
    # Beta only for nodes 3, 4, 5 (node 2 keeps both of its 2 inputs) in 2 levels.
    assert [b.numel() for b in arch.betas] == [3, 4, 5, 3, 4, 5]
    values = [[1.5, 0.5, -1.0], [1.0, 1.0, 0.0, -2.0], [0.4] * 5]
    with torch.no_grad():
        for beta, v in zip(arch.betas, values + values):
            beta.copy_(torch.tensor(v))
    # clipped: [1, .5, -1] -> positive sum 1.5 -> (1.5-2)^2 = .25 ; [1,1,0,-2] -> 0 ; [.4]*5 -> 0
    assert edge_count_loss(arch).item() == pytest.approx(2 * (0.25 + 0.0 + 0.0))
    h = [entropy(torch.softmax(torch.tensor(v).clamp(max=1.0), 0)).item() for v in values]
    assert edge_entropy(arch).item() == pytest.approx(2 * sum(h), rel=1e-6)


def test_per_cell_target_has_one_beta_of_all_edges_starting_at_k_over_m():
    arch = make_arch("3 of 14", ops=DA2S_OPS, edge_params=True, beta=BetaConfig(init_noise=0.0))
    assert [b.numel() for b in arch.betas] == [14, 14]
    assert torch.allclose(arch.betas[0], torch.full((14,), 3 / 14))
    # 14 * softmax(uniform) = 1 on every edge at the start.
    assert torch.allclose(arch.level_edge_weights(0), torch.ones(14))


def da2s_reference(e: int) -> tuple[float, float, float]:
    """docs/science.md §5.5 at EP = 50: op entropy, edge entropy and edge count weights."""
    linear = (e - 1) / 49
    log_ = 0.0 if e < 8 else math.log(e - 7, 42)
    return 0.1 * linear * log_, 0.4 * linear, 0.1 * linear * 4 * 0.2


@pytest.mark.parametrize("epoch", [1, 7, 8, 9, 20, 50])
def test_da2s_schedule_equals_the_reference_at_50_epochs(epoch):
    loss = SearchConfig.resolve("da2s").loss
    weights = loss.weights_at(epoch, 50)
    expected = da2s_reference(epoch)
    assert weights["op_entropy"] == pytest.approx(expected[0], abs=1e-12)
    assert weights["edge_entropy"] == pytest.approx(expected[1], abs=1e-12)
    assert weights["edge_count"] == pytest.approx(expected[2], abs=1e-12)


def test_reference_values_at_named_epochs():
    loss = SearchConfig.resolve("da2s").loss
    assert loss.weights_at(1, 50) == {"op_entropy": 0.0, "edge_entropy": 0.0, "edge_count": 0.0}
    assert loss.weights_at(7, 50)["op_entropy"] == 0.0 and loss.weights_at(8, 50)["op_entropy"] == 0.0
    assert loss.weights_at(7, 50)["edge_entropy"] == pytest.approx(0.4 * 6 / 49)
    assert loss.weights_at(50, 50)["op_entropy"] == pytest.approx(0.1 * math.log(43) / math.log(42))
    assert loss.weights_at(50, 50)["edge_entropy"] == pytest.approx(0.4)


def test_schedules_keep_their_shape_in_a_short_search():
    term = LossTerm(weight=1.0, schedule="linear*log_", warmup=0.16)
    assert warmup_epoch(0.16, 50) == 8 and warmup_epoch(0.16, 10) == 2 and warmup_epoch(0.16, 12) == 2
    assert term.weight_at(2, 10) == 0.0  # log_ is 0 at the warm-up epoch
    # At the last epoch: linear = 1 and log_ = log(EP - W + 1) / log(EP - W), as log_42(43) at 50.
    assert term.weight_at(10, 10) == pytest.approx(math.log(9) / math.log(8))
    assert term.weight_at(3, 10) == pytest.approx((2 / 9) * math.log(2) / math.log(8))


@pytest.mark.parametrize(
    ("schedule", "epoch", "epochs", "expected"),
    [
        ("const", 1, 10, 1.0),
        ("linear", 6, 11, 0.5),
        ("log", 10, 10, 1.0),
        ("log", 1, 10, 0.0),
        ("exp", 10, 10, 1.0),
        ("exp", 9, 10, 0.5),  # halves every EP/10 epochs before the end
        ("step", 2, 10, 0.0),
        ("step", 3, 10, 1 / 3),
        ("step", 6, 10, 2 / 3),
        ("step", 9, 10, 1.0),
        ("sigmoid", 5, 10, 0.5),
        ("linear_", 2, 10, 0.0),  # W = round(0.2 * 10) = 2
        ("linear_", 6, 10, 0.5),
        ("const_", 2, 10, 0.0),
        ("const_", 3, 10, 1.0),
        ("log_", 2, 10, 0.0),
        ("log_", 9, 10, 1.0),
    ],
)
def test_schedule_factors(schedule, epoch, epochs, expected):
    term = LossTerm(weight=1.0, schedule=schedule, warmup=0.2)
    assert term.weight_at(epoch, epochs) == pytest.approx(expected)


def test_level_weighting_cells_gives_every_cell_type_the_pressure_of_global_sharing():
    """8 cells, stage sharing: 3 normal levels of 2 cells and 2 reduction levels of 1 cell. With
    uniform alpha and zero beta, `sum` counts 5 levels; `cells` scales them by 2/6 and 1/2, which adds
    up to the 2 levels of global sharing (and leaves global sharing itself unchanged)."""
    from nas.losses import level_scales, regularisers

    def arch_for(sharing):
        space = SearchSpace(DARTS_OPS, cells=8, alpha_sharing=sharing)
        arch = Architecture(space, Target.parse([2, 2, 2, 2], space), edge_params=True)
        with torch.no_grad():
            for p in arch.parameters():
                p.zero_()
        return arch

    stage, shared = arch_for("stage"), arch_for("global")
    assert sorted(level_scales(stage, "cells")) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2])
    assert level_scales(stage, "sum") == [1.0] * 5
    per_level = 14 * math.log(8)  # 14 edges of uniform op weights
    groups = 3  # nodes with 3, 4, 5 inputs choose 2 (the first node keeps both of its inputs)
    assert op_entropy(stage, "sum").item() == pytest.approx(5 * per_level, rel=1e-6)
    assert op_entropy(stage, "cells").item() == pytest.approx(2 * per_level, rel=1e-6)
    assert edge_count_loss(stage, "sum").item() == pytest.approx(5 * groups * 2**2)
    assert edge_count_loss(stage, "cells").item() == pytest.approx(2 * groups * 2**2)
    h = [math.log(3), math.log(4), math.log(5)]  # softmax of zeros over 3, 4, 5 inputs
    assert edge_entropy(stage, "cells").item() == pytest.approx(2 * sum(h), rel=1e-6)
    for weighting in ("sum", "cells"):  # global sharing: the reference's loss either way
        assert op_entropy(shared, weighting).item() == pytest.approx(2 * per_level, rel=1e-6)
    weights = {"op_entropy": 0.1, "edge_entropy": 0.4, "edge_count": 0.08}
    total, _ = regularisers(stage, weights, "cells")
    expected = 0.1 * 2 * per_level + 0.4 * 2 * sum(h) + 0.08 * 2 * groups * 4
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert SearchConfig.resolve().loss.level_weighting == "cells"
    assert SearchConfig.resolve(overrides=["loss.level_weighting=sum"]).loss.level_weighting == "sum"
