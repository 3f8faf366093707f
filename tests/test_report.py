"""The reports' statistics (tuning/statistics.py) and their comparison of search metrics with the
retrained networks (tuning/pages.py), checked by hand."""

from __future__ import annotations

import math

import pytest

from tuning.pages import retrained_text
from tuning.report import TrialRecord, plot_drop_vs_error
from tuning.statistics import correlation_interval, correlation_p, difference, spearman


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # ranks x: 1 2 3 4, y: 2 1 4 3 -> d^2 = 1 + 1 + 1 + 1 = 4 -> 1 - 6 * 4 / (4 * 15) = 0.6
    assert math.isclose(spearman([1, 2, 3, 4], [5, 1, 9, 7]), 0.6)
    # ties share their mean rank: y ranks 1.5 1.5 3 -> Pearson of (1, 2, 3) and (1.5, 1.5, 3) = sqrt(3) / 2
    assert math.isclose(spearman([1, 2, 3], [7, 7, 9]), math.sqrt(3) / 2)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_correlation_p_by_counting_orderings():
    # n = 4, a perfect ranking: of the 24 orderings, 1 gives rho = 1 and 1 gives rho = -1 -> p = 2/24
    assert correlation_p([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(2 / 24)
    # rho = 0.6 for (2 1 4 3): orderings with |rho| >= 0.6 have sum d^2 <= 4 or >= 16: 5 + 5 of 24
    assert correlation_p([1, 2, 3, 4], [5, 1, 9, 7]) == pytest.approx(10 / 24)
    # n = 9 is sampled: a perfect ranking is rare among random orderings
    assert correlation_p(list(range(9)), list(range(9))) < 0.01


def test_correlation_interval_by_hand():
    # rho = 0.5, n = 12: z = atanh(0.5) = 0.549306, se = sqrt(1.125 / 9) = 0.353553,
    # z +- 1.959964 se = (-0.143643, 1.242255) -> tanh: (-0.142665, 0.846098)
    low, high = correlation_interval(0.5, 12)
    assert low == pytest.approx(-0.142665, abs=1e-5) and high == pytest.approx(0.846098, abs=1e-5)
    low, high = correlation_interval(-0.5, 12)  # symmetric in the sign of rho
    assert low == pytest.approx(-0.846098, abs=1e-5) and high == pytest.approx(0.142665, abs=1e-5)
    assert all(math.isnan(v) for v in correlation_interval(0.5, 3) + correlation_interval(1.0, 10))


def test_difference_of_means_interval_and_permutation_p_by_hand():
    d = difference([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert d.estimate == -3.0
    # Welch: variances 1 and 1, se = sqrt(1/3 + 1/3), df = 4; t(0.975, 4) = 2.776445
    half = 2.776445 * math.sqrt(2 / 3)
    assert d.low == pytest.approx(-3 - half, abs=1e-5) and d.high == pytest.approx(-3 + half, abs=1e-5)
    # 20 splits of the 6 values into 3 + 3; only the two extreme ones reach |3|: p = 2/20
    assert d.p == pytest.approx(0.1)
    assert math.isnan(difference([1.0], [2.0, 3.0]).low)  # no interval from one value
    assert "+1.00" in difference([2.0, 2.0], [1.0, 1.0]).describe()


def trial(method, seed, drop, errors=()):
    metrics = {"supernet_acc": 40.0, "discretized_acc": 40.0 - drop, "drop": drop, "drop_bn_recal": drop / 2}
    if errors:
        metrics["cifar10_test_error"] = sum(errors) / len(errors)
    return TrialRecord(f"r{method}{seed}", "n", method, "[2, 2, 2, 2]", str(seed), "FINISHED", metrics, {}, {},
                       {"cifar10": list(errors)} if errors else {})  # fmt: skip


def test_drop_vs_retrained_accuracy_table_and_plot(tmp_path):
    trials = [trial("da2s", 1, 2.0, (40.0, 42.0)), trial("darts", 2, 30.0, (45.0, 45.0)),
              trial("darts", 1, 31.0, (47.0, 49.0)), trial("multilevel", 1, 10.0, (42.0, 40.0)),
              trial("da2s", 2, 5.0)]  # fmt: skip
    text = retrained_text(trials)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "method" not in line]
    # retrained trials only, DARTS first, by seed; accuracy = 100 - error, per training seed and their mean
    assert [r.split(" | ")[0:2] for r in rows] == [
        ["| darts", "1"],
        ["| darts", "2"],
        ["| da2s", "1"],
        ["| multilevel", "1"],
    ]
    assert rows[0].endswith("| 31.00 | 15.50 | 53.00 | 51.00 | 52.00 |")
    # drops 31, 30, 2, 10 against mean accuracies 52, 55, 59, 59: ranks 4 3 1 2 vs 1 2 3.5 3.5
    expected = spearman([31, 30, 2, 10], [52, 55, 59, 59])
    low, high = correlation_interval(expected, 4)
    assert f"- drop: ρ = {expected:.2f} [{low:.2f}, {high:.2f}], p = " in text and "(n = 4)" in text
    # training noise: stds of (53, 51), (55, 55), (60, 58), (58, 60) -> mean of sqrt(2), 0, sqrt(2), sqrt(2)
    assert f"{3 * math.sqrt(2) / 4:.2f} on average" in text
    path = plot_drop_vs_error(trials, tmp_path / "d.png")
    assert path.stat().st_size > 1000
    assert retrained_text([trial("darts", 1, 3.0)]) == "" and plot_drop_vs_error([], tmp_path / "x.png") is None
