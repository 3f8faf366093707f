"""The fast paths compute the same function as the plain DARTS-style forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_search_config

from nas.genotype import PUBLISHED
from nas.network import EvalNetwork
from nas.ops import DA2S_OPS, DARTS_OPS, FactorizedReduce
from nas.search import run_search
from nas.settings import SearchConfig
from nas.space import SearchSpace, Target
from nas.supernet import AlphaConfig, Architecture, BetaConfig, Supernet

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
    arch = Architecture(space, Target.parse(target, space), edge_params=edge_params, alpha=AlphaConfig(init_std=1.0),
                        beta=BetaConfig(init_noise=0.5)).double()  # fmt: skip
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


class _MemoryOrders(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op whose same-shaped tensors (operands and results, 4-D and up, none broadcast)
    lie in memory in different orders: such an op runs about 10x slower on the CPU than one whose
    tensors agree."""

    def __init__(self):
        super().__init__()
        self.mixed = []

    @staticmethod
    def _order(t: torch.Tensor) -> tuple[int, ...]:
        dims = [d for d in range(t.dim()) if t.shape[d] > 1]
        return tuple(sorted(dims, key=lambda d: -t.stride(d)))

    # Ops that exist to give a tensor another shape or memory order.
    LAYOUT_OPS = (
        "view",
        "permute",
        "clone",
        "copy",
        "expand",
        "slice",
        "select",
        "squeeze",
        "unbind",
        "split",
        "alias",
    )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(name in str(func) for name in self.LAYOUT_OPS):
            return out
        results = out if isinstance(out, (tuple, list)) else [out]
        tensors = [t for t in [*args, *(kwargs or {}).values(), *results] if isinstance(t, torch.Tensor)]
        by_shape = {}
        for t in tensors:
            if t.dim() >= 4 and all(s > 1 or st != 0 for s, st in zip(t.shape, t.stride())) and 0 not in t.stride():
                by_shape.setdefault(tuple(t.shape), set()).add(self._order(t))
        for shape, orders in by_shape.items():
            if len(orders) > 1:
                self.mixed.append((str(func), shape, sorted(orders)))
        return out


@pytest.mark.parametrize("ops", [DARTS_OPS, DA2S_OPS])
def test_channels_last_path_keeps_one_memory_order(ops):
    """Forward, weight gradients and architecture gradients of the fused channels-last supernet:
    no op meets two memory orders (the edge mixture, the reduction cells' subsampling and shifted
    inputs, and the gradient handed back by the global pooling all stay channels-last)."""
    torch.manual_seed(0)
    space = SearchSpace(ops, nodes=4, cells=5)
    net = Supernet(space, channels=4).set_fused(True).set_memory_format(torch.channels_last)
    arch = Architecture(space, Target.parse("3 of 14", space), edge_params=True, alpha=AlphaConfig(init_std=1.0))
    x = torch.randn(3, 3, 16, 16)
    orders = _MemoryOrders()
    with orders:
        loss = net(x, arch()).square().sum()
        grads = torch.autograd.grad(loss, [*net.parameters(), *arch.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[-2:])
    assert not orders.mixed, orders.mixed[:5]


def test_the_memory_order_detector_catches_a_mixed_order():
    """What the two tests around it rely on: an op that meets one shape in two memory orders is
    reported, in a plain sum and in a backward pass handed a gradient in the other order."""
    orders = _MemoryOrders()
    last = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    with orders:
        last + torch.randn(2, 3, 4, 5)
    assert orders.mixed and orders.mixed[0][1] == (2, 3, 4, 5)
    # a channels-last ReLU handed a contiguous gradient (what a wrong-order op downstream does)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    orders = _MemoryOrders()
    with orders:
        torch.autograd.grad(torch.relu(x), x, grad_outputs=torch.ones(2, 3, 8, 8))
    assert [op for op, _, _ in orders.mixed] == ["aten.threshold_backward.default"]


def test_evaluation_network_keeps_one_memory_order():
    """The same for a derived network in training (channels-last, as the CPU retrains it), with
    its auxiliary head and drop-path."""
    torch.manual_seed(0)
    net = EvalNetwork(PUBLISHED["darts_v2"], channels=4, layers=5, auxiliary=True).to(memory_format=torch.channels_last)
    net.drop_path_prob = 0.2
    x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    orders = _MemoryOrders()
    with orders:
        logits, aux = net(x)
        torch.autograd.grad(logits.square().sum() + aux.square().sum(), list(net.parameters()))
    assert not orders.mixed, orders.mixed[:5]


@pytest.mark.parametrize("size", [16, 15])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_factorized_reduce_is_the_strided_pair_of_convs(size, memory_format):
    """FactorizedReduce picks the even and the odd pixels and runs stride-1 convs: the same values
    and gradients as the DARTS form (stride-2 convs, the second on x shifted by one pixel and
    zero-padded), odd sizes included; in float32 channels-last at an odd batch, where PyTorch's own
    strided 1x1 conv backward corrupts the heap."""
    torch.manual_seed(0)
    op = FactorizedReduce(8, 16, affine=False)
    x = torch.randn(3, 8, size, size, dtype=torch.float64)

    def strided(x, w1, w2):
        x = F.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return F.batch_norm(
            torch.cat([F.conv2d(x, w1, stride=2), F.conv2d(shifted, w2, stride=2)], 1), None, None, training=True
        )

    w1, w2 = op.conv_1.weight.detach().double().requires_grad_(), op.conv_2.weight.detach().double().requires_grad_()
    xd = x.clone().requires_grad_()
    want = strided(xd, w1, w2)
    probe = torch.randn(want.shape, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * probe).sum(), [xd, w1, w2])
    for dtype in (torch.float64, torch.float32):
        net = copy.deepcopy(op).to(dtype).to(memory_format=memory_format)
        xi = x.to(dtype).contiguous(memory_format=memory_format).requires_grad_()
        got = net(xi)
        assert got.shape == (3, 16, (size + 1) // 2, (size + 1) // 2)
        grads = torch.autograd.grad((got * probe.to(dtype)).sum(), [xi, net.conv_1.weight, net.conv_2.weight])
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert torch.allclose(got.double(), want, atol=tol, rtol=tol)
        for g, w in zip(grads, want_grads):
            assert torch.allclose(g.double(), w, atol=tol * w.abs().max(), rtol=tol)
