"""Whole searches: what result.json holds, resume equals no-stop, divergence is reported."""

from __future__ import annotations

import json
import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import tiny_data_config, tiny_search_config

from nas.runtime import CHECKPOINT, load_checkpoint
from nas.search import SearchDiverged, run_search
from nas.settings import SearchConfig


class Stop(Exception):
    pass


def test_short_search_writes_result_history_metrics_and_artifacts(tmp_path, tiny_data):
    config = SearchConfig.resolve("da2s", tiny_search_config(target="4 of 14", epochs=3))
    events = []
    result = run_search(config, tmp_path, data=tiny_data, callbacks=[events.append])
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["config"]["preset"] == "da2s" and saved["target"] == "4 of 14"
    # The software it came from (nas/environment.py).
    environment = saved["environment"]
    assert environment["python"] == platform.python_version() and environment["torch"] == metadata.version("torch")
    assert environment["numpy"] == metadata.version("numpy") and environment["cuda"] == (torch.version.cuda or "none")
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    head = git.stdout.strip() if git.returncode == 0 else ""
    assert environment["commit"] in ((head, head + "+dirty") if head else ("unknown",))
    assert len(saved["history"]) == 3 and [e.epoch for e in events] == [1, 2, 3]
    record = saved["history"][-1]
    for key in (
        "train_acc",
        "valid_acc",
        "train_loss",
        "valid_loss",
        "loss_terms",
        "loss_weights",
        "softmax_alpha",
        "beta",
        "edge_weights",
        "genotype",
        "skip_connect",
        "op_entropy_per_edge",
    ):
        assert key in record, key
    assert len(record["softmax_alpha"]["normal"]) == 14 and len(record["softmax_alpha"]["normal"][0]) == 7
    assert record["loss_weights"]["edge_entropy"] == pytest.approx(0.4 * 2 / 2)  # linear at epoch 3 of 3
    metrics = saved["metrics"]
    for key in (
        "supernet_acc",
        "discretized_acc",
        "drop",
        "discretized_bn_recal_acc",
        "drop_bn_recal",
        "discretized_unit_edges_acc",
        "drop_unit_edges",
    ):
        assert 0.0 <= metrics[key] <= 100.0 or key.startswith("drop"), key
    assert metrics["drop"] == pytest.approx(metrics["supernet_acc"] - metrics["discretized_acc"])
    assert sum(len(n) for n in saved["genotype"]["levels"]["normal"]["nodes"]) == 4
    assert result.metrics == metrics and events[-1].metrics["valid_acc"] == record["valid_acc"]
    for name in (
        "genotype.json",
        "cells/cell_normal.png",
        "cells/cell_reduce.png",
        "plots/alpha_normal.png",
        "plots/edge_weights_reduce.png",
        CHECKPOINT,
    ):
        assert (tmp_path / name).stat().st_size > 0, name


def test_supernet_learns_in_a_few_epochs():
    """A short real search (offline CIFAR-10 where NAS_DATA_ROOT is set): 48 steps on 1024 images."""
    config = SearchConfig.resolve(
        "darts",
        tiny_search_config(
            epochs=3,
            batch_size=64,
            target=[2, 2],
            model={"channels": 8, "cells": 3, "nodes": 2},
            data=tiny_data_config(subset=2048, resolution=16, eval_subset=512),
        ),
    )
    result = run_search(config)
    losses = [record["train_loss"] for record in result.history]
    assert losses[2] < losses[1] < losses[0]
    assert result.metrics["supernet_acc"] > 15.0  # chance is 10 %; 3 sigma above it on 512 images


