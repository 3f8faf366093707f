"""The fast paths compute the same function as the plain DARTS-style forward."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_search_config

from nas.ops import DA2S_OPS, DARTS_OPS
from nas.search import run_search
from nas.settings import SearchConfig
from nas.space import SearchSpace, Target
from nas.supernet import Architecture, Supernet

CASES = [
    (DARTS_OPS, [2, 2, 2, 2], False, "global", torch.contiguous_format),
    (DA2S_OPS, "3 of 14", True, "global", torch.channels_last),
    (DA2S_OPS, [1, 1, 2, 3], True, "stage", torch.channels_last),
    # ops without a fused form fall back to one call per edge
    ((*DARTS_OPS, "sep_conv_7x7", "conv_7x1_1x7"), [2, 2, 2, 2], False, "cell", torch.channels_last),
]


@pytest.mark.parametrize(("ops", "target", "edge_params", "sharing", "memory_format"), CASES)
def test_fused_forward_equals_the_plain_one(ops, target, edge_params, sharing, memory_format):
    torch.manual_seed(0)
    space = SearchSpace(ops, nodes=4, cells=5, alpha_sharing=sharing)
    plain = Supernet(space, channels=6).double()
    arch = Architecture(space, Target.parse(target, space), edge_params=edge_params, alpha_init_std=1.0,
                        beta_init_noise=0.5).double()  # fmt: skip
    fused = copy.deepcopy(plain).set_fused(True).set_memory_format(memory_format)
    x = torch.randn(5, 3, 12, 12, dtype=torch.float64)  # 12 -> 6 -> 3: odd sizes after reductions
    for training in (True, False):
        plain.train(training)
        fused.train(training)
        a, b = plain(x, arch()), fused(x, arch())
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
        params_a = [*plain.parameters(), *arch.parameters()]
        params_b = [*fused.parameters(), *arch.parameters()]
        grads_a = torch.autograd.grad(a.square().sum(), params_a)
        grads_b = torch.autograd.grad(b.square().sum(), params_b)
        for ga, gb in zip(grads_a, grads_b):
            assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-12)
        for (name, sa), sb in zip(plain.state_dict().items(), fused.state_dict().values()):
            assert torch.allclose(sa.double(), sb.double(), rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("preset", ["da2s", "darts"])
def test_fast_search_follows_the_plain_alpha_trajectory(tiny_data, preset):
    """float32, CPU: the fused channels-last search ends where the plain one does, up to round-off."""
    results = {}
    for fast in (False, True):
        runtime = {"fused": fast, "channels_last": fast}
        # A large architecture lr so that alpha and beta travel far from their start in 6 steps.
        config = SearchConfig.resolve(
            preset, tiny_search_config(epochs=2, runtime=runtime, arch_optim={"lr_scale": 30.0})
        )
        results[fast] = run_search(config, data=tiny_data)
    plain, fast = results[False], results[True]
    # float32: the two paths sum in different orders, and Adam's normalised steps amplify that
    # round-off where a gradient is near zero; the trajectories agree to a small fraction of how
    # far alpha moved (in float64 the forward passes agree to 1e-12, test above).
    for level in plain.history[-1]["softmax_alpha"]:
        a = torch.tensor(plain.history[-1]["softmax_alpha"][level])
        b = torch.tensor(fast.history[-1]["softmax_alpha"][level])
        moved = (a - a.mean(dim=1, keepdim=True)).abs().max()
        assert moved > 5e-3  # alpha travelled far from its start
        assert (a - b).abs().max() < 0.05 * moved, ((a - b).abs().max(), moved)
    if "edge_weights" in plain.history[-1]:
        for level, weights in plain.history[-1]["edge_weights"].items():
            a, b = torch.tensor(weights), torch.tensor(fast.history[-1]["edge_weights"][level])
            assert (a - b).abs().max() < 0.05 * (a - 1).abs().max()
    assert plain.genotype == fast.genotype
    assert plain.history[-1]["train_loss"] == pytest.approx(fast.history[-1]["train_loss"], rel=1e-3)
