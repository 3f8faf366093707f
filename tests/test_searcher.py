"""The sweep's searcher survives Ray's pickling and continues where it stopped.

Ray Tune pickles the searcher (and the Optuna study and sampler in it) when it creates the Tuner and
whenever it saves the sweep's state; `--resume` unpickles the first and restores the second. Here a
NSGA-II sweep stopped after a generation and a half and restored that way proposes exactly what the
same sweep proposes without a stop, generation for generation."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest

from nas.config import ConfigError
from tuning.config import SweepConfig
from tuning.space import NSGAIISampler, make_searcher

ROOT = Path(__file__).resolve().parents[1]
POPULATION = 4
GENERATION_KEY = "NSGAIISampler:generation"  # Optuna's own name for it


def hpo_sweep(**overrides) -> SweepConfig:
    """The shipped NSGA-II sweep with a small generation."""
    extra = [f"{k}={v}" for k, v in overrides.items()]
    sweep = SweepConfig.load(ROOT / "sweeps" / "hpo.yaml", [f"sampler.population_size={POPULATION}", *extra])
    sweep.validate()
    return sweep


def fake_result(config: dict) -> dict:
    """Two objectives that depend on the proposal (a search's accuracy and size stand-ins)."""
    acc = 50 + 40 * config["loss.op_entropy.weight"] - 10 * config["alpha.warmup"]
    params = 2.0 + config["arch_optim.lr_scale"] / 8 + (0.5 if config["alpha_sharing"] == "stage" else 0.0)
    return {"discretized_acc": acc, "params": params}


def run_trials(searcher, numbers: range) -> list[dict]:
    proposals = []
    for n in numbers:
        config = searcher.suggest(f"t{n}")
        proposals.append(config)
        searcher.on_trial_complete(f"t{n}", fake_result(config))
    return proposals


def generations(journal: Path, name: str = "hpo") -> list[int]:
    study = optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))  # fmt: skip
    return [t.system_attrs[GENERATION_KEY] for t in study.trials]


def test_nsga2_searcher_pickled_and_restored_continues_its_generations(tmp_path):
    sweep = hpo_sweep()
    total, stop = 3 * POPULATION, POPULATION + POPULATION // 2

    # The same sweep without a stop.
    straight = run_trials(make_searcher(sweep, tmp_path / "straight.journal"), range(total))
    assert generations(tmp_path / "straight.journal") == [g for g in range(3) for _ in range(POPULATION)]

    # With a stop: the Tuner's pickle at the start, the searcher's saved state at the stop.
    journal = tmp_path / "stopped.journal"
    searcher = make_searcher(sweep, journal)
    at_start = pickle.dumps(searcher)
    first = run_trials(searcher, range(stop))
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    searcher.save_to_dir(str(state_dir))
    del searcher

    restored = pickle.loads(at_start)
    restored.restore_from_dir(str(state_dir))
    assert isinstance(restored._ot_study.sampler, NSGAIISampler)
    rest = run_trials(restored, range(stop, total))
    assert first + rest == straight  # the same proposals: sampler state and population carried over
    assert generations(journal) == generations(tmp_path / "straight.journal")


def test_a_sampler_started_afresh_would_propose_differently(tmp_path):
    """What the test above rules out: a new sampler on the same study (a resume that lost the
    sampler's state) continues the generations but not the random stream."""
    sweep = hpo_sweep()
    straight = run_trials(make_searcher(sweep, tmp_path / "straight.journal"), range(2 * POPULATION))
    journal = tmp_path / "fresh.journal"
    first = run_trials(make_searcher(sweep, journal), range(POPULATION + 1))
    rest = run_trials(make_searcher(sweep, journal), range(POPULATION + 1, 2 * POPULATION))
    assert first == straight[: POPULATION + 1]
    assert rest != straight[POPULATION + 1 :]


def test_nsga2_sampler_pickles_with_its_lock_left_out():
    sampler = NSGAIISampler(seed=3, population_size=POPULATION)
    copy = pickle.loads(pickle.dumps(sampler))
    assert type(copy) is NSGAIISampler and copy.population_size == POPULATION
    lock = getattr(copy, "_thread_lock", None)
    if lock is not None:  # Optuna >= 5.1: a new, working lock
        assert lock is not getattr(sampler, "_thread_lock", None)
        with lock:
            pass


@pytest.mark.parametrize("changes", [{"sampler.population_size": 1}, {"sampler.type": "tpe"}])
def test_population_size_is_checked(changes):
    """Below two parents, or given to a sampler without generations: refused, naming the field."""
    with pytest.raises(ConfigError) as err:
        hpo_sweep(**changes)
    assert err.value.field == "sampler.population_size"
