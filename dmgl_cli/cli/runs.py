"""``dmgl runs``: list, show and compare recorded runs, and housekeeping. The queries live in
:mod:`dmgl_cli.run_queries`."""

from __future__ import annotations

import click

from dmgl_cli.cli.base import DmglGroup
from dmgl_cli.cli.options import json_option, tracking_option
from dmgl_cli.cli.output import echo_json, format_table, paired_scores, score, view_line


@click.group(cls=DmglGroup)
def runs() -> None:
    """List, show and compare recorded runs; settle runs whose process died; send journals left by an outage.

    \b
    Examples:
      dmgl runs list
      dmgl runs list --strategy constant:0.5 --dataset crema-d --status finished
      dmgl runs show 3f2a9c...
      dmgl runs compare 3f2a9c... 7b1e04...
      dmgl runs list --json | jq -r '.[].run_id'
    """


def _started(iso: str | None) -> str | None:
    return iso[:16].replace("T", " ") if iso else None


@runs.command("list")
@click.option("--experiment", "-e", "experiments", multiple=True, help="Only this MLflow experiment (repeatable).")
@click.option("--strategy", "-s", help="Only this strategy: a name (constant) or with its value (constant:0.5).")
@click.option("--method", "-m", help="Only this training method, e.g. concat.")
@click.option("--dataset", "-d", help="Only runs on this dataset.")
@click.option(
    "--status",
    type=click.Choice(["running", "scheduled", "finished", "failed", "killed"], case_sensitive=False),
    help="Only runs in this state.",
)
@click.option(
    "--role",
    type=click.Choice(["parent", "seed", "sweep", "all"], case_sensitive=False),
    default="parent",
    show_default=True,
    help="parent: one row per `dmgl train` (mean over seeds); seed: one per seed; sweep: one per `dmgl sweep`.",
)
@click.option("--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True, help="At most this many.")
@tracking_option
@json_option(help="Print the runs as one JSON array on stdout.")
def runs_list(experiments, strategy, method, dataset, status, role, limit, tracking_uri, as_json) -> None:
    """List recorded runs, newest first, with their headline test score (mean ± std over seeds for a parent).

    \b
    Examples:
      dmgl runs list
      dmgl runs list --experiment crema-d --strategy lb --limit 10
      dmgl runs list --strategy constant:0.5 --method concat --status finished
      dmgl runs list --role seed --dataset synthetic --json | jq -r '.[].run_id'
    """
    from dmgl_cli.run_queries import RunFilter, list_runs

    selection = RunFilter(
        experiments=tuple(experiments),
        strategy=strategy,
        method=method,
        dataset=dataset,
        status=status.upper() if status else None,
        role=None if role.lower() == "all" else role.lower(),
        limit=limit,
    )
    selection.check()  # before MLflow loads

    from dmgl_cli.tracking import Tracker

    found = list_runs(Tracker(tracking_uri), selection)
    if as_json:
        echo_json([r.to_dict() for r in found])
        return
    if not found:
        click.echo("no runs match; `dmgl runs list --role all` lists every run", err=True)
        return
    headers = ["RUN ID", "STARTED", "STATUS", "ROLE", "EXPERIMENT", "NAME", "STRATEGY", "SEEDS", "SCORE"]
    rows = [
        [
            r.run_id,
            _started(r.started),
            r.status,
            r.role,
            r.experiment,
            r.name,
            r.strategy,
            ",".join(map(str, r.seeds)) or None,
            f"{r.metric} {score(r.value, r.std)}" if r.value is not None else None,
        ]
        for r in found
    ]
    click.echo(format_table(rows, headers))
    if len(found) == limit:
        click.echo(f"(the newest {limit}; --limit shows more)", err=True)


@runs.command("show")
@click.argument("run_id")
@tracking_option
@json_option(help="Print the run (params, tags, metrics, children) as one JSON document.")
def runs_show(run_id, tracking_uri, as_json) -> None:
    """Show one run: what it is, its final metrics, its params and tags, and its child runs.

    RUN_ID is the run's id, a unique prefix of the id (6+ characters) or its unique name.

    \b
    Examples:
      dmgl runs show 3f2a9c...
      dmgl runs show 3f2a9c... --json | jq .final
    """
    from dmgl_cli.run_queries import show_run
    from dmgl_cli.tracking import Tracker

    detail = show_run(Tracker(tracking_uri), run_id)
    if as_json:
        echo_json(detail.to_dict())
        return
    s = detail.summary
    click.echo(f"run {s.run_id}  {s.name}")
    facts = [
        ("experiment", f"{s.experiment} ({s.experiment_id})"),
        ("role", s.role),
        ("status", s.status),
        ("dataset", s.dataset),
        ("method", s.method),
        ("strategy", s.strategy),
        ("seed" if s.role == "seed" else "seeds", ",".join(map(str, s.seeds)) or None),
        ("parent run", s.parent_run_id),
        ("started", s.started),
        ("ended", s.ended),
    ]
    click.echo(format_table([[f"  {k}", v] for k, v in facts if v is not None]))
    if detail.final:
        click.echo("final metrics:")
        columns: dict[str, list[float | None]] = {k: [v] for k, v in detail.final.items()}
        click.echo(_key_values({k: v[0] for k, v in paired_scores(columns, [len(s.seeds)]).items()}))
    if detail.params:
        click.echo("params:")
        click.echo(_key_values(detail.params))
    own_tags = {k: v for k, v in detail.tags.items() if k.startswith("dmgl.") or k == "mlflow.parentRunId"}
    if own_tags:
        click.echo("tags:")
        click.echo(_key_values(own_tags))
    if detail.children:
        click.echo(f"child runs ({len(detail.children)}):")
        rows = [
            ["  " + c.run_id, c.name, c.status, f"{c.metric} {score(c.value, c.std)}" if c.value is not None else None]
            for c in detail.children
        ]
        click.echo(format_table(rows))
    click.echo(view_line(s.url))


def _key_values(mapping: dict) -> str:
    return format_table([[f"  {k}", v] for k, v in mapping.items()])


@runs.command("compare")
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN_ID RUN_ID...")
@tracking_option
@json_option(help="Print the comparison as one JSON document.")
def runs_compare(run_ids, tracking_uri, as_json) -> None:
    """Compare runs side by side: the params that differ, and every final metric.

    Each RUN_ID is a run's id, a unique prefix of the id (6+ characters, as the column headers print them) or
    its unique name. Only params that apply to every run are compared (an Ours-LB setting is no difference
    against a constant run; the strategy row shows that).

    \b
    Examples:
      dmgl runs compare 3f2a9c... 7b1e04...
      dmgl runs compare $(dmgl runs list --strategy lb --json | jq -r '.[].run_id') --json
    """
    from dmgl_cli.errors import DmglError

    if len(run_ids) < 2:
        raise DmglError("compare needs at least two run ids")

    from dmgl_cli.run_queries import compare_runs
    from dmgl_cli.tracking import Tracker

    comparison = compare_runs(Tracker(tracking_uri), list(run_ids))
    if as_json:
        echo_json(comparison.to_dict())
        return
    headers = ["", *(r.run_id[:8] for r in comparison.runs)]
    rows: list[list] = [
        ["name", *(r.name for r in comparison.runs)],
        ["strategy", *(r.strategy for r in comparison.runs)],
    ]
    if comparison.params:
        rows.append([f"params that differ ({comparison.same_params} others are equal):"])
        rows += [[f"  {k}", *values] for k, values in comparison.params.items()]
    else:
        rows.append([f"params: all {comparison.same_params} are equal"])
    if comparison.final:
        rows.append(["final metrics:"])
        counts = [len(r.seeds) for r in comparison.runs]
        rows += [[f"  {k}", *values] for k, values in paired_scores(comparison.final, counts).items()]
    click.echo(_ragged_table(headers, rows))


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
    from dmgl_cli.run.scoring import reconcile
    from dmgl_cli.tracking import Tracker

    settled = reconcile(tracker=Tracker(tracking_uri), experiment=experiment, older_than_minutes=older_than)
    for run in settled:
        click.echo(f"marked KILLED: {run.run_id} ({run.name}, {run.role or '?'})")
    click.echo(f"{len(settled)} stale run(s) settled")


@runs.command("sync")
@tracking_option
def runs_sync(tracking_uri) -> None:
    """Send what runs wrote while the tracking server was away: every journal of the store left in the registry.

    A run written to a tracking server keeps a journal on local disk (DMGL_HOME/journal/RUN_ID/); while the server
    is away training goes on, and the journal is sent when it is back. A process that ended (or died) before that
    leaves its journal; this sends each one, in order and exactly once. `dmgl train --resume RUN` sends its run's
    journal first by itself.

    \b
    Examples:
      dmgl runs sync --tracking-uri http://127.0.0.1:5000
      MLFLOW_TRACKING_URI=http://tracking:5000 dmgl runs sync
    """
    from dmgl_cli.tracking import sync_journals

    synced = sync_journals(tracking_uri)
    for run in synced.runs:
        click.echo(f"run {run.run_id}: sent {run.sent} record(s)" + (f", {run.left} left" if run.left else ""))
    click.echo(synced.summary)


def _ragged_table(headers: list[str], rows: list[list]) -> str:
    """format_table, where a one-cell row is a section heading that spans the columns."""
    full = [r for r in rows if len(r) == len(headers)]
    table = format_table(full, headers).split("\n")
    out, body = [table[0]], iter(table[1:])
    for row in rows:
        out.append(str(row[0]) if len(row) == 1 else next(body))
    return "\n".join(out)
