"""``dmgl reproduce``: parse, call :mod:`dmgl_cli.reproduce`, print. The logic lives there."""

from __future__ import annotations

import click

from dmgl_cli.cli.options import json_option, silent_option, tracking_option
from dmgl_cli.cli.output import Messages, echo_json

_TABLES = ("table1", "table2", "table4", "table5")
_FORMATS = ("text", "markdown", "latex")


@click.command()
@click.argument("table", type=click.Choice(_TABLES, case_sensitive=False), metavar="TABLE")
@click.option(
    "--dataset",
    "-d",
    required=True,
    help="The paper's dataset (kinetics-sounds, crema-d, sarcasm, twitter2015) or one of your own (synthetic, "
    "a custom dataset: measured side only).",
)
@click.option(
    "--seeds",
    default="3",
    show_default=True,
    help="Seeds per row: a count (from the recipe's train.seed up) or a list: 0,1,2. The paper uses 3.",
)
@click.option(
    "--recipe",
    "-r",
    help="Recipe to train with (default: the dataset's; Table 5: sarcasm-clip / twitter2015-clip).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe setting for every row.")
@click.option(
    "--only",
    multiple=True,
    metavar="ROWS",
    help="Only these rows: paper names (Ours-LB, h(0.05)), methods (ogm-ge) or strategies (constant:0.5); "
    "comma-separated or repeated.",
)
@click.option(
    "--dry-run", is_flag=True, help="List the runs that would be reused (run ids) and trained; train nothing."
)
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the config every row starts from and each row's method and strategy (YAML; JSON with --json) and "
    "exit; opens no dataset or MLflow store.",
)
@click.option("--format", "-f", "fmt", type=click.Choice(_FORMATS), default="text", show_default=True)
@tracking_option
@json_option(help="Print the plan (with --dry-run) or the result, cell by cell, as one JSON document on stdout.")
@silent_option(help="Print only the table (no plan or progress lines).")
def reproduce(
    table, dataset, seeds, recipe, overrides, only, dry_run, print_config, fmt, tracking_uri, as_json, silent
) -> None:
    """The paper's published figures next to your measured mean ± std, with the difference in points.

    Plans the TABLE's rows (table1: methods, table2: methods on NVGesture, table4: integration strategies, table5: CLIP, CLIP+MLA, CLIP+Ours) x
    seeds with the recipe's settings, reuses every seed already recorded with identical settings (the rule
    `dmgl report` uses: same recorded params and dataset checksum; any experiment), trains the rest (one `dmgl
    train` per row) and prints the comparison. The measured figure is each seed run's test score at its best epoch
    on validation. On a dataset the paper has no figures for, the measured side alone is printed.

    \b
    Examples:
      dmgl reproduce table1 --dataset crema-d --dry-run      # what would be reused / trained
      dmgl reproduce table1 --dataset crema-d --print-config # the settings the rows train with
      dmgl reproduce table1 --dataset crema-d --seeds 3
      dmgl reproduce table4 --dataset kinetics-sounds --format latex
      dmgl reproduce table5 --dataset sarcasm               # recipe sarcasm-clip (CLIP encoders)
      dmgl reproduce table1 --dataset sarcasm --only Concat,Ours-H,Ours-LB
      dmgl reproduce table4 --dataset synthetic --set train.epochs=5   # no paper figures: measured side only
    """
    table = table.lower()
    if print_config:
        from dmgl_cli.run_queries import reproduce_config_listing

        listing = reproduce_config_listing(table, dataset, seeds, recipe, overrides)
        if as_json:
            echo_json(listing.to_dict())
        else:
            click.echo(listing.text(), nl=False)
        return

    from dmgl_cli import reproduce as logic
    from dmgl_cli.tracking import Tracker

    say = Messages(as_json=as_json or fmt != "text", silent=silent)
    tracker = Tracker(tracking_uri)
    plan = logic.plan_reproduction(
        table, dataset, tracker=tracker, seeds=seeds, recipe=recipe, overrides=overrides, only=only
    )
    if not plan.has_paper:
        click.echo(
            f"note: {plan.no_figures}",
            err=as_json or fmt != "text",
        )
    if dry_run:
        if as_json:
            echo_json({"dry_run": True, **plan.to_dict()})
        else:
            _print_plan(plan)
        return
    say(_summary(plan))
    logic.run_plan(plan, tracker=tracker, say=say)
    result = logic.compare(plan, tracker=tracker)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(result.render(fmt), nl=False)


def _summary(plan) -> str:
    return (
        f"{plan.table} on {plan.dataset} (recipe {plan.recipe}, {plan.epochs} epoch(s), seeds "
        f"{','.join(map(str, plan.seeds))}): {len(plan.rows)} row(s); {plan.reused_count} seed run(s) reused, "
        f"{plan.train_count} to train"
    )


def _print_plan(plan) -> None:
    click.echo("dry run: nothing is trained or recorded.")
    click.echo(_summary(plan) + f"; new runs go to experiment {plan.experiment!r}")
    width = max((len(r.label) for r in plan.rows), default=0)
    code = max((len(r.code) for r in plan.rows), default=0)
    for row in plan.rows:
        if row.skipped:
            what = f"cannot run: {row.skipped}"
        else:
            parts = []
            if row.reused:
                parts.append("reuse " + ", ".join(f"seed {s} (run {r})" for s, r in sorted(row.reused.items())))
            if row.to_train:
                parts.append("train seed(s) " + ",".join(map(str, row.to_train)))
            what = "; ".join(parts)
        click.echo(f"  {row.label:<{width}}  {row.code:<{code}}  {what}")
    if plan.omitted:
        click.echo(f"not run: {', '.join(plan.omitted)} (the paper prints no figure for {plan.dataset})")
    for note in plan.notes:
        click.echo(f"note: {note}")
