"""Hostile inputs: broken files (CIFAR-10 arrays, sweep YAML, checkpoint, result.json, Optuna's
journal), storage that cannot be written, a second driver on a sweep, a misspelt fault to inject,
and a property-based fuzz of the shipped sweep files. Each is refused with one line naming what is
wrong and what to do, or continued from what is good and said so; never a traceback."""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_data_config, tiny_search_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nas.config import ConfigError
from nas.data import DataError, load_cifar10
from nas.runtime import CHECKPOINT, PREVIOUS_CHECKPOINT, RESULT
from nas.search import run_search
from nas.settings import SearchConfig
from tuning import driver_lock, preflight, recovery
from tuning.config import SweepConfig
from tuning.driver_lock import DriverLock, process_start
from tuning.job import faults
from tuning.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


def run(*command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True, timeout=300)


def refused(done: subprocess.CompletedProcess) -> str:
    """The one error line of a run refused with exit 2, checked to be all it said of the error."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


# ---------------------------------------------------------------- CIFAR-10 array files
def arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def write_cifar(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    x, y = arrays(20)
    np.savez(root / "train.npz", x_train=x, y_train=y)
    x, y = arrays(10, seed=1)
    np.savez(root / "test.npz", x_test=x, y_test=y)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _savez(**arrays_) -> callable:
    return lambda path: np.savez(path, **arrays_)


x_good, y_good = arrays(20)
BROKEN_TRAIN = {
    # case: (how train.npz is broken, what the message says of it)
    "truncated": (_truncate, "train.npz is not a usable CIFAR-10 array file ("),
    "garbage": (lambda p: p.write_bytes(os.urandom(5000)), "train.npz is not a usable CIFAR-10 array file ("),
    "empty": (lambda p: p.write_bytes(b""), "train.npz is not a usable CIFAR-10 array file ("),
    "pickled objects": (
        _savez(x_train=np.array([{"a": 1}] * 20, dtype=object), y_train=y_good),
        "Object arrays cannot be loaded",
    ),
    "other array names": (_savez(images=x_good, labels=y_good), "no array x_train; it has images, labels"),
    "channels first": (_savez(x_train=x_good.transpose(0, 3, 1, 2), y_train=y_good), "of shape (20, 3, 32, 32)"),
    "float images": (_savez(x_train=x_good.astype(np.float32), y_train=y_good), "x_train is float32"),
    "labels of another length": (_savez(x_train=x_good, y_train=y_good[:7]), "for 20 images"),
    "labels outside 0-9": (_savez(x_train=x_good, y_train=y_good + 5), "labels outside 0-9"),
}


@pytest.mark.parametrize("case", list(BROKEN_TRAIN))
def test_a_broken_cifar10_file_is_named_with_what_to_do(tmp_path, case):
    write_cifar(tmp_path)
    breaks, said = BROKEN_TRAIN[case]
    breaks(tmp_path / "train.npz")
    with pytest.raises(DataError) as caught:
        load_cifar10(str(tmp_path), download=False)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "train.npz")), message
    assert said in message and "replace it with a good copy" in message and "data.download: true" in message
    assert "\n" not in message


def test_a_good_cifar10_file_still_loads(tmp_path):
    write_cifar(tmp_path)
    train, test = load_cifar10(str(tmp_path), download=False)
    assert len(train.labels) == 20 and len(test.labels) == 10


def test_broken_data_refuses_a_search_and_a_sweep_in_one_line(tmp_path):
    data = tmp_path / "cifar"
    write_cifar(data)
    (data / "test.npz").write_bytes(b"PK\x03\x04 not really a zip")
    line = refused(run("-m", "nas", "search", "--out", "out", "--data-root", str(data), "--set", "epochs=1",
                       cwd=tmp_path))  # fmt: skip
    assert f"{data / 'test.npz'} is not a usable CIFAR-10 array file" in line
    assert not (tmp_path / "out" / CHECKPOINT).exists()

    sweep = {"name": "broken", "search": {"epochs": 1, "data": {"root": str(data), "download": False}},
             "space": {"preset": {"choices": ["darts"]}}, "num_samples": 1, "storage": "runs/ray",
             "select_on_test_set": True}  # fmt: skip
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(sweep))
    line = refused(run(str(ROOT / "sweeps" / "run.py"), "broken.yaml", "-q", cwd=tmp_path))
    assert f"{data / 'test.npz'} is not a usable CIFAR-10 array file" in line
    assert not (tmp_path / "runs").exists()  # refused before anything was written


# ---------------------------------------------------------------- sweep files
BROKEN_YAML = {
    # case: (the file's bytes, what the error says)
    "a list": (b"- name: a\n- name: b\n", "expected a YAML mapping of settings (key: value lines), found a list"),
    "a single string": (b"table4\n", "found a single string"),
    "not YAML": (b"name: x\nspace: {preset: [darts\n", "is not valid YAML at line 3, column 1"),
    "tab indentation": (b"name: x\nsearch:\n\tepochs: 1\n", "is not valid YAML at line 3"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not a text file (byte 0 is not UTF-8)"),
}


@pytest.mark.parametrize("case", list(BROKEN_YAML))
def test_a_sweep_file_that_is_not_a_mapping_or_not_yaml(tmp_path, case):
    content, said = BROKEN_YAML[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        SweepConfig.load(path)
    assert caught.value.field == "config" and said in str(caught.value), str(caught.value)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_sweep_file_that_cannot_be_read_says_why(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"folder\.yaml'; cannot be read \(Is a directory\)"):
        SweepConfig.load(tmp_path / "folder.yaml")
    line = refused(run(str(ROOT / "sweeps" / "run.py"), "folder.yaml", cwd=tmp_path))
    assert "cannot be read (Is a directory)" in line


# ---------------------------------------------------------------- storage
def test_storage_that_cannot_be_created_is_refused_and_the_check_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"storage: got '/proc/x/ray'; cannot be written \("):
        preflight.check_writable(Path("/proc/x/ray"), "storage")
    # A path that can be created: tried for real, then removed again up to what existed.
    preflight.check_writable(tmp_path / "a" / "b" / "ray", "storage")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "file").write_text("x")
    preflight.check_writable(tmp_path / "kept", "storage")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["file"]

    sweep = {"name": "proc", "search": {"epochs": 1, "data": {"dataset": "synthetic"}},
             "space": {"preset": {"choices": ["darts"]}}, "num_samples": 1}  # fmt: skip
    (tmp_path / "proc.yaml").write_text(yaml.safe_dump(sweep))
    line = refused(run(str(ROOT / "sweeps" / "run.py"), "proc.yaml", "--set", "storage=/proc/x", cwd=tmp_path))
    assert line.startswith("error: storage: got '/proc/x'; cannot be written (")


# ---------------------------------------------------------------- checkpoints and result.json
class Stop(Exception):
    pass


def _stop_after(epoch: int):
    def callback(event):
        if event.epoch == epoch:
            raise Stop

    return callback


@pytest.fixture(scope="module")
def straight():
    """A 3-epoch tiny search on generated images (no data file to read each time), never interrupted."""
    data = {**tiny_data_config(), "dataset": "synthetic", "root": None}
    config = SearchConfig.resolve("da2s", tiny_search_config(epochs=3, data=data))
    return config, run_search(config, artifacts=False)


def test_a_truncated_checkpoint_resumes_from_the_one_before_it(tmp_path, straight, caplog):
    config, reference = straight
    with pytest.raises(Stop):
        run_search(config, tmp_path, callbacks=[_stop_after(2)], artifacts=False)
    assert {p.name for p in tmp_path.iterdir()} >= {CHECKPOINT, PREVIOUS_CHECKPOINT}
    _truncate(tmp_path / CHECKPOINT)
    with caplog.at_level(logging.WARNING, logger="nas.runtime"):
        resumed = run_search(config, tmp_path, artifacts=False)
    said = [r.getMessage() for r in caplog.records if CHECKPOINT in r.getMessage()]
    assert said and f"resuming from {tmp_path / PREVIOUS_CHECKPOINT} (epoch 1)" in said[0], said
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.genotype.to_dict() == reference.genotype.to_dict()
    assert resumed.metrics["discretized_acc"] == pytest.approx(reference.metrics["discretized_acc"])


def test_a_run_whose_checkpoints_are_all_broken_is_refused_naming_the_file(tmp_path, straight):
    config, _ = straight
    with pytest.raises(Stop):
        run_search(config, tmp_path, callbacks=[_stop_after(2)], artifacts=False)
    _truncate(tmp_path / CHECKPOINT)
    (tmp_path / PREVIOUS_CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(ConfigError) as caught:
        run_search(config, tmp_path, artifacts=False)
    message = str(caught.value)
    assert caught.value.field == "checkpoint" and str(tmp_path / CHECKPOINT) in message
    assert "no readable earlier checkpoint" in message and "to start this run over" in message
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config.to_dict()))
    line = refused(run("-m", "nas", "search", "--out", str(tmp_path), "--config", "search.yaml", cwd=tmp_path))
    assert "error: checkpoint: got" in line and "cannot be read" in line


def test_a_truncated_result_json_is_measured_again_from_the_last_checkpoint(tmp_path, straight, caplog):
    config, reference = straight
    run_search(config, tmp_path, artifacts=False)
    _truncate(tmp_path / RESULT, keep=0.3)
    with caplog.at_level(logging.WARNING, logger="nas.runtime"):
        again = run_search(config, tmp_path, artifacts=False)
    assert any(f"{tmp_path / RESULT} cannot be read" in r.getMessage() for r in caplog.records)
    assert again.genotype.to_dict() == reference.genotype.to_dict()
    assert again.metrics["discretized_acc"] == pytest.approx(reference.metrics["discretized_acc"])
    assert json.loads((tmp_path / RESULT).read_text())["metrics"]["discretized_acc"] == pytest.approx(
        reference.metrics["discretized_acc"]
    )  # written whole again


# ---------------------------------------------------------------- Optuna's journal
def _journal(path: Path, trials: int = 3) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=trials)


def test_a_damaged_optuna_journal_is_named_with_its_line(tmp_path):
    path = tmp_path / "optuna.journal"
    _journal(path)
    lines = path.read_bytes().splitlines(keepends=True)
    recovery.check_journal(path)  # a good one passes

    path.write_bytes(b"".join(lines[:-1]) + lines[-1][:-7])  # a last write cut short: what a kill leaves
    recovery.check_journal(path)

    damaged = [*lines[:4], b"\x00\x00\x00 disk garbage\n", *lines[5:]]
    path.write_bytes(b"".join(damaged))
    with pytest.raises(ConfigError) as caught:
        recovery.check_journal(path)
    message = str(caught.value)
    assert caught.value.field == "--resume" and str(path) in message
    assert f"damaged at line 5 of {len(lines)}" in message and "Keep a copy" in message


# ---------------------------------------------------------------- a full disk
def test_ray_state_cut_by_a_full_disk_is_restored_from_the_drivers_copy(tmp_path):
    import pickle

    sweep, temp = tmp_path / "sweep", tmp_path / "ray"
    staging = temp / "session_1" / "artifacts" / "2026-01-01_00-00-00" / "s" / "driver_artifacts"
    sweep.mkdir()
    staging.mkdir(parents=True)
    state = json.dumps({"trial_data": [["x" * 5000]]}).encode()
    searcher = pickle.dumps({"counter": 2, "trials": list(range(5000))})  # Ray's ".json" here is a pickle
    for name, data in {"experiment_state-2026.json": state, "search_gen_state-2026.json": searcher}.items():
        (staging / name).write_bytes(data)
        (sweep / name).write_bytes(data[:4096])  # what the copy onto a full disk left
    (sweep / "tuner.pkl").write_bytes(pickle.dumps([1, 2]))  # whole: left alone
    assert not recovery.readable(sweep / "experiment_state-2026.json")
    assert not recovery.readable(sweep / "search_gen_state-2026.json")
    assert recovery.readable(sweep / "tuner.pkl") and recovery.readable(staging / "search_gen_state-2026.json")

    repaired = recovery.repair_ray_state(sweep, "s", ray_temp=temp)
    assert sorted(p.name for p, _ in repaired) == ["experiment_state-2026.json", "search_gen_state-2026.json"]
    assert (sweep / "experiment_state-2026.json").read_bytes() == state
    assert (sweep / "search_gen_state-2026.json").read_bytes() == searcher
    assert recovery.repair_ray_state(sweep, "s", ray_temp=temp) == []

    (sweep / "experiment_state-2026.json").write_bytes(state[:100])
    with pytest.raises(ConfigError) as caught:
        recovery.repair_ray_state(sweep, "s", ray_temp=tmp_path / "elsewhere")
    assert caught.value.field == "--resume" and "experiment_state-2026.json" in str(caught.value)
    assert "cut short" in str(caught.value) and "another name" in str(caught.value)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB filesystem of its own (tmpfs), to be filled up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(bytes(1 << 16))
                out.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_sweep_whose_disk_fills_stops_with_exit_5_and_resumes_once_there_is_room(tmp_path, small_disk):
    """The disk under the sweep's storage filled while a trial runs its 2nd epoch: the trial cannot
    write its checkpoint, the sweep stops as on Ctrl-C and says so (exit 5); once there is room,
    `--resume` repairs what the full disk cut short and finishes with every epoch logged once."""
    from mlflow import MlflowClient

    sweep = {
        "name": "full",
        "search": {"epochs": 3, "batch_size": 32, "model": {"channels": 4, "cells": 3, "nodes": 4},
                   "data": {"dataset": "synthetic", "subset": 192, "eval_split": "holdout", "eval_subset": 128,
                            "resolution": 8},
                   "discretize": {"bn_recal_batches": 2}},
        "space": {"preset": {"choices": ["darts", "da2s"]}},
        "sampler": {"type": "grid"},
        "concurrency": 1,
        "max_failures": 1,
        "storage": str(small_disk / "ray"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    marker = tmp_path / "paused"
    env = {**os.environ, "NAS_FAULT": f"trial.after-epoch-metrics@2:pause:{marker}"}
    command = [sys.executable, str(ROOT / "sweeps" / "run.py"), "sweep.yaml"]
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not marker.exists() and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert marker.exists(), (tmp_path / "driver.log").read_text()[-3000:]
            filler = fill(small_disk)
            Path(f"{marker}.continue").touch()
            assert driver.wait(timeout=240) == 5, (tmp_path / "driver.log").read_text()[-3000:]
        finally:
            if driver.poll() is None:
                driver.kill()
    said = (tmp_path / "driver.log").read_text()
    assert "The sweep stopped: its storage" in said and "make room there" in said
    assert "python sweeps/run.py sweep.yaml --resume" in said

    filler.unlink()
    env.pop("NAS_FAULT")
    done = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr

    client = MlflowClient(sweep["mlflow"]["tracking_uri"])
    (experiment,) = [e for e in client.search_experiments() if e.name == "full"]
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("kind") == "trial"]
    assert sorted(r.data.params["preset"] for r in runs) == ["da2s", "darts"]
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "accuracy/supernet"))
        assert steps == [1, 2, 3], (run.data.params["preset"], steps)


# ---------------------------------------------------------------- one driver per sweep
def test_a_live_driver_refuses_a_second_and_a_gone_one_does_not(tmp_path, monkeypatch):
    store = open_storage(str(tmp_path)) / "sweep"
    first = DriverLock(store)
    first.acquire("name")
    try:
        holder = json.loads((tmp_path / "sweep" / "driver.lock").read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        assert holder["start"] == process_start(os.getpid())
        with pytest.raises(ConfigError) as caught:
            DriverLock(store).acquire("--resume")
        message = str(caught.value)
        assert caught.value.field == "--resume"
        assert f"host {socket.gethostname()}, pid {os.getpid()}, started {holder['started']}" in message
    finally:
        first.release()
    assert not (tmp_path / "sweep").exists()  # the lock made the folder, and took it away again

    lock = tmp_path / "sweep" / "driver.lock"
    lock.parent.mkdir()
    cases = {
        # another machine's driver, its heartbeat fresh: alive
        "other host, fresh": ({"host": "node-b", "pid": 1, "heartbeat": time.time() - 5}, True),
        # another machine's driver that stopped beating: gone
        "other host, stale": ({"host": "node-b", "pid": 1, "heartbeat": time.time() - 10 * driver_lock.STALE_S}, False),
        # this machine: a pid that no longer runs, or that now belongs to another process
        "dead pid": ({"host": socket.gethostname(), "pid": 2**22 + 1, "start": "1", "heartbeat": time.time()}, False),
        "reused pid": ({"host": socket.gethostname(), "pid": os.getpid(), "start": "0", "heartbeat": time.time()}, False),
        "torn write": (None, False),
    }  # fmt: skip
    for case, (content, alive) in cases.items():
        lock.write_text(json.dumps(content) if content else '{"host": "no')
        second = DriverLock(store)
        if alive:
            with pytest.raises(ConfigError, match="host node-b, pid 1"):
                second.acquire("--resume")
            continue
        second.acquire("--resume")  # taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid(), case
        second.release()
        assert not lock.exists(), case


def test_the_heartbeat_keeps_a_lock_alive_for_other_machines(tmp_path, monkeypatch):
    monkeypatch.setattr(driver_lock, "HEARTBEAT_S", 0.1)
    store = open_storage(str(tmp_path)) / "sweep"
    lock = DriverLock(store)
    lock.acquire("name")
    try:
        first = json.loads((tmp_path / "sweep" / "driver.lock").read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / "sweep" / "driver.lock").read_text())["heartbeat"] > first
    finally:
        lock.release()


# ---------------------------------------------------------------- faults to inject
@pytest.mark.parametrize(
    "spec",
    ["trial.after-epoch-metrics@2:kill", "trial.after-metrics@2:kill:/tmp/m", "trial.after-epoch-metrics@two:kill:/m",
     "search.after-epoch-metrics@2:pause:/m", "trial.after-epoch-metrics@2:stop:/m"],
)  # fmt: skip
def test_a_misspelt_fault_is_refused_not_ignored(monkeypatch, spec):
    monkeypatch.setenv("NAS_FAULT", spec)
    with pytest.raises(ConfigError, match=r"NAS_FAULT: got .*expected KIND\.POINT@EPOCH:ACTION:MARKER"):
        faults()


def test_well_formed_faults_pass(monkeypatch):
    specs = "trial.after-epoch-metrics@2:kill:/m1;evaluation.before-epoch-metrics@1:pause:/m2"
    monkeypatch.setenv("NAS_FAULT", specs)
    assert faults() == specs


# ---------------------------------------------------------------- fuzz of the shipped sweep files
SHIPPED = sorted((ROOT / "sweeps").glob("*.yaml"))
# Values users get wrong: types, ranges, huge and negative numbers, empty and unicode strings,
# strings that look like numbers or paths, and nested junk.
SCALARS = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["", " ", "∞", "ü", "数", "\u202e", "1e400", "-1", "0", "0.5", "nan", "inf", "auto", "darts",
                       "da2s", "[2, 2, 2, 2]", "3 of 14", "15 of 14", "s3://", "s3://b/../x", "../x", "/proc/x",
                       "cuda", "grid", "nsga2", "asha", "max", "min", "~", "null", "yes"])
)  # fmt: skip
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | SCALARS.filter(
        lambda v: isinstance(v, str)), inner, max_size=4),
    max_leaves=8,
)  # fmt: skip
EDGE_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, -(10**30), 1e308, -1e-308, 0.5, -0.5,
                                float("nan"), float("inf"), float("-inf")])  # fmt: skip


def _places(node, path=()):
    """Every (container, key) in a nested mapping/list: where a value can be replaced or removed."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield node, key, (*path, key)
        yield from _places(value, (*path, key))


