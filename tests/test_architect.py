"""The architecture step: first order is the plain gradient; second order matches the exact
unrolled gradient (computed by double backward) on a small model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nas.architect import Architect
from nas.losses import regularisers
from nas.space import SearchSpace, Target
from nas.supernet import AlphaConfig, Architecture, BetaConfig, Supernet

OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")
ETA, MU, WD = 0.05, 0.9, 3e-4


def setup(edge_params=True, dtype=torch.float64):
    torch.manual_seed(0)
    space = SearchSpace(OPS, nodes=2, cells=3)
    net = Supernet(space, channels=4).to(dtype)
    arch = Architecture(
        space,
        Target.parse("3 of 5", space),
        edge_params=edge_params,
        alpha=AlphaConfig(init_std=0.5),
        beta=BetaConfig(init_noise=0.3),
        generator=torch.Generator().manual_seed(1),
    ).to(dtype)
    w_opt = torch.optim.SGD(net.parameters(), lr=ETA, momentum=MU, weight_decay=WD)
    a_opt = torch.optim.Adam(arch.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    batch = lambda: (torch.randn(6, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (6,), generator=g))  # noqa: E731
    # One real weight step so that the momentum buffer exists.
    x, y = batch()
    F.cross_entropy(net(x, arch()), y).backward()
    w_opt.step()
    w_opt.zero_grad()
    net.train()
    return net, arch, w_opt, a_opt, batch(), batch()


@pytest.mark.parametrize("edge_params", [False, True])
def test_second_order_matches_the_exact_hessian_vector_product(edge_params):
    net, arch, w_opt, a_opt, train, valid = setup(edge_params)
    weights = {
        "op_entropy": 0.1,
        "edge_entropy": 0.2 if edge_params else 0.0,
        "edge_count": 0.1 if edge_params else 0.0,
    }
    # In float64 a small radius takes the finite difference inside one linear piece of the ReLU
    # and max-pool network; the reference's 0.01 / ||v|| crosses kinks of a net this small.
    architect = Architect(net, arch, a_opt, _bench().step_config("second", 1e-6, MU, WD))
    approx, _ = architect.second_order_grads(valid, train, weights, ETA, w_opt)
    exact = _bench().exact_unrolled(net, arch, w_opt, train, valid, weights, ETA, MU, WD, flat=False)
    first, _ = architect.first_order_grads(valid, weights)
    for a, e, f in zip(approx, exact, first):
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-7), (a - e).abs().max()
        # The unrolled correction is not negligible here, so the comparison means something.
        assert (e - f).abs().max() > 1e3 * (a - e).abs().max()


def test_first_order_is_the_gradient_of_the_validation_loss():
    net, arch, _w_opt, a_opt, _, valid = setup(True)
    weights = {"op_entropy": 0.3, "edge_entropy": 0.1, "edge_count": 0.2}
    grads, info = Architect(net, arch, a_opt, _bench().step_config("first")).first_order_grads(valid, weights)
    loss = F.cross_entropy(net(valid[0], arch()), valid[1]) + regularisers(arch, weights)[0]
    expected = torch.autograd.grad(loss, list(arch.parameters()))
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e)
    assert info["arch_ce"].item() == pytest.approx(F.cross_entropy(net(valid[0], arch()), valid[1]).item())


def test_second_order_step_leaves_weights_and_bn_statistics_untouched():
    net, arch, w_opt, a_opt, train, valid = setup(True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    alpha_before = arch.alphas[0].detach().clone()
    Architect(net, arch, a_opt, _bench().step_config("second", None, MU, WD)).step(
        valid, train, {"op_entropy": 0.1}, ETA, w_opt
    )
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(arch.alphas[0], alpha_before)
    assert all(p.grad is None for p in net.parameters())


def test_second_order_is_float32_under_bf16_autocast():
    """A search that runs its forward in bf16 gets the float32 second-order gradient: the finite
    differences of the Hessian-vector product are far below bf16's resolution."""
    net, arch, w_opt, a_opt, train, valid = setup(True, dtype=torch.float32)
    weights = {"op_entropy": 0.1, "edge_entropy": 0.2, "edge_count": 0.1}
    architect = Architect(net, arch, a_opt, _bench().step_config("second", None, MU, WD))
    reference, _ = architect.second_order_grads(valid, train, weights, ETA, w_opt)
    net.set_autocast(torch.bfloat16)
    mixed, _ = architect.second_order_grads(valid, train, weights, ETA, w_opt)
    assert net.autocast_dtype == torch.bfloat16  # the weight step still runs in bf16
    for a, b in zip(reference, mixed):
        assert torch.equal(a, b)

    # What the float32 block prevents: the same Hessian-vector product with the perturbed
    # forward passes in bf16 is mostly rounding noise.
    names, params = zip(*net.named_parameters())
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=g) * 1e-2 for p in params]
    with net.full_precision():
        exact = architect.hessian_vector_product(names, params, v, buffers, train)
    noisy = architect.hessian_vector_product(names, params, v, buffers, train)
    flat = lambda grads: torch.cat([x.flatten() for x in grads])  # noqa: E731
    error = (flat(noisy) - flat(exact)).norm() / flat(exact).norm()
    assert error > 0.1, error


def _bench():
    """bench/hypergradient.py, whose network and exact unrolled gradient docs/science.md §2.5 reports."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "hypergradient.py"
    spec = importlib.util.spec_from_file_location("hypergradient", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_second_order_at_the_search_radius_on_a_well_conditioned_net():
    """On the network of docs/science.md §2.5 (bench/hypergradient.py, trial 0) at the radius a search
    uses (hvp_radius 0.01, the reference's R = 0.01 / ||v||): float32 gives the float64 result, and
    a smaller radius is no closer to the exact unrolled gradient: the central difference crosses
    ReLU and max-pool kinks, which makes it noisier, not more exact."""
    bench = _bench()
    net, arch, w_opt, train, valid = bench.build(0, "darts", 2, 3, 8, 16, 16)
    weights = {"op_entropy": 0.0, "edge_entropy": 0.0, "edge_count": 0.0}
    exact = bench.exact_unrolled(net, arch, w_opt, train, valid, weights)
    error = lambda g: ((g - exact).norm() / exact.norm()).item()  # noqa: E731
    second = {}
    for dtype, radius in ((torch.float32, 1e-2), (torch.float64, 1e-2), (torch.float64, 1e-4)):
        n, a, o, (t, v) = bench._cast(net, arch, w_opt, [train, valid], dtype)
        architect = Architect(n, a, torch.optim.Adam(a.parameters()), _bench().step_config("second", radius))
        second[dtype, radius] = bench._flat(architect.second_order_grads(v, t, weights, bench.ETA, o)[0])
    single, double = second[torch.float32, 1e-2], second[torch.float64, 1e-2]
    assert (single - double).norm() / double.norm() < 1e-3  # float32 is not what limits it here
    assert error(second[torch.float64, 1e-4]) > 2 * error(double)  # the smaller radius is worse
    assert F.cosine_similarity(single, exact, dim=0).item() > 0.9
