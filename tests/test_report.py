"""The sweep report's comparison of search metrics with the retrained networks (tuning/report.py)."""

from __future__ import annotations

import math

from tuning.report import TrialRecord, drop_vs_error_text, plot_drop_vs_error, spearman


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # ranks x: 1 2 3 4, y: 2 1 4 3 -> d^2 = 1 + 1 + 1 + 1 = 4 -> 1 - 6 * 4 / (4 * 15) = 0.6
    assert math.isclose(spearman([1, 2, 3, 4], [5, 1, 9, 7]), 0.6)
    # ties share their mean rank: y ranks 1.5 1.5 3 -> Pearson of (1, 2, 3) and (1.5, 1.5, 3) = sqrt(3) / 2
    assert math.isclose(spearman([1, 2, 3], [7, 7, 9]), math.sqrt(3) / 2)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def trial(method, seed, drop, error=None):
    metrics = {"supernet_acc": 40.0, "discretized_acc": 40.0 - drop, "drop": drop, "drop_bn_recal": drop / 2}
    if error is not None:
        metrics["cifar10_test_error"] = error
    return TrialRecord(f"r{method}{seed}", "n", method, "[2, 2, 2, 2]", str(seed), "FINISHED", metrics, {})


def test_drop_vs_retrained_accuracy_table_and_plot(tmp_path):
    trials = [trial("da2s", 1, 2.0, 40.0), trial("darts", 2, 30.0, 45.0), trial("darts", 1, 31.0, 47.0),
              trial("multilevel", 1, 10.0, 42.0), trial("da2s", 2, 5.0)]  # fmt: skip
    text = drop_vs_error_text(trials)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "method" not in line]
    # retrained trials only, DARTS first, by seed; accuracy = 100 - error
    assert [r.split(" | ")[0:3] for r in rows] == [["| darts", "[2, 2, 2, 2]", "1"], ["| darts", "[2, 2, 2, 2]", "2"],
                                                    ["| da2s", "[2, 2, 2, 2]", "1"], ["| multilevel", "[2, 2, 2, 2]", "1"]]  # fmt: skip
    assert rows[0].endswith("| 31.00 | 15.50 | 53.00 |")
    # drops 31, 30, 2, 10 against accuracies 53, 55, 60, 58: ranks 4 3 1 2 vs 1 2 4 3 -> -1
    assert "of drop with retrained test accuracy: -1.00 (n = 4)" in text
    path = plot_drop_vs_error(trials, tmp_path / "d.png")
    assert path.stat().st_size > 1000
    assert drop_vs_error_text([trial("darts", 1, 3.0)]) == "" and plot_drop_vs_error([], tmp_path / "x.png") is None
