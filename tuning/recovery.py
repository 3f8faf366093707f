"""A sweep's state across crashes and resumes, besides what Ray Tune keeps.

A sweep's directory on its storage holds, next to Ray's state, the id of the sweep's MLflow run
(`PARENT_RUN_FILE`) and Optuna's study (`OPTUNA_JOURNAL`, on the driver's disk beside an object
store, which then records where: `JOURNAL_PATH_FILE`). A resumed sweep first sends the MLflow calls
that trials could not send (pending files), brings the journal back to this driver, and ends the
MLflow runs of trials that Ray's last saved state does not know (they started after it and were
lost with the driver). An interrupted sweep marks its open runs KILLED; a finished one ends runs
and Optuna trials that their trials left open.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import optuna
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from nas.config import ConfigError
from nas.environment import environment

from .config import SweepConfig
from .storage import Storage
from .tracked_run import PENDING_FILE, replay_pending
from .tracking import environment_of, environment_tags, log_params, params_of, redact, retrying

log = logging.getLogger(__name__)
PARENT_RUN_FILE = "mlflow_parent_run_id"
OPTUNA_JOURNAL = "optuna.journal"
JOURNAL_PATH_FILE = "optuna_journal_path"  # object stores: where the driver keeps the study's journal
# What a sweep's directory may hold before its first Ray state (a refused or crashed start).
LEFTOVERS = frozenset({PARENT_RUN_FILE, OPTUNA_JOURNAL, JOURNAL_PATH_FILE})


def parent_run(client, experiment_id: str, sweep: SweepConfig, experiment_dir: Storage, resume: bool) -> str:
    marker = experiment_dir / PARENT_RUN_FILE
    if marker.exists():
        run_id = marker.read_text().strip()
        retrying(lambda: client.update_run(run_id, status="RUNNING"), "reopen sweep run")
        if resume:
            retrying(lambda: client.set_tag(run_id, "resumed", "true"), "tag sweep run")
            _note_environment_change(client, run_id)
        return run_id
    tags = {"kind": "sweep", "sweep": sweep.name, "sampler": sweep.sampler_type(), **environment_tags()}
    run = retrying(
        lambda: client.create_run(experiment_id, tags=tags, run_name=f"sweep-{sweep.name}"), "create sweep run"
    )
    run_id = run.info.run_id
    settings = sweep.to_dict()
    log_params(client, run_id, params_of({k: v for k, v in settings.items() if k not in ("search", "space")}))
    log_params(client, run_id, params_of({"search": settings["search"]}))
    text = redact(yaml.safe_dump(settings, sort_keys=False))
    retrying(lambda: client.log_text(run_id, text, "sweep.yaml"), "log sweep")
    marker.write_text(run_id + "\n")
    return run_id


def _note_environment_change(client, run_id: str) -> None:
    """A sweep resumed with other library versions (or code) than it started with: said once on the
    driver's log and kept on the sweep's run as `resumed_environment.NAME` tags; each trial's run
    records the versions it ran with."""
    started = environment_of(retrying(lambda: client.get_run(run_id), "get sweep run").data.tags)
    now = environment()
    changed = {k: (started.get(k, "?"), v) for k, v in now.items() if started and started.get(k) != v}
    if not changed:
        return
    log.warning(
        "this sweep is resumed with other versions than it started with (%s); trials started from now on record theirs",
        ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()),
    )
    for name, (_, version) in changed.items():
        retrying(lambda name=name, v=version: client.set_tag(run_id, f"resumed_environment.{name}", v), "tag sweep run")


def journal_path(sweep: SweepConfig, base: Path, experiment_dir: Storage, resume: bool = False) -> Path:
    """Optuna's journal: in the sweep's directory on a filesystem; on the driver's disk beside an
    object store (a journal needs file locks), mirrored to the store after every change. A resumed
    sweep finds it where it was (its path is kept in the store), copied back if that disk is new."""
    if experiment_dir.local_path is not None:
        experiment_dir.local_path.mkdir(parents=True, exist_ok=True)
        return experiment_dir.local_path / OPTUNA_JOURNAL
    path = base / "runs" / "optuna" / sweep.name / OPTUNA_JOURNAL
    record = experiment_dir / JOURNAL_PATH_FILE
    if resume and record.exists():
        path = Path(record.read_text().strip())
        if not path.exists():
            try:
                copied = (experiment_dir / OPTUNA_JOURNAL).download(path)
            except OSError as err:
                raise ConfigError(
                    "--resume",
                    str(path),
                    f"this sweep's Optuna study is restored to this path on the driver, where it was started, and "
                    f"it cannot be written here ({err}); resume on a driver where it can",
                ) from None
            if not copied:
                raise ConfigError("--resume", str(experiment_dir / OPTUNA_JOURNAL), "is missing: the study is lost")
            log.info("Optuna study restored from %s to %s", experiment_dir / OPTUNA_JOURNAL, path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        record.write_text(f"{path}\n")
    return path


def replay_all_pending(experiment_dir: Storage) -> list[tuple[str, int]]:
    """Sends the MLflow calls that trials and evaluations could not send; returns what is left."""
    left = []
    for stored in experiment_dir.glob(f"*/{PENDING_FILE}"):
        try:
            if stored.local_path is not None:
                count = replay_pending(stored.local_path)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    stored.download(Path(tmp) / PENDING_FILE)
                    count = replay_pending(Path(tmp) / PENDING_FILE)
                if not count:
                    stored.delete()
        except Exception as err:
            log.warning("MLflow: replaying %s failed: %s", stored, err)
            count = -1
        if count:
            left.append((str(stored), count))
    return left


def known_trial_ids(experiment_dir: Storage) -> set[str]:
    """The trials in Ray's last saved state of the sweep (the ones a restore knows about)."""
    states = [experiment_dir / name for name in experiment_dir.children() if name.startswith("experiment_state-")]
    states = sorted((s for s in states if s.name.endswith(".json")), key=lambda s: s.info().mtime)
    if not states:
        return set()
    ids = set()
    for entry in json.loads(states[-1].read_text())["trial_data"]:
        text = entry[0] if isinstance(entry, list) else entry
        ids.add(json.loads(text)["trial_id"])
    return ids


