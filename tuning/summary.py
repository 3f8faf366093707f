"""The report on the sweep's own MLflow run, written when the sweep ends: the table, drops.png and
the run's description."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .names import NOTE_TAG
from .presentation import sweep_note
from .report import load_trials, plot_drops, report_text, summarise
from .tracking import retrying


def present_summary(client, tracking_uri: str, sweep, run_id: str) -> None:
    """The report's table and drops.png on the sweep's run (a SweepConfig's), and as its description."""
    experiment = sweep.mlflow.experiment or sweep.name
    finished, other = load_trials(tracking_uri, experiment)
    if not finished:
        return
    text = report_text(experiment, finished, other)
    body = text.split("\n\n", 1)[1]  # without the report's title line
    with tempfile.TemporaryDirectory() as tmp:
        drops = plot_drops(summarise(finished), Path(tmp) / "drops.png", experiment)
        retrying(lambda: client.log_artifact(run_id, str(drops)), "log drops.png")
    retrying(lambda: client.log_text(run_id, text, "report.md"), "log report")
    note = sweep_note(sweep.name, sweep.description, body, "drops.png", run_id)
    retrying(lambda: client.set_tag(run_id, NOTE_TAG, note[:8000]), "tag sweep run")