def _containers(node):
    if isinstance(node, dict):
        yield node
    for value in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
        yield from _containers(value)


@st.composite
def mutated_sweeps(draw):
    """A shipped sweep file with one to four random mutations: a value replaced by junk or by an
    edge-case number, a key removed, a key added (unknown, or a known one where it does not belong)."""
    source = draw(st.sampled_from(SHIPPED))
    data = yaml.safe_load(source.read_text())
    known = sorted({str(k) for _, k, _ in _places(data) if isinstance(k, str)})
    for _ in range(draw(st.integers(1, 4))):
        places = list(_places(data))
        kind = draw(st.sampled_from(["junk", "number", "remove", "add"]))
        if kind in ("junk", "number", "remove") and places:
            node, key, _ = draw(st.sampled_from(places))
            if kind == "remove":
                node.pop(key)
            else:
                node[key] = draw(JUNK if kind == "junk" else EDGE_NUMBERS)
        elif kind == "add":
            node = draw(st.sampled_from(list(_containers(data)) or [data]))
            node[draw(st.sampled_from(known) | st.text(max_size=10))] = draw(JUNK)
    return source.name, data


def validate(data, work: Path) -> None:
    """The driver's checks before any trial that need no Ray, data or storage: the file read, its
    settings, space, grid and evaluation resolved, its storage named, its devices and GPUs."""
    from tuning.sweep import _resolved_search

    path = work / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    sweep = SweepConfig.load(path)
    sweep.base_search()
    if sweep.sampler.type == "grid":
        for point in sweep.grid_points()[:4]:
            sweep.resolve_trial(point)
    _resolved_search(sweep, work)
    open_storage(sweep.storage, work)
    preflight.check_devices(sweep)
    preflight.check_gpus_here(preflight.sweep_requests(sweep))


FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
FUZZ_SEEN: dict[str, int] = {"accepted": 0, "refused": 0}


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=os.environ.get("FUZZ_RANDOM") is None, database=None)  # fmt: skip
@given(mutated_sweeps())
def test_mutated_sweep_files_are_accepted_or_refused_with_a_named_error(case):
    """Each mutation of a shipped sweep file is accepted or refused with a ConfigError naming a
    field and what is allowed, in one line; nothing else (no TypeError, KeyError, OverflowError...)."""
    _, data = case
    # A setting that makes validation allocate without bound (a cell count of 1e308, found so) fails
    # here as a MemoryError instead of exhausting the machine.
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + 1_500_000_000, resource.RLIM_INFINITY))
    try:
        with tempfile.TemporaryDirectory() as work:
            validate(data, Path(work))
        FUZZ_SEEN["accepted"] += 1
    except ConfigError as err:
        FUZZ_SEEN["refused"] += 1
        message = str(err)
        assert err.field and message.startswith(f"{err.field}: got "), message
        assert "\n" not in message and "Traceback" not in message, message
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _address_space() -> int:
    """This process's virtual memory now, in bytes (/proc/self/status)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))


def teardown_module() -> None:
    if sum(FUZZ_SEEN.values()):  # shown with -s: how the fuzzed files fared
        print(
            f"\nfuzzed sweep files: {FUZZ_SEEN['accepted']} accepted, {FUZZ_SEEN['refused']} refused with a named error"
        )
