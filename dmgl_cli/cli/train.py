"""``dmgl train``: train with the paper's objective and record every seed in MLflow."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from dmgl_cli.cli.options import json_option, silent_option, tracking_option
from dmgl_cli.cli.output import BatchBar, Messages, echo_json, progress_bar_wanted, score, view_line
from dmgl_cli.links import experiment_runs_url, run_url, ui_base

if TYPE_CHECKING:
    from dmgl_cli.config import Config
    from dmgl_cli.tracking import Tracker


def _epoch_line(seed: int, epoch: int, total: int, m: dict[str, float]) -> str:
    parts = [f"seed {seed} epoch {epoch:>3}/{total}"]
    if "alpha" in m:  # a run whose alpha is 0 throughout records none
        parts.append(f"alpha {m['alpha']:.3f}")
    parts.append(f"loss {m['train_loss']:.3f}")
    if "val_acc" in m:  # not at the epochs train.eval_every skips
        parts.append(f"val acc {m['val_acc']:.3f}")
    if "test_acc" in m:
        parts.append(f"test acc {m['test_acc']:.3f}")
    per_modality = [k for k in m if k.startswith("val_acc_")]
    if per_modality:
        parts.append("val " + " ".join(f"{k[8:]} {m[k]:.3f}" for k in per_modality))
    return "  ".join(parts)


@click.command()
@click.option(
    "--recipe", "-r", default="synthetic", show_default=True, help="Recipe name (see `dmgl recipes`) or YAML path."
)
@click.option(
    "--strategy",
    "-s",
    help="How alpha moves: constant, stepwise, heuristic, linear (a fixed decay) or lb (learning-based; "
    "strategy.lb.estimator says what its hypergradient measures). With a value: constant:0.5, stepwise:0.95, "
    "linear:0.05; Ours-LB's controls lb:fixed-sign, lb:random-sign.",
)
@click.option(
    "--alpha",
    type=float,
    help="alpha of --strategy constant (0 = plain Concat, 1 = matching only); alone it implies --strategy constant.",
)
@click.option(
    "--p",
    "p",
    type=float,
    help="p of --strategy stepwise: h(p) uses p, then 1 - p after half the epochs; "
    "alone it implies --strategy stepwise.",
)
@click.option("--method", "-m", help="Training method (default: the recipe's, normally concat).")
@click.option("--modality", help="For --method unimodal: the one modality to train (Table 1's uni-modal rows).")
@click.option("--seeds", default="1", show_default=True, help="Number of seeds (from train.seed up) or a list: 0,1,2.")
@click.option("--epochs", type=int, help="Shorthand for --set train.epochs=N.")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe setting, e.g. optim.lr=0.05."
)
@click.option("--experiment", help="MLflow experiment (default: the dataset's name).")
@click.option(
    "--name", "run_name", help="Parent run name (default: METHOD-STRATEGY with its setting, e.g. concat-constant-0.5)."
)
@click.option(
    "--resume",
    "resume_run",
    metavar="RUN_ID",
    help="Continue an interrupted run: a seed or parent run's id, a unique id prefix (6+ characters) or its name.",
)
@click.option(
    "--deterministic", is_flag=True, help="PyTorch determinism switches: bit-identical reruns (slower on GPU)."
)
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the resolved config (YAML, settings that differ from the recipe marked; JSON with --json) and exit.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Show the runs this would create (experiment, names, seeds) and exit; records nothing.",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    help="Train data-parallel in N processes on this machine (torchrun; one GPU each on CUDA, gloo on the CPU). "
    "The global batch, and so the results, do not depend on N. Under your own torchrun, leave it out.",
)
@tracking_option
@json_option
@silent_option(help="Print only the final result (no per-epoch lines, no progress bar).")
def train(nproc, **options) -> None:
    """Train with the paper's objective and record every seed in MLflow.

    Options and recipe settings are checked before anything heavy loads, so a typo is refused at once. With --json
    the result (run ids, experiment, per-seed and mean ± std metrics, MLflow UI links) is one JSON document on
    stdout and progress goes to stderr. On a terminal a progress bar shows the batches of the current epoch.

    \b
    Examples:
      dmgl train --recipe synthetic --strategy lb --seeds 3
      dmgl train --strategy constant --alpha 0          # plain Concat
      dmgl train --strategy constant:0.5                # the same as --strategy constant --alpha 0.5
      dmgl train --strategy stepwise --p 0.05
      dmgl train --strategy heuristic --set train.epochs=30
      dmgl train --method unimodal --modality slow --strategy constant --alpha 0
      dmgl train --strategy lb --set strategy.lb.approx=cg   # Eq. 3 by conjugate gradient (weight decay in H)
      dmgl train --method dmgl-official                   # Ours-LB as the authors' released code runs it
      dmgl train --resume 3f2a...                         # continue after a crash
      dmgl train --strategy lb --seeds 3 --print-config   # the resolved settings, nothing trained
      dmgl train --strategy lb --seeds 3 --dry-run        # the runs it would create
      dmgl train --json --silent | jq -r .parent_run_id
      dmgl train --strategy lb --nproc 4                  # data-parallel over 4 GPUs (or CPU processes)
      torchrun --nnodes 2 --nproc-per-node 8 ... -m dmgl_cli train --strategy lb   # several machines
    """
    from dmgl_cli.run.request import TrainFeedback, TrainRequest, carry_out

    say = Messages(as_json=options["as_json"], silent=options["silent"])

    def announce(parent_id: str, config: Config, seeds: list[int], tracker: Tracker) -> None:
        from dmgl_cli.run_queries import url_of

        say(
            f"parent run {parent_id}: {config.method.name} / {config.strategy.name} on "
            f"{config.dataset}, seeds {','.join(map(str, seeds))}"
        )
        say(view_line(url_of(tracker, parent_id)))  # to follow the curves while it trains

    with _step_bar(options["silent"]) as bar:
        feedback = TrainFeedback(progress=_epoch_printer(say, bar), step_progress=bar, on_parent=announce)
        reply = carry_out(TrainRequest.from_options({**options, "nproc": nproc}), feedback)
    if reply.config is not None:
        _print_config(reply.config, options["recipe"], options["overrides"], options["as_json"])
    elif reply.plan is not None:
        _print_plan(reply.plan, options["as_json"])
    elif reply.outcome is not None and reply.tracker is not None:
        _print_outcome(reply.outcome, reply.tracker, options["as_json"])


def _print_config(config: Config, recipe: str, overrides: tuple[str, ...], as_json: bool) -> None:
    if as_json:
        echo_json(config.to_dict())
        return
    from dmgl_cli.run_queries import train_config_listing

    click.echo(train_config_listing(config, recipe, overrides).text(), nl=False)


@contextmanager
def _step_bar(silent: bool) -> Iterator[BatchBar | None]:
    """The within-epoch progress bar, or None (no per-batch callback at all) when it is not wanted."""
    if not progress_bar_wanted(silent):
        yield None
        return
    with BatchBar() as bar:
        yield bar


def _epoch_printer(say: Messages, bar: BatchBar | None):
    def progress(seed: int, epoch: int, total: int, metrics: dict[str, float]) -> None:
        if bar is not None:
            bar.close()
        say(_epoch_line(seed, epoch, total, metrics))

    return progress


def _print_plan(plan, as_json: bool) -> None:
    if as_json:
        echo_json({"dry_run": True, **plan.to_dict()})
        return
    click.echo(
        f"dry run: nothing is trained or recorded. `dmgl train` would create, in experiment {plan.experiment!r}:"
    )
    click.echo(
        f"  parent run {plan.parent_run}: {plan.method} / {plan.strategy} on {plan.dataset} "
        f"(recipe {plan.recipe}), {plan.epochs} epoch(s)"
    )
    for seed, name in zip(plan.seeds, plan.seed_runs, strict=True):
        click.echo(f"    seed run {name} (seed {seed})")


def _outcome_document(outcome, tracker) -> dict:
    base = ui_base(tracker.uri)
    return {
        "parent_run_id": outcome.parent_run_id,
        "experiment": outcome.experiment,
        "experiment_id": outcome.experiment_id,
        "url": run_url(base, outcome.experiment_id, outcome.parent_run_id),
        "experiment_url": experiment_runs_url(base, outcome.experiment_id),
        "complete": bool(outcome.summary),
        "seeds": [
            {
                "seed": seed.seed,
                "run_id": seed.run_id,
                "url": run_url(base, outcome.experiment_id, seed.run_id),
                "final": seed.final,
            }
            for seed in outcome.seeds
        ],
        "summary": outcome.summary,
    }


def _print_outcome(outcome, tracker, as_json: bool = False) -> None:
    if as_json:
        echo_json(_outcome_document(outcome, tracker))
        return
    keys = ["test_acc", "test_map", "test_f1"]
    for seed in outcome.seeds:
        scores = "  ".join(f"{k} {seed.final.get(k, float('nan')):.4f}" for k in keys)
        modal = "  ".join(f"{k[5:]} {v:.4f}" for k, v in seed.final.items() if k.startswith("test_acc_"))
        click.echo(
            f"seed {seed.seed} (run {seed.run_id}): best epoch {int(seed.final['best_epoch'])}  {scores}  {modal}"
        )
    if outcome.summary:
        several = len(outcome.seeds) > 1  # one seed has no spread to print (its std is 0 by definition)
        summary = "  ".join(
            f"{k} {score(outcome.summary[k], outcome.summary.get(k + '_std') if several else None)}"
            for k in keys + ["test_gap_acc"]
            if k in outcome.summary
        )
        click.echo(f"mean over {len(outcome.seeds)} seeds: {summary}")
    click.echo(f"parent run {outcome.parent_run_id} in experiment {outcome.experiment!r}; browse with `dmgl ui`")
    click.echo(view_line(run_url(ui_base(tracker.uri), outcome.experiment_id, outcome.parent_run_id)))