def end_lost_trials(client, experiment_id: str, sweep_name: str, known: set[str]) -> int:
    """Ends the runs of trials that started after Ray's last saved state (the driver died in
    between): a restore cannot resume them; new trials take their place."""
    query = f"tags.sweep = '{sweep_name}' and tags.kind = 'trial' and attributes.status != 'FINISHED'"
    runs = retrying(lambda: client.search_runs([experiment_id], query, max_results=5000), "search runs")
    lost = [r for r in runs if r.data.tags.get("trial_id") not in known and r.info.status in ("RUNNING", "KILLED")]
    reason = "started after the sweep's last saved state and lost with its driver; replaced by a new trial"
    for run in lost:
        retrying(lambda run=run: client.set_tag(run.info.run_id, "lost", reason), "tag run")
        retrying(lambda run=run: client.set_terminated(run.info.run_id, "KILLED"), "end run")
    return len(lost)


def fail_unfinished_optuna_trials(journal: Path, study_name: str, mirror: Storage | None = None) -> int:
    """Once every trial of a sweep has ended, Optuna trials still RUNNING were lost with a driver."""
    if not journal.exists():
        return 0
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=study_name, storage=storage)
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for trial in stale:
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    if stale and mirror is not None:
        mirror.upload(journal)
    return len(stale)


def end_open_runs(client, experiment_id: str, sweep_name: str, status: str, reason: str) -> int:
    """Ends the sweep's trial and evaluation runs left RUNNING (they re-open when resumed)."""
    query = f"tags.sweep = '{sweep_name}' and tags.kind != 'sweep' and attributes.status = 'RUNNING'"
    runs = retrying(lambda: client.search_runs([experiment_id], query, max_results=1000), "search runs")
    for run in runs:
        retrying(lambda run=run: client.set_tag(run.info.run_id, "interrupted", reason), "tag run")
        retrying(lambda run=run: client.set_terminated(run.info.run_id, status), "end run")
    return len(runs)


def prepare_resume(client, experiment_id: str, sweep: SweepConfig, base: Path, experiment_dir: Storage) -> None:
    """Before a resumed sweep's Tuner: pending MLflow calls sent, the Optuna journal back on this
    driver's disk if it is new, and the runs of trials lost with the last driver ended."""
    replay_all_pending(experiment_dir)
    journal_path(sweep, base, experiment_dir, resume=True)
    lost = end_lost_trials(client, experiment_id, sweep.name, known_trial_ids(experiment_dir))
    if lost:
        log.warning(
            "%d trials had started after the sweep's last saved state; their runs are marked KILLED (lost)", lost
        )


def close_interrupted(client, experiment_id: str, sweep_name: str, parent_run_id: str) -> None:
    """An interrupted sweep: its open runs and its own run KILLED, resumable with --resume."""
    count = end_open_runs(client, experiment_id, sweep_name, "KILLED", "sweep interrupted; resume it with --resume")
    retrying(lambda: client.set_tag(parent_run_id, "interrupted", "true"), "tag sweep run")
    retrying(lambda: client.set_terminated(parent_run_id, "KILLED"), "end sweep run")
    log.warning("sweep interrupted (%d trial runs marked KILLED); resume it with --resume", count)


def reconcile_finished(
    client, experiment_id: str, sweep: SweepConfig, base: Path, experiment_dir: Storage
) -> list[tuple[str, int]]:
    """A sweep whose trials all ended: pending MLflow calls sent; if none are left, runs and Optuna
    trials still RUNNING were lost, and are ended. Returns the calls still pending."""
    pending = replay_all_pending(experiment_dir)
    if not pending:
        end_open_runs(client, experiment_id, sweep.name, "KILLED", "its trial ended without closing it")
        journal = journal_path(sweep, base, experiment_dir, resume=True)
        mirror = None if experiment_dir.local_path is not None else experiment_dir / OPTUNA_JOURNAL
        fail_unfinished_optuna_trials(journal, sweep.name, mirror)
    return pending
