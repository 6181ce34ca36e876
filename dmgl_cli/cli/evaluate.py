"""``dmgl eval``: re-score a run's checkpoint and record the result on the run."""

from __future__ import annotations

import click

from dmgl_cli.cli.options import json_option, tracking_option
from dmgl_cli.cli.output import echo_json, view_line
from dmgl_cli.links import run_url, ui_base


@click.command("eval")
@click.argument("run_id")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@tracking_option
@json_option
def eval_command(run_id, checkpoint, split, tracking_uri, as_json) -> None:
    """Re-score a run's checkpoint and record the result on the run.

    RUN_ID is a seed run, or a parent run (then every seed is scored): its id, a unique prefix of the id (6+
    characters) or its unique name. The recorded config and the prepared
    dataset rebuild the model exactly; the output compares with what training logged.

    \b
    Examples:
      dmgl eval 3f2a9c...
      dmgl eval 3f2a9c... --checkpoint last --split val
      dmgl eval 3f2a9c... --json | jq '.results[].metrics.test_acc'
    """
    from dmgl_cli.tracking import Tracker

    tracker = Tracker(tracking_uri)
    run = tracker.find_run(run_id)  # an id, a unique prefix or a name; refused before torch loads
    run_id = run.run_id

    from dmgl_cli.run.scoring import evaluate_run

    outcomes = evaluate_run(run_id, tracker=tracker, checkpoint=checkpoint, split=split)
    base = ui_base(tracker.uri)
    url = run_url(base, run.experiment_id, run_id)
    if as_json:
        echo_json(
            {
                "run_id": run_id,
                "experiment_id": run.experiment_id,
                "checkpoint": checkpoint,
                "split": split,
                "url": url,
                "results": [
                    {
                        "run_id": o.run_id,
                        "seed": o.seed,
                        "metrics": o.metrics,
                        "logged": o.logged,
                        "max_abs_diff": o.max_abs_diff,
                        "url": run_url(base, run.experiment_id, o.run_id),  # a parent's seeds share its experiment
                    }
                    for o in outcomes
                ],
            }
        )
        return
    for outcome in outcomes:
        m = outcome.metrics
        line = "  ".join(f"{k} {m[f'{split}_{k}']:.4f}" for k in ("acc", "map", "f1"))
        diff = outcome.max_abs_diff
        match = (
            "no logged values to compare"
            if diff is None
            else ("matches the logged metrics exactly" if diff == 0 else f"max |diff| vs logged {diff:.2e}")
        )
        click.echo(f"run {outcome.run_id} seed {outcome.seed} {checkpoint}.pt on {split}: {line}  ({match})")
    click.echo(view_line(url))
