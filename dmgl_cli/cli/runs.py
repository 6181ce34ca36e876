"""``dmgl runs``: housekeeping of recorded runs."""

from __future__ import annotations

import click

from dmgl_cli.cli.base import DmglGroup
from dmgl_cli.cli.options import tracking_option


@click.group(cls=DmglGroup)
def runs() -> None:
    """Housekeeping of recorded runs."""


@runs.command("reconcile")
@click.option("--experiment", help="Only this MLflow experiment (default: all).")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Minutes without a heartbeat after which a run from another machine counts as dead.",
)
@tracking_option
def runs_reconcile(experiment, older_than, tracking_uri) -> None:
    """Mark runs KILLED that are recorded as RUNNING but whose process is gone (SIGKILL, OOM, lost machine).

    On this machine the recorded process id is checked; runs from other machines count as dead after
    --older-than minutes without a heartbeat (one per epoch). They stay resumable with `dmgl train --resume`.

    \b
    Examples:
      dmgl runs reconcile
      dmgl runs reconcile --experiment crema-d --older-than 120
    """
    from dmgl_cli.runner import reconcile
    from dmgl_cli.tracking import Tracker

    settled = reconcile(tracker=Tracker(tracking_uri), experiment=experiment, older_than_minutes=older_than)
    for run in settled:
        click.echo(f"marked KILLED: {run.run_id} ({run.name}, {run.role or '?'})")
    click.echo(f"{len(settled)} stale run(s) settled")
