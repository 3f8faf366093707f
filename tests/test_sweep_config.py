"""Sweep YAML: the shipped sweeps validate; every bad input names its field before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from nas.config import ConfigError
from tuning.config import GRID_POINT, SweepConfig, method_label
from tuning.space import SpaceSampler, make_sampler

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "name": "t",
    # 1,000 images search, and accuracies are measured on held-out training images (not the test set)
    "search": {"epochs": 2, "model": {"channels": 4, "cells": 3}, "data": {"subset": 1000}},
    "space": {"preset": {"choices": ["darts", "da2s"]}},
    "num_samples": 2,
}


def sweep_error(**changes) -> ConfigError:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in changes.items():
        data[key] = value
    with pytest.raises(ConfigError) as info:
        SweepConfig.from_dict(data)
    return info.value


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_validate(path):
    sweep = SweepConfig.load(path)
    assert sweep.num_samples >= 1 and sweep.space


def test_table4_is_the_full_grid_of_decisions_3():
    sweep = SweepConfig.load(ROOT / "sweeps" / "table4.yaml")
    grid = sweep.grid()
    targets = ["[2, 2, 2, 2]", "3 of 14", "4 of 14", "5 of 14", "6 of 14", "[1, 1, 2, 3]"]
    assert grid["preset"] == ["darts", "da2s"] and grid["target"] == targets
    assert sweep.resolve_trial({"preset": "da2s", "target": "3 of 14"}).resolved_target().describe() == "3 of 14"
    # Every (method, target, seed) of the grid, DARTS's six targets from one search per seed
    # (docs/science.md D14): 3 DARTS and 18 DA2S searches.
    points = sweep.grid_points()
    assert sweep.num_samples == len(points) == 3 + 6 * 3 and sweep.sampler_type() == "grid"
    covered = sorted((p["preset"], t, p["seed"]) for p in points for t in [p["target"], *p.get("derive_targets", [])])
    assert covered == sorted((m, t, s) for m in grid["preset"] for t in targets for s in grid["seed"])
    darts = [p for p in points if p["preset"] == "darts"]
    assert all(p["target"] == targets[0] and p["derive_targets"] == targets[1:] for p in darts)
    assert not any("derive_targets" in p for p in points if p["preset"] == "da2s")


def test_grid_with_when_and_fold_enumerates_each_trial_once():
    sweep = SweepConfig.from_dict(
        {
            **BASE,
            "sampler": {"type": "grid"},
            "num_samples": None,
            "space": {
                "preset": {"choices": ["darts", "da2s", "multilevel"]},
                "loss.op_entropy.weight": {"choices": [0.05, 0.1], "when": {"preset": "multilevel"}},
                "target": {"choices": ["[2, 2, 2, 2]", "4 of 14"], "fold": True},
            },
        }
    )
    assert sweep.grid_points() == [
        {"preset": "darts", "target": "[2, 2, 2, 2]", "derive_targets": ["4 of 14"]},
        {"preset": "da2s", "target": "[2, 2, 2, 2]"},
        {"preset": "da2s", "target": "4 of 14"},
        {
            "preset": "multilevel",
            "loss.op_entropy.weight": 0.05,
            "target": "[2, 2, 2, 2]",
            "derive_targets": ["4 of 14"],
        },
        {
            "preset": "multilevel",
            "loss.op_entropy.weight": 0.1,
            "target": "[2, 2, 2, 2]",
            "derive_targets": ["4 of 14"],
        },
    ]
    assert sweep.num_samples == 5
    # Optuna's grid sampler walks the points by index; each trial gets its point's fields.
    study = optuna.create_study(sampler=make_sampler(sweep))
    space = SpaceSampler.for_sweep(sweep)
    seen = []
    for _ in range(5):
        trial = study.ask()
        point = space(trial)
        seen.append(point)
        assert trial.params == {GRID_POINT: sweep.grid_points().index(point)}
        config = sweep.resolve_trial({**trial.params, **point})
        assert config.preset == point["preset"] and list(config.derive_targets) == point.get("derive_targets", [])
        if len(seen) < 5:  # the grid sampler stops its study at the last point's result
            study.tell(trial, 0.0)
    assert sorted(map(str, seen)) == sorted(map(str, sweep.grid_points()))


@pytest.mark.parametrize(
    ("space", "sampler", "field", "fragment"),
    [
        ({"seed": {"choices": [1, 2], "fold": True}}, "grid", "space.seed.fold", "only the categorical `target`"),
        ({"target": {"choices": ["3 of 14", "4 of 14"], "fold": True}}, "tpe", "space.target.fold", "grid sampler"),
        (
            {
                "target": {"choices": ["3 of 14", "4 of 14"], "fold": True},
                "seed": {"choices": [1, 2], "when": {"target": "3 of 14"}},
            },
            "grid",
            "space.seed.when",
            "cannot depend on target",
        ),
        ({"target": {"choices": ["3 of 14", "3 of 9"], "fold": True}}, "grid", "space.target.choices[1]", "14 edges"),
    ],
)
def test_bad_fold_names_the_field(space, sampler, field, fragment):
    data = {**BASE, "sampler": {"type": sampler}, "num_samples": None if sampler == "grid" else 2, "space": space}
    with pytest.raises(ConfigError) as info:
        SweepConfig.from_dict(data)
    assert info.value.field == field, str(info.value)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"epochs": 3}, "epochs", "unknown key; allowed: name, description, search, space"),
        ({"num_samples": "four"}, "num_samples", "expected an integer"),
        ({"num_samples": 0}, "num_samples", "must be >= 1"),
        (
            {"space": {"ops": {"choices": ["darts", ["max_pool_3x3", "conv_9x9"]]}}},
            "space.ops.choices[1]",
            "must be a number",
        ),
        ({"space": {"target": {"choices": ["[2, 2, 2, 2]", "7 of 12"]}}}, "space.target.choices[1]", "has 14 edges"),
        (
            {"space": {"target": {"choices": ["[2, 2, 2, 2]", "[3, 3, 3, 3]"]}}},
            "space.target.choices[1]",
            "node 0 has 2 inputs",
        ),
        (
            {"space": {"loss.op_entropy.weight": {"low": -1.0, "high": 1.0}}},
            "space.loss.op_entropy.weight",
            "must be >= 0",
        ),
        (
            {"space": {"loss.op_entropy.wieght": {"low": 0.1, "high": 1.0}}},
            "space.loss.op_entropy.wieght",
            "did you mean 'weight'",
        ),
        ({"space": {"alpha.lr": {"low": 0.0, "high": 1.0, "log": True}}}, "space.alpha.lr.low", "must be > 0 with log"),
        ({"space": {"seed": {"type": "int", "low": 5, "high": 1}}}, "space.seed.low", "must not exceed high"),
        (
            {"space": {"seed": {"type": "integer", "low": 1, "high": 5}}},
            "space.seed.type",
            "'float', 'int', 'categorical'",
        ),
        ({"search": {"model": {"channels": 7}}}, "search.model.channels", "must be even"),
        ({"search": {"loss": {"edge_count": {"weight": 0.1}}}}, "search.loss.edge_count.weight", "needs edge_params"),
        ({"objective": {"metric": "accuracy"}}, "objective.metric", "discretized_acc"),
        ({"objective": {"metric": "drop", "mode": "minimise"}}, "objective.mode", "'max', 'min'"),
        ({"sampler": {"type": "cmaes"}}, "sampler.type", "'tpe', 'nsga2', 'grid', 'random'"),
        ({"sampler": {"type": "nsga2"}}, "sampler.type", "NSGA-II is for several objectives"),
        ({"sampler": {"type": "grid"}, "num_samples": 3}, "num_samples", "the grid has 2 points"),
        (
            {"sampler": {"type": "grid"}, "space": {"alpha.lr": {"low": 0.1, "high": 1.0}}},
            "space.alpha.lr",
            "categorical",
        ),
        ({"scheduler": {"type": "asha", "metric": "params"}}, "scheduler.metric", "per-epoch metric"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type", "'none', 'asha'"),
        ({"resources": {"gpu": 1.5}}, "resources.gpu", "fraction of one GPU"),
        ({"resources": {"cpu": 0}}, "resources.cpu", "must be > 0"),
        ({"concurrency": 0}, "concurrency", "must be >= 1"),
        ({"name": "a/b"}, "name", "no slashes"),
        ({"method_label": "{alpha_shared}"}, "method_label", "names no SearchConfig field"),
        ({"space": {}}, "space", "needs at least one parameter"),
        ({"evaluate": {"resources": {"workers": 0}}}, "evaluate.resources.workers", "must be >= 1"),
        ({"evaluate": {"resources": {"workers": 4, "gpu": 0.5}}}, "evaluate.resources.gpu", "one GPU"),
        ({"evaluate": {"resources": {"workers": 4, "gpu": 2}}}, "evaluate.resources.gpu", "more workers"),
        (
            {"evaluate": {"resources": {"workers": 4}, "settings": {"batch_size": 3}}},
            "evaluate.settings.batch_size",
            "shared by the 4 data-parallel workers",
        ),
        ({"evaluate": {"settings": {"lr_scaling": "sqrt"}}}, "evaluate.settings.lr_scaling", "'none', 'linear'"),
        ({"evaluate": {"settings": {"warmup_epochs": -1}}}, "evaluate.settings.warmup_epochs", "must be >= 0"),
    ],
)
def test_bad_sweep_names_the_field(changes, field, fragment):
    err = sweep_error(**changes)
    assert err.field == field, str(err)
    assert fragment in str(err)


def test_grid_size_is_the_default_number_of_trials():
    data = {
        **BASE,
        "sampler": {"type": "grid"},
        "space": {"preset": {"choices": ["darts", "da2s"]}, "seed": {"choices": [1, 2, 3]}},
    }
    data.pop("num_samples")
    assert SweepConfig.from_dict(data).num_samples == 6


def test_a_space_that_chooses_epochs_gives_each_trial_its_own_length():
    # ASHA's last rung is the longest trial's; each trial's progress line counts its own epochs
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["space"]["epochs"] = {"choices": [3, 5], "when": {"preset": "da2s"}}
    sweep = SweepConfig.from_dict(data)
    assert sweep.max_epochs() == 5
    assert sweep.resolve_trial({"preset": "darts"}).epochs == 2
    assert sweep.resolve_trial({"preset": "da2s", "epochs": 5}).epochs == 5
    data["space"]["epochs"] = {"low": 1, "high": 7, "type": "int"}
    assert SweepConfig.from_dict(data).max_epochs() == 7
    assert SweepConfig.from_dict(BASE).max_epochs() == 2


def test_conditional_parameters_follow_their_condition():
    sweep = SweepConfig.from_dict(
        {
            **BASE,
            "space": {
                "preset": {"choices": ["darts", "da2s"]},
                "loss.edge_entropy.weight": {"low": 0.1, "high": 1.0, "log": True, "when": {"preset": "da2s"}},
                "loss.op_entropy.weight": {"low": 0.0, "high": 0.2, "when": {"model.channels": 4}},
            },
            "num_samples": 20,
        }
    )
    study = optuna.create_study(sampler=make_sampler(sweep))
    space = SpaceSampler(sweep.space, sweep.search)
    for _ in range(20):
        trial = study.ask()
        space(trial)
        params = trial.params
        assert ("loss.edge_entropy.weight" in params) == (params["preset"] == "da2s")
        assert "loss.op_entropy.weight" in params  # the fixed model.channels is 4
        sweep.resolve_trial(params)  # every sampled point is a valid search
        study.tell(trial, 0.0)


def test_method_label_formats_dotted_fields():
    config = SweepConfig.from_dict(BASE).resolve_trial({"alpha_sharing": "stage"}).to_dict()
    assert method_label("{alpha_sharing}, H={loss.op_entropy.weight}", config) == "stage, H=0.0"
    assert method_label(None, {**config, "preset": "da2s"}) == "da2s"


def test_bad_sweep_file_stops_run_py_before_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "space": {"target": {"choices": ["3 of 14", "[2, 2]"]}}}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "run.py"), str(bad)], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: space.target.choices[1]: got '[2, 2]'; expected one count per intermediate node (4 of them)"
    )
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def sweep_with(tmp_path, **changes) -> SweepConfig:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["search"]["data"] = {"dataset": "synthetic"}
    data["storage"] = str(tmp_path / "ray")
    data["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path / 'm' / 'mlflow.db'}"}
    data.update(changes)
    return SweepConfig.from_dict(data)


def test_unwritable_storage_is_refused_before_ray(tmp_path):
    from tuning.sweep import run_sweep

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as info:
        run_sweep(sweep_with(tmp_path, storage=str(blocker / "ray")), base_dir=tmp_path)
    assert info.value.field == "storage" and "cannot be written" in str(info.value)
    assert not (tmp_path / "m").exists() and not (tmp_path / "ray").exists()  # nothing was created


def test_gpus_this_machine_lacks_are_refused_before_ray(tmp_path):
    import torch

    from tuning.sweep import run_sweep

    asked = torch.cuda.device_count() + 1
    with pytest.raises(ConfigError) as info:
        run_sweep(sweep_with(tmp_path, resources={"cpu": 1, "gpu": asked}), base_dir=tmp_path)
    assert info.value.field == "resources.gpu" and "use gpu: 0" in str(info.value)
    assert not (tmp_path / "m").exists() and not (tmp_path / "ray").exists()


def test_missing_data_is_refused_before_ray(tmp_path):
    from nas.data import DataNotFoundError
    from tuning.sweep import run_sweep

    sweep = sweep_with(tmp_path)
    sweep.search["data"] = {"root": str(tmp_path / "no-cifar"), "download": False, "subset": 1000}
    with pytest.raises(DataNotFoundError, match="no-cifar"):
        run_sweep(sweep, base_dir=tmp_path)
    assert not (tmp_path / "m").exists() and not (tmp_path / "ray").exists()


def test_credentials_never_reach_params():
    from tuning.tracking import params_of, redact

    assert redact("http://alice:s3cret@mlflow.internal:5000") == "http://***@mlflow.internal:5000"
    params = params_of({"mlflow": {"tracking_uri": "https://bob:hunter2@host/mlflow"}, "storage": "s3://k:v@bucket/x"})
    assert "hunter2" not in json.dumps(params) and "k:v@" not in json.dumps(params)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({}, "objective.metric"),  # TPE proposes by discretized accuracy, measured on the test set
        ({"sampler": {"type": "random"}, "scheduler": {"type": "asha", "metric": "valid_acc"}}, "scheduler.metric"),
        ({"sampler": {"type": "grid"}, "num_samples": None, "evaluate": {"top": 1}}, "evaluate.by"),
        (
            {"objective": [{"metric": "params", "mode": "min"}, {"metric": "drop", "mode": "min"}]},
            "objective[1].metric",
        ),
    ],
)
def test_selection_on_test_images_is_refused_unless_asked_for(changes, field):
    """At full data the search measures on the CIFAR-10 test set (eval_split auto -> test): a sweep
    that would rank trials by it is refused, naming the field, and accepted when it says so."""
    full_data = {"epochs": 2, "model": {"channels": 4, "cells": 3}}
    err = sweep_error(search=full_data, **changes)
    assert err.field == field and "test set" in str(err) and "select_on_test_set: true" in str(err)
    data = {**yaml.safe_load(yaml.safe_dump(BASE)), "search": full_data, **changes, "select_on_test_set": True}
    assert SweepConfig.from_dict(data).base_search().data.eval_split == "test"


def test_sweeps_that_do_not_select_on_test_images_are_accepted():
    full = {**BASE, "search": {"epochs": 2, "model": {"channels": 4, "cells": 3}}}
    grid = SweepConfig.from_dict({**full, "sampler": {"type": "grid"}, "num_samples": None})  # no ranking
    assert grid.selections() == [] and grid.base_search().data.eval_split == "test"
    by_size = SweepConfig.from_dict({**full, "objective": {"metric": "params", "mode": "min"}})
    assert by_size.selections() == []  # the network's size is not measured on any image
    held_out = SweepConfig.from_dict({**full, "search": {**full["search"], "data": {"subset": 45000}}})
    assert held_out.base_search().data.eval_split == "holdout" and held_out.selections()


def test_the_hpo_sweep_selects_on_held_out_training_images():
    hpo = SweepConfig.load(ROOT / "sweeps" / "hpo.yaml")
    data = hpo.base_search().data
    assert data.eval_split == "holdout" and data.subset == 45000  # 5,000 training images held out
    assert [field for field, _ in hpo.selections()] == ["objective[0].metric", "scheduler.metric", "evaluate.by"]
    assert not hpo.select_on_test_set
