"""Derivation on hand-built alpha and beta under several targets; JSON; drawings."""

from __future__ import annotations

import json

import pytest
import torch

from nas.genotype import PUBLISHED, CellGenotype, Genotype, derive_genotype
from nas.ops import DA2S_OPS, DARTS_OPS
from nas.space import SearchSpace, Target
from nas.supernet import Architecture

NONE, MAX, AVG, SKIP, SEP3, SEP5, DIL3, DIL5 = range(8)


def darts_arch(target) -> Architecture:
    space = SearchSpace(DARTS_OPS, cells=5)
    arch = Architecture(space, Target.parse(target, space))
    with torch.no_grad():
        for alpha in arch.alphas:
            alpha.zero_()
    return arch


def set_edge(arch, level, edge, op, strength, none=0.0):
    with torch.no_grad():
        arch.alphas[level][edge, op] = strength
        arch.alphas[level][edge, NONE] = none


def test_darts_rule_ranks_edges_without_none_and_picks_non_none_ops():
    arch = darts_arch([2, 2, 2, 2])
    set_edge(arch, 0, 0, SEP3, 2.0)
    set_edge(arch, 0, 1, SKIP, 1.0)
    set_edge(arch, 0, 2, MAX, 0.5)
    set_edge(arch, 0, 3, DIL3, 0.1, none=9.0)  # `none` dominates: weak by the non-none rule
    set_edge(arch, 0, 4, SEP5, 1.0)
    set_edge(arch, 0, 5, SEP3, 3.0)
    set_edge(arch, 0, 8, AVG, 2.5)
    set_edge(arch, 0, 12, DIL5, 1.5)
    set_edge(arch, 0, 10, SKIP, 1.2)
    normal = derive_genotype(arch).levels["normal"]
    assert normal.nodes == (
        (("sep_conv_3x3", 0), ("skip_connect", 1)),
        (("sep_conv_5x5", 2), ("max_pool_3x3", 0)),
        (("sep_conv_3x3", 0), ("avg_pool_3x3", 3)),
        (("dil_conv_5x5", 3), ("skip_connect", 1)),
    )


def test_ties_go_to_the_lower_input():
    arch = darts_arch([1, 1, 1, 1])
    cell = derive_genotype(arch).levels["reduce"]  # all alpha zero: every edge ties
    assert [node[0][1] for node in cell.nodes] == [0, 0, 0, 0]
    assert all(op == "max_pool_3x3" for node in cell.nodes for op, _ in node)  # first non-none op


def test_imbalanced_per_node_target():
    arch = darts_arch([1, 1, 2, 3])
    for e, s in enumerate([1, 2, 3, 1, 2, 5, 4, 1, 1, 1, 2, 3, 4, 0]):
        set_edge(arch, 0, e, SEP3, float(s))
    nodes = derive_genotype(arch).levels["normal"].nodes
    assert [[i for _, i in node] for node in nodes] == [[1], [0], [0, 1], [3, 2, 1]]


def test_per_cell_target_ranks_over_the_whole_cell_and_leaves_empty_nodes():
    arch = darts_arch("3 of 14")
    set_edge(arch, 0, 13, SEP3, 3.0)
    set_edge(arch, 0, 0, SKIP, 2.0)
    set_edge(arch, 0, 12, DIL3, 2.5)
    cell = derive_genotype(arch).levels["normal"]
    assert cell.nodes == ((("skip_connect", 0),), (), (), (("sep_conv_3x3", 4), ("dil_conv_3x3", 3)))
    assert len(cell.edges()) == 3


def test_beta_decides_the_edges_of_a_da2s_search():
    space = SearchSpace(DA2S_OPS, cells=5)
    arch = Architecture(space, Target.parse([2, 2, 2, 2], space), edge_params=True)
    with torch.no_grad():
        arch.alphas[0].zero_()
        arch.alphas[0][:, 3] = torch.linspace(1, 2, 14)  # alpha would prefer the later inputs
        arch.betas[0].copy_(torch.tensor([1.0, 1.0, -3.0]))  # node 3 keeps inputs 0 and 1
        arch.betas[1].copy_(torch.tensor([1.4, -1.0, 1.2, -2.0]))  # ties at the cap: raw beta decides
        arch.betas[2].copy_(torch.tensor([-1.0, 0.9, -1.0, 0.8, -1.0]))
    nodes = derive_genotype(arch).levels["normal"].nodes
    assert [[i for _, i in node] for node in nodes] == [[0, 1], [0, 1], [0, 2], [1, 3]]
    assert all(op == "sep_conv_3x3" for node in nodes for op, _ in node)


