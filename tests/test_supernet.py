"""Supernet shapes, parameter separation, gradients, edge weights and the beta swap flag."""

from __future__ import annotations

import torch

from nas.ops import DA2S_OPS, DARTS_OPS, OPS, build_op
from nas.space import SearchSpace, Target
from nas.supernet import Architecture, BetaConfig, Supernet


def build(ops=DARTS_OPS, sharing="global", target=(2, 2, 2, 2), edge_params=False, cells=5, channels=4, **kw):
    space = SearchSpace(ops, nodes=4, cells=cells, alpha_sharing=sharing)
    torch.manual_seed(0)
    net = Supernet(space, channels=channels)
    arch = Architecture(
        space,
        Target.parse(list(target) if isinstance(target, tuple) else target, space),
        edge_params=edge_params,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    return space, net, arch


def test_every_op_keeps_channels_and_halves_with_stride_two():
    x = torch.randn(2, 8, 16, 16)
    for name in OPS:
        assert build_op(name, 8, 1, affine=False)(x).shape == (2, 8, 16, 16), name
        assert build_op(name, 8, 2, affine=False)(x).shape == (2, 8, 8, 8), name


def test_search_pooling_has_a_non_affine_bn_after_it():
    op = build_op("max_pool_3x3", 8, 1, affine=False, search=True)
    assert isinstance(op[1], torch.nn.BatchNorm2d) and not op[1].affine


def test_supernet_output_and_channel_bookkeeping():
    _space, net, arch = build(cells=8, channels=16)
    logits = net(torch.randn(2, 3, 32, 32), arch())
    assert logits.shape == (2, 10)
    assert [cell.reduction for cell in net.cells] == [False, False, True, False, False, True, False, False]
    assert net.classifier.in_features == 4 * 64
    assert all(not m.affine for m in net.cells.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_architecture_parameters_are_separate_from_weights():
    _, net, arch = build(ops=DA2S_OPS, edge_params=True)
    weight_ids = {id(p) for p in net.parameters()}
    assert not weight_ids & {id(p) for p in arch.parameters()}
    assert [tuple(a.shape) for a in arch.alphas] == [(14, 7), (14, 7)]


def test_gradients_reach_alpha_and_beta_of_every_level():
    _, net, arch = build(ops=DA2S_OPS, sharing="stage", edge_params=True)
    loss = net(torch.randn(4, 3, 16, 16), arch()).logsumexp(1).mean()
    loss.backward()
    assert len(arch.alphas) == 5
    for p in arch.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_edge_weights_start_at_one_and_follow_beta():
    _, _, arch = build(ops=DA2S_OPS, edge_params=True, beta=BetaConfig(init_noise=0.0))
    w = arch.level_edge_weights(0)
    assert torch.allclose(w, torch.ones(14))
    with torch.no_grad():
        arch.betas[2].copy_(torch.tensor([2.0, 1.0, -10.0, -10.0, -10.0]))  # node 5: beta clipped at 1
    w = arch.level_edge_weights(0)
    # 5 * softmax([1, 1, -10, -10, -10]) on edges 9..13
    expected = 5 * torch.softmax(torch.tensor([1.0, 1.0, -10.0, -10.0, -10.0]), 0)
    assert torch.allclose(w[9:], expected)
    assert torch.allclose(w[:9], torch.ones(9))  # other nodes untouched (node 2 has no beta)


def test_beta_swap_flag_reproduces_the_released_code():
    _, _, arch = build(ops=DA2S_OPS, edge_params=True, beta=BetaConfig(swap_bug=True))
    with torch.no_grad():
        arch.betas[0].copy_(torch.tensor([5.0, -5.0, -5.0]))
    normal_used, reduce_used = arch.edge_weights()
    assert torch.equal(normal_used, arch.level_edge_weights(1))
    assert torch.equal(reduce_used, arch.level_edge_weights(0))
    fixed = build(ops=DA2S_OPS, edge_params=True)[2]
    with torch.no_grad():
        fixed.betas[0].copy_(torch.tensor([5.0, -5.0, -5.0]))
    assert torch.equal(fixed.edge_weights()[0], fixed.level_edge_weights(0))
