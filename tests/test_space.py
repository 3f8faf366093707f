"""Cell layout, levels (alpha sharing) and targets."""

from __future__ import annotations

import pytest

from nas.config import ConfigError
from nas.ops import DARTS_OPS
from nas.space import SearchSpace, Target


def test_edges_are_numbered_node_by_node():
    space = SearchSpace(DARTS_OPS)
    assert space.num_edges == 14
    assert [list(space.node_edges(j)) for j in range(4)] == [[0, 1], [2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12, 13]]
    assert space.edges[9] == (3, 0) and space.edges[13] == (3, 4)


def test_reductions_sit_at_one_and_two_thirds():
    assert SearchSpace(DARTS_OPS, cells=8).reduction_cells == (2, 5)
    assert SearchSpace(DARTS_OPS, cells=20).reduction_cells == (6, 13)
    assert SearchSpace(DARTS_OPS, cells=5).reduction_cells == (1, 3)


def test_global_sharing_has_a_normal_and_a_reduce_level():
    space = SearchSpace(DARTS_OPS, cells=8, alpha_sharing="global")
    assert space.level_names == ("normal", "reduce")
    assert space.level_of_cell == (0, 0, 1, 0, 0, 1, 0, 0)


def test_stage_sharing_has_five_groups_in_the_eight_cell_supernet():
    space = SearchSpace(DARTS_OPS, cells=8, alpha_sharing="stage")
    assert space.level_names == ("normal1", "reduce1", "normal2", "reduce2", "normal3")
    assert [lvl.cells for lvl in space.levels] == [(0, 1), (2,), (3, 4), (5,), (6, 7)]
    assert space.level_of_cell == (0, 0, 1, 2, 2, 3, 4, 4)


def test_cell_sharing_gives_every_cell_its_own_level():
    space = SearchSpace(DARTS_OPS, cells=5, alpha_sharing="cell")
    assert space.level_names == ("cell0", "cell1", "cell2", "cell3", "cell4")
    assert [lvl.reduction for lvl in space.levels] == [False, True, False, True, False]


def test_per_node_target_groups_each_node():
    space = SearchSpace(DARTS_OPS)
    target = Target.parse([1, 1, 2, 3], space)
    groups = target.groups(0)
    assert [g.edges for g in groups] == [(0, 1), (2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12, 13)]
    assert [g.keep for g in groups] == [1, 1, 2, 3]
    assert target.describe() == "[1, 1, 2, 3]" and target.slug() == "1-1-2-3"


def test_per_cell_target_is_one_group_of_all_edges():
    space = SearchSpace(DARTS_OPS)
    target = Target.parse("3 of 14", space)
    (group,) = target.groups(1)
    assert group.edges == tuple(range(14)) and group.keep == 3
    assert target.slug() == "3of14" and Target.parse(target.to_spec(), space) == target


def test_targets_per_cell_type_and_per_level():
    space = SearchSpace(DARTS_OPS, alpha_sharing="stage")
    target = Target.parse({"normal": [2, 2, 2, 2], "reduce": "4 of 14", "normal3": [1, 1, 1, 1]}, space)
    described = [cell.describe(space) for cell in target.cells]
    assert described == ["[2, 2, 2, 2]", "4 of 14", "[2, 2, 2, 2]", "4 of 14", "[1, 1, 1, 1]"]
    assert Target.parse(target.to_spec(), space) == target


def test_a_level_without_a_target_is_an_error():
    space = SearchSpace(DARTS_OPS)
    with pytest.raises(ConfigError, match="give a target for the reduce cells"):
        Target.parse({"normal": [2, 2, 2, 2]}, space)
