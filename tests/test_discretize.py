"""The discretized network is the supernet with one-hot ops and zero-weight dropped edges."""

from __future__ import annotations

import torch

from nas.data import ImageSet
from nas.discretize import DiscretizedNetwork
from nas.genotype import derive_genotype
from nas.metrics import discretization_metrics
from nas.ops import DA2S_OPS, DARTS_OPS
from nas.space import SearchSpace, Target
from nas.supernet import AlphaConfig, Architecture, ArchWeights, BetaConfig, Supernet


def trained_like(ops, target, edge_params, sharing="global"):
    torch.manual_seed(0)
    space = SearchSpace(ops, nodes=4, cells=5, alpha_sharing=sharing)
    net = Supernet(space, channels=4)
    arch = Architecture(
        space,
        Target.parse(target, space),
        edge_params=edge_params,
        alpha=AlphaConfig(init_std=1.0),
        beta=BetaConfig(init_noise=0.5),
        generator=torch.Generator().manual_seed(3),
    )
    net.train()
    with torch.no_grad():  # give the BN running statistics something to remember
        for _ in range(3):
            net(torch.randn(16, 3, 16, 16), arch())
    net.eval()
    return space, net, arch


def one_hot_weights(space, genotype, edge_weights):
    """Op weights exactly one-hot on the chosen ops, edge weights zero on dropped edges."""
    ops, edges = [], []
    for level, cell in enumerate(genotype.levels.values()):
        op_w = torch.zeros(space.num_edges, space.num_ops)
        edge_w = torch.zeros(space.num_edges)
        for j, node in enumerate(cell.nodes):
            for op, source in node:
                e = space.node_edges(j).start + source
                op_w[e, space.ops.index(op)] = 1.0
                edge_w[e] = 1.0 if edge_weights[level] is None else edge_weights[level][e]
        ops.append(op_w)
        edges.append(edge_w)
    return ArchWeights(ops, edges)


def check_equivalence(ops, target, edge_params, sharing="global"):
    space, net, arch = trained_like(ops, target, edge_params, sharing)
    genotype = derive_genotype(arch)
    with torch.no_grad():
        trained = [None if w is None else w.detach() for w in arch.edge_weights()]
        x = torch.randn(8, 3, 16, 16)
        expected = net(x, one_hot_weights(space, genotype, trained))
        got = DiscretizedNetwork(net, genotype, trained)(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    return genotype


def test_darts_genotype_under_the_standard_target():
    check_equivalence(DARTS_OPS, [2, 2, 2, 2], edge_params=False)


def test_da2s_genotype_keeps_its_trained_edge_weights():
    check_equivalence(DA2S_OPS, [1, 1, 2, 3], edge_params=True)


def test_per_cell_target_with_empty_nodes_and_stage_levels():
    genotype = check_equivalence(DA2S_OPS, "2 of 14", edge_params=True, sharing="stage")
    assert any(not node for cell in genotype.levels.values() for node in cell.nodes)


def test_metrics_restore_the_supernets_bn_statistics():
    _space, net, arch = trained_like(DA2S_OPS, [2, 2, 2, 2], True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    images = ImageSet(
        torch.randint(0, 256, (64, 3, 16, 16), generator=g, dtype=torch.uint8), torch.randint(0, 10, (64,), generator=g)
    )
    metrics = discretization_metrics(net, arch, derive_genotype(arch), images, images, recal_batches=2, batch_size=16)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert metrics["drop"] == metrics["supernet_acc"] - metrics["discretized_acc"]
    assert set(metrics) >= {"discretized_bn_recal_acc", "discretized_unit_edges_acc", "drop_unit_edges_bn_recal"}
