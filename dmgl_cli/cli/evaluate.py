"""``dmgl eval``: re-score a run's checkpoint and record the result on the run."""

from __future__ import annotations

import click

from dmgl_cli.cli.options import tracking_option


@click.command("eval")
@click.argument("run_id")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@tracking_option
def eval_command(run_id, checkpoint, split, tracking_uri) -> None:
    """Re-score a run's checkpoint and record the result on the run.

    RUN_ID is a seed run, or a parent run (then every seed is scored). The recorded config and the prepared
    dataset rebuild the model exactly; the output compares with what training logged.

    \b
    Examples:
      dmgl eval 3f2a9c...
      dmgl eval 3f2a9c... --checkpoint last --split val
    """
    from dmgl_cli.runner import evaluate_run
    from dmgl_cli.tracking import Tracker

    for outcome in evaluate_run(run_id, tracker=Tracker(tracking_uri), checkpoint=checkpoint, split=split):
        m = outcome.metrics
        line = "  ".join(f"{k} {m[f'{split}_{k}']:.4f}" for k in ("acc", "map", "f1"))
        diff = outcome.max_abs_diff
        match = (
            "no logged values to compare"
            if diff is None
            else ("matches the logged metrics exactly" if diff == 0 else f"max |diff| vs logged {diff:.2e}")
        )
        click.echo(f"run {outcome.run_id} seed {outcome.seed} {checkpoint}.pt on {split}: {line}  ({match})")