def test_another_target_reuses_the_trained_weights():
    space = SearchSpace(DA2S_OPS, cells=5)
    arch = Architecture(space, Target.parse([2, 2, 2, 2], space), edge_params=True)
    genotype = derive_genotype(arch, Target.parse("4 of 14", space))
    assert [len(cell.edges()) for cell in genotype.levels.values()] == [4, 4]
    assert genotype.meta["target"] == "4 of 14"


def test_json_round_trip_and_darts_form(tmp_path):
    genotype = PUBLISHED["darts_v2"]
    path = tmp_path / "g.json"
    genotype.save(path)
    assert Genotype.load(path) == genotype
    darts_form = {
        "normal": [[op, i] for op, i in sum(genotype.normal.nodes, ())],
        "normal_concat": [2, 3, 4, 5],
        "reduce": [[op, i] for op, i in sum(genotype.reduce.nodes, ())],
        "reduce_concat": [2, 3, 4, 5],
    }
    assert Genotype.from_json(json.dumps(darts_form)) == genotype
    assert genotype.skip_counts() == {"normal": 2, "reduce": 3}


def test_invalid_genotype_is_reported():
    with pytest.raises(ValueError, match="node 2 can only take inputs 0 to 1"):
        CellGenotype.from_dict({"nodes": [[["sep_conv_3x3", 2]]], "concat": [2]})
    with pytest.raises(ValueError, match="unknown op"):
        CellGenotype.from_dict({"nodes": [[["conv_9x9", 0]]], "concat": [2]})


def test_cells_are_drawn_as_png(tmp_path):
    from nas.plots import draw_genotype

    paths = draw_genotype(PUBLISHED["darts_v1"], tmp_path)
    assert [p.name for p in paths] == ["cell_normal.png", "cell_reduce.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_convergence_metrics_of_hand_set_alpha_and_beta():
    from nas.metrics import convergence_metrics

    space = SearchSpace(DA2S_OPS, cells=5)
    arch = Architecture(space, Target.parse([2, 2, 2, 2], space), edge_params=True)
    with torch.no_grad():
        for alpha in arch.alphas:
            alpha.fill_(-10.0)
            alpha[:, 3] = 10.0  # one-hot on sep_conv_3x3
        for beta in arch.betas:
            beta.fill_(-30.0)
            beta[:2] = 1.0  # two kept edges per node, the rest near zero weight
    metrics = convergence_metrics(arch, derive_genotype(arch))
    assert metrics["max_op_weight"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["kept_edge_share"] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        for beta in arch.betas:
            beta.fill_(0.5)  # uniform: the two kept edges of M hold 2 / M of the weight
    shares = [2 / 3, 2 / 4, 2 / 5]
    assert convergence_metrics(arch, derive_genotype(arch))["kept_edge_share"] == pytest.approx(sum(shares) / 3)


@pytest.mark.parametrize("name", ["darts_v1", "darts_v2", "pdarts", "pc_darts_cifar"])
def test_cell_drawings_have_no_overlapping_labels(name):
    from nas.plots import cell_figure, pyplot

    for level, cell in PUBLISHED[name].levels.items():
        fig, texts = cell_figure(cell, level)
        renderer = fig.canvas.get_renderer()
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
        assert {"$c_{k-2}$", "$c_{k-1}$", "$c_{k}$", "0", "3"} <= {text for text, _ in boxes}
        assert len(boxes) == 7 + len(list(cell.edges()))  # every node and every op is labelled
        for i, (a_text, a) in enumerate(boxes):
            for b_text, b in boxes[i + 1 :]:
                assert not a.overlaps(b), f"{name} {level}: {a_text!r} overlaps {b_text!r}"
        pyplot().close(fig)
