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

import io
import json
import logging
import os
import pickletools
import shutil
import tempfile
from pathlib import Path

import optuna
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from nas.config import ConfigError
from nas.environment import environment

from .config import SweepConfig
from .driver_lock import LOCK_FILE
from .storage import Storage
from .tracked_run import PENDING_FILE, replay_pending
from .tracking import client_for, environment_of, environment_tags, log_params, params_of, redact, retrying

log = logging.getLogger(__name__)
PARENT_RUN_FILE = "mlflow_parent_run_id"
OPTUNA_JOURNAL = "optuna.journal"
JOURNAL_PATH_FILE = "optuna_journal_path"  # object stores: where the driver keeps the study's journal
# What a sweep's directory may hold before its first Ray state (a refused or crashed start).
LEFTOVERS = frozenset({PARENT_RUN_FILE, OPTUNA_JOURNAL, JOURNAL_PATH_FILE, LOCK_FILE})


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


def finished_already(experiment_dir: Storage, tracking_uri: str, sweep_name: str) -> str | None:
    """Why a sweep has nothing left to resume, or None: its MLflow run ended FINISHED with every
    trial finished (none errored or diverged), no evaluation failed and no MLflow call left pending.
    Read before Ray starts, so that such a `--resume` (a requeued job, a repeated command) ends at
    once."""
    marker = experiment_dir / PARENT_RUN_FILE
    if not marker.exists() or any(True for _ in experiment_dir.glob(f"*/{PENDING_FILE}")):
        return None
    try:
        client = client_for(tracking_uri)
        run = client.get_run(marker.read_text().strip())
        if run.info.status != "FINISHED":
            return None
        finished, failed = run.data.metrics.get("trials_finished"), run.data.metrics.get("trials_failed")
        if not finished or failed != 0 or run.data.metrics.get("trials_interrupted", 0) != 0:
            return None
        query = f"tags.sweep = '{sweep_name}' and tags.kind = 'evaluation' and attributes.status != 'FINISHED'"
        if client.search_runs([run.info.experiment_id], query, max_results=1):
            return None
    except Exception:  # MLflow unreachable or the run gone: resume the long way, which says why
        return None
    return f"its MLflow run {run.info.run_id} is FINISHED with {finished:.0f} trials, none failed"


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


def end_open_runs(client, experiment_id: str, sweep_name: str, status: str, reason: str, attempts: int = 12) -> int:
    """Ends the sweep's trial and evaluation runs left RUNNING (they re-open when resumed)."""
    query = f"tags.sweep = '{sweep_name}' and tags.kind != 'sweep' and attributes.status = 'RUNNING'"
    runs = retrying(lambda: client.search_runs([experiment_id], query, max_results=1000), "search runs", attempts)
    for run in runs:
        retrying(lambda run=run: client.set_tag(run.info.run_id, "interrupted", reason), "tag run", attempts)
        retrying(lambda run=run: client.set_terminated(run.info.run_id, status), "end run", attempts)
    return len(runs)


def prepare_resume(client, experiment_id: str, sweep: SweepConfig, base: Path, experiment_dir: Storage) -> None:
    """Before a resumed sweep's Tuner: pending MLflow calls sent, the Optuna journal back on this
    driver's disk if it is new, and the runs of trials lost with the last driver ended."""
    replay_all_pending(experiment_dir)
    if experiment_dir.local_path is not None:
        repair_ray_state(experiment_dir.local_path, sweep.name)
    check_journal(journal_path(sweep, base, experiment_dir, resume=True))
    lost = end_lost_trials(client, experiment_id, sweep.name, known_trial_ids(experiment_dir))
    if lost:
        log.warning(
            "%d trials had started after the sweep's last saved state; their runs are marked KILLED (lost)", lost
        )


# Ray Tune's driver state in a sweep's directory, each written whole on the driver's own disk first
# (its session's `artifacts/<start>/<name>/driver_artifacts/`) and then copied there.
RAY_STATE_FILES = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl", "tuner.pkl")


def readable(path: Path) -> bool:
    """Whether a file of Ray's state (JSON, or a pickle whatever its name says) reads to its end; a
    pickle is walked, not run."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    try:
        json.loads(data)
        return True
    except ValueError:
        pass
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except ValueError:
        return False
    return bool(data)


def repair_ray_state(directory: Path, name: str, ray_temp: Path | None = None) -> list[tuple[Path, Path]]:
    """Ray Tune's state files in a sweep's directory that a full disk cut short, replaced by the
    whole copy the driver that wrote them kept on its own disk (found under Ray's temp folder on this
    machine). Returns (file, copy) for each one replaced; a cut file with no whole copy stops the
    resume naming it (Ray cannot restore the sweep past it)."""
    ray_temp = ray_temp or Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray"
    repaired = []
    for pattern in RAY_STATE_FILES:
        for path in sorted(directory.glob(pattern)):
            if readable(path):
                continue
            copies = ray_temp.glob(f"session_*/artifacts/*/{name}/driver_artifacts/{path.name}")
            whole = sorted((c for c in copies if readable(c)), key=lambda c: c.stat().st_mtime)
            if not whole:
                raise ConfigError(
                    "--resume", path.name,
                    f"Ray's saved state of the sweep, {path}, is cut short (a full disk?) and this machine holds "
                    "no whole copy of it; the sweep cannot be resumed: start it again under another name (its "
                    "finished trials stay in MLflow)",
                )  # fmt: skip
            shutil.copyfile(whole[-1], path)
            repaired.append((path, whole[-1]))
            log.warning("Ray's saved state %s was cut short (a full disk?); restored from its copy %s", path, whole[-1])
    return repaired


def check_journal(path: Path) -> None:
    """Optuna's study journal, read line by line before the sweep resumes on it: a line that is not
    a journal entry, followed by others, stops the resume naming the file and the line (Optuna
    itself skips only a last line cut short by a crash, which is what a killed driver leaves)."""
    if not path.exists():
        return
    with open(path, "rb") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or "op_code" not in entry:
                raise ValueError("not a journal entry")
        except ValueError as err:
            if last and not line.endswith(b"\n"):
                return  # a write cut short: Optuna leaves it out
            raise ConfigError(
                "--resume", path.name,
                f"Optuna's study journal {path} is damaged at line {number} of {len(lines)} ({err}); the study cannot be "
                "read past it. Keep a copy, then cut the file before that line to resume with the trials logged "
                "up to there (later trials run again), or start the sweep under another name",
            ) from None  # fmt: skip


def close_interrupted(client, experiment_id: str, sweep_name: str, parent_run_id: str) -> None:
    """An interrupted sweep: its open runs and its own run KILLED, resumable with --resume."""
    # Few retries: an interrupted driver may have seconds left (a scheduler's grace time), and its
    # tracking server may be the thing that went (a lost head).
    try:
        count = end_open_runs(
            client, experiment_id, sweep_name, "KILLED", "sweep interrupted; resume it with --resume", attempts=3
        )
        retrying(lambda: client.set_tag(parent_run_id, "interrupted", "true"), "tag sweep run", attempts=3)
        retrying(lambda: client.set_terminated(parent_run_id, "KILLED"), "end sweep run", attempts=3)
    except Exception as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        log.warning(
            "sweep interrupted; MLflow could not be told (%s): its runs show RUNNING until --resume continues them",
            reason,
        )
        return
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
