"""``dmgl register``: put a run's logged model (its best checkpoint) in the MLflow Model Registry."""

from __future__ import annotations

import click

from dmgl_cli.cli.options import json_option, tracking_option
from dmgl_cli.cli.output import echo_json


@click.command("register")
@click.argument("run_id")
@click.option("--name", required=True, help="Registered model name; a new version is added if it exists.")
@tracking_option
@json_option
def register(run_id, name, tracking_uri, as_json) -> None:
    """Register a run's model in the MLflow Model Registry.

    RUN_ID (an id, a unique prefix of 6+ characters or a unique run name) is a seed run (its best checkpoint,
    logged as an MLflow model by `dmgl train`), or a parent run: then
    the seed with the best validation score is registered (never chosen on test; a tie goes to the lower seed),
    and the output says which. The version loads with `mlflow.pyfunc.load_model("models:/NAME/VERSION")`.

    \b
    Examples:
      dmgl register 3f2a9c... --name crema-d-lb
      dmgl register 3f2a9c... --name crema-d-lb --json | jq -r .version
    """
    from dmgl_cli.tracking import Tracker

    tracker = Tracker(tracking_uri)
    run = tracker.find_run(run_id)  # an unknown or ambiguous one is refused before torch loads

    from dmgl_cli.run.scoring import register as register_model

    outcome = register_model(run.run_id, name, tracker=tracker)
    if as_json:
        echo_json(
            {
                "name": outcome.name,
                "version": outcome.version,
                "model_uri": outcome.registry_uri,
                "logged_model_uri": outcome.model_uri,
                "run_id": outcome.run_id,
                "seed": outcome.seed,
                "parent_run_id": outcome.parent_id,
                "chosen_by": outcome.chosen_by or None,
            }
        )
        return
    click.echo(f"registered {outcome.name} version {outcome.version}: {outcome.registry_uri}")
    click.echo(f"from seed {outcome.seed} (run {outcome.run_id}), logged model {outcome.model_uri}")
    if outcome.parent_id:
        click.echo(f"chosen from parent run {outcome.parent_id} by {outcome.chosen_by}")