@pytest.mark.parametrize("preset", ["da2s", "multilevel"])
def test_resume_from_any_epoch_equals_no_stop(tmp_path, tiny_data, preset):
    config = SearchConfig.resolve(preset, tiny_search_config(epochs=3, target=[1, 2, 2, 3], order="first"))
    straight = run_search(config, tmp_path / "straight", data=tiny_data, artifacts=False)

    def stop_after_first(event):
        if event.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        run_search(config, tmp_path / "resumed", data=tiny_data, callbacks=[stop_after_first], artifacts=False)
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT)["epoch"] == 1
    resumed = run_search(config, tmp_path / "resumed", data=tiny_data, artifacts=False)
    a = load_checkpoint(tmp_path / "straight" / CHECKPOINT)["arch"]
    b = load_checkpoint(tmp_path / "resumed" / CHECKPOINT)["arch"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.genotype == straight.genotype
    assert resumed.metrics == straight.metrics
    assert [r["valid_acc"] for r in resumed.history] == [r["valid_acc"] for r in straight.history]


def test_second_order_search_takes_the_unrolled_gradient(tiny_data):
    """A second-order search runs to its end and is not first order in disguise: from the same start,
    its architecture moves elsewhere (the virtual step's hypergradient, tests/test_architect.py)."""
    second = run_search(SearchConfig.resolve("da2s", tiny_search_config(epochs=1, order="second")), data=tiny_data)
    first = run_search(SearchConfig.resolve("da2s", tiny_search_config(epochs=1, order="first")), data=tiny_data)
    a, b = second.history[0]["softmax_alpha"]["normal"], first.history[0]["softmax_alpha"]["normal"]
    assert all(math.isfinite(v) for row in a for v in row)
    assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) > 1e-6
    assert second.history[0]["arch_ce"] != first.history[0]["arch_ce"]


def test_resume_with_another_config_is_refused(tmp_path, tiny_data):
    config = SearchConfig.resolve("darts", tiny_search_config(epochs=1))
    run_search(config, tmp_path, data=tiny_data, artifacts=False)
    other = SearchConfig.resolve("darts", tiny_search_config(epochs=1, seed=5))
    with pytest.raises(ValueError, match="seed"):
        run_search(other, tmp_path, data=tiny_data)


def test_divergence_is_reported_with_its_reason(tiny_data):
    # Adam moves alpha by about its lr per step: 1e30, cubed by the DA2S sharpening, overflows float32.
    config = SearchConfig.resolve("da2s", tiny_search_config(epochs=1, alpha={"lr": 1e30, "warmup": 0.0}))
    with pytest.raises(SearchDiverged, match=r"epoch 1: .*NaN or infinite"):
        run_search(config, data=tiny_data)


def test_arch_lr_scale_auto_follows_the_step_ratio(tiny_data):
    config = SearchConfig.resolve(
        "da2s",
        tiny_search_config(epochs=2, arch_optim={"lr_scale": "auto", "lr_scale_auto_max": 1e6}, alpha={"warmup": 0.75}),
    )
    result = run_search(config, data=tiny_data)
    steps = result.info["steps_per_epoch"]
    assert result.info["arch_lr_scale"] == pytest.approx(19550 / (2 * steps))
    assert result.history[1]["beta_lr"] == pytest.approx(3e-4 * 19550 / (2 * steps))
    assert result.history[0]["alpha_lr"] == 0.0  # alpha frozen before the warm-up epoch 2
    assert result.history[1]["alpha_lr"] == pytest.approx(1e-4 * 0 + 3e-4 * 19550 / (2 * steps))


def test_arch_lr_scale_auto_is_capped_and_says_so():
    """`auto` on a search of a few steps would give thousands (a 1-epoch search on 256 images:
    19550 / 2 steps = 9775) and diverge; it is capped at lr_scale_auto_max, with a message naming
    the field and the step counts (docs/science.md D8). A number is taken as given."""
    from nas.config import ConfigError
    from nas.settings import arch_lr_scale, lr_scale_capped_message, steps_per_epoch

    short = SearchConfig.resolve(
        "da2s",
        tiny_search_config(epochs=1, batch_size=64, arch_optim={"lr_scale": "auto"}, data=tiny_data_config(subset=256)),
    )
    steps = steps_per_epoch(short)
    assert steps == 2 and arch_lr_scale(short, steps) == 100.0
    message = lr_scale_capped_message(short, steps)
    assert "arch_optim.lr_scale" in message and "19550 reference steps / 2 architecture steps" in message
    assert "= 9775" in message and "lr_scale_auto_max = 100" in message
    paper = SearchConfig.resolve("da2s", {"arch_optim": {"lr_scale": "auto"}})
    assert arch_lr_scale(paper, steps_per_epoch(paper)) == pytest.approx(1.0, abs=1e-3)
    assert lr_scale_capped_message(paper, steps_per_epoch(paper)) is None
    table4_cpu = SearchConfig.resolve(
        "da2s", {"epochs": 10, "arch_optim": {"lr_scale": "auto"}, "data": {"subset": 3200}}
    )
    assert arch_lr_scale(table4_cpu, steps_per_epoch(table4_cpu)) == pytest.approx(78.2)  # below the cap
    explicit = SearchConfig.resolve("da2s", {"arch_optim": {"lr_scale": 5000}})
    assert arch_lr_scale(explicit, 2) == 5000.0 and lr_scale_capped_message(explicit, 2) is None
    raised = SearchConfig.resolve("da2s", {"epochs": 1, "arch_optim": {"lr_scale": "auto", "lr_scale_auto_max": 500}})
    assert arch_lr_scale(raised, 2) == 500.0
    with pytest.raises(ConfigError, match=r"arch_optim\.lr_scale_auto_max"):
        SearchConfig.resolve("da2s", {"arch_optim": {"lr_scale_auto_max": 0}})


def test_one_darts_search_derived_under_several_targets_equals_one_search_per_target(tmp_path, tiny_data):
    """DARTS trains no parameter that depends on the target, so one search derived under A, B and C
    gives each target exactly the genotype and accuracies of its own search (docs/science.md D14)."""
    targets = ["[2, 2, 2, 2]", "3 of 14", "[1, 1, 2, 3]"]
    shared = SearchConfig.resolve("darts", tiny_search_config(target=targets[0], derive_targets=targets[1:], seed=3))
    result = run_search(shared, tmp_path / "shared", data=tiny_data)
    assert [d.target for d in result.derivations] == targets[1:]
    separate = {
        t: run_search(SearchConfig.resolve("darts", tiny_search_config(target=t, seed=3)), data=tiny_data)
        for t in targets[1:]
    }
    separate[targets[0]] = result
    for derivation in result.derivations:
        own = separate[derivation.target]
        assert derivation.genotype == own.genotype, derivation.target
        assert derivation.metrics == own.metrics, derivation.target
    # Different targets give different cells here, so the equality above means something.
    assert len({str(g.genotype.to_dict()["levels"]) for g in separate.values()}) == 3
    flat = result.derived_metrics()
    assert flat["discretized_acc@3of14"] == separate["3 of 14"].metrics["discretized_acc"]
    saved = json.loads((tmp_path / "shared" / "derive" / "1-1-2-3" / "result.json").read_text())
    assert saved["metrics"] == separate["[1, 1, 2, 3]"].metrics and saved["target"] == "[1, 1, 2, 3]"
    assert (tmp_path / "shared" / "derive" / "3of14" / "cells" / "cell_normal.png").stat().st_size > 0
    stored = json.loads((tmp_path / "shared" / "result.json").read_text())
    assert [d["slug"] for d in stored["derivations"]] == ["3of14", "1-1-2-3"]

    # A finished search asked for one more target derives it from its last checkpoint, without searching again.
    more = SearchConfig.resolve(
        "darts", tiny_search_config(target=targets[0], derive_targets=[*targets[1:], "5 of 14"], seed=3)
    )
    again = run_search(more, tmp_path / "shared", data=tiny_data, artifacts=False)
    assert [r["valid_acc"] for r in again.history] == [r["valid_acc"] for r in result.history]
    assert again.derivations[-1].target == "5 of 14" and again.derivations[0].metrics == result.derivations[0].metrics


@pytest.mark.parametrize(
    ("preset", "derive", "field", "message"),
    [
        ("da2s", ["3 of 14"], "derive_targets", "edge_params: true"),
        ("darts", ["[2, 2, 2, 2]"], "derive_targets[0]", "repeats the search's target"),
        ("darts", ["3 of 14", "3/14"], "derive_targets[1]", "repeats"),
        ("darts", ["3 of 9"], "derive_targets[0]", "14 edges"),
    ],
)
def test_derive_targets_are_refused_where_they_would_mislead(preset, derive, field, message):
    from nas.config import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        SearchConfig.resolve(preset, tiny_search_config(derive_targets=derive))
    assert err.value.field == field
