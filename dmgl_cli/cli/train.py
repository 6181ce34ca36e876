"""``dmgl train``: train with the paper's objective and record every seed in MLflow."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from dmgl_cli.cli.options import json_option, silent_option, tracking_option
from dmgl_cli.cli.output import BatchBar, Messages, echo_json, progress_bar_wanted, score, view_line
from dmgl_cli.errors import DmglError
from dmgl_cli.links import experiment_runs_url, run_url, ui_base

if TYPE_CHECKING:
    from dmgl_cli.distributed import DistributedContext


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
    if nproc is not None and nproc > 1 and _launched_world_size() > 1:
        raise DmglError("--nproc starts its own processes; under torchrun, leave it out (torchrun sets their number)")
    if _launched_world_size() > 1:  # one rank of a data-parallel job (torchrun, or --nproc below)
        _train_as_rank(options)
        return
    _train(options, nproc or 1)


def _launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun); read without importing torch."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit():
        raise DmglError(f"WORLD_SIZE={value!r} is not a number of processes")
    return int(value)


def _train_as_rank(options: dict[str, Any]) -> None:
    """Rank 0 does what a single process does, with the other ranks training alongside; they record and print
    nothing. A normal exit from rank 0 that trained nothing (--print-config, --dry-run, finished runs) releases them;
    an error leaves them to torchrun, which stops them once rank 0 exits."""
    from dmgl_cli import runner
    from dmgl_cli.distributed import RUN_FILE_VARIABLE, init_from_environment, lost_a_rank
    from dmgl_cli.errors import Interrupted

    distributed = init_from_environment()
    # Stopped by Ctrl-C or SIGTERM: rank 0 says so, unless `dmgl train --nproc` launched it (the launcher does).
    quiet = not distributed.is_main or RUN_FILE_VARIABLE in os.environ
    try:
        if not distributed.is_main:
            runner.follow(distributed)
            return
        _train(options, 1, distributed=distributed)
    except (KeyboardInterrupt, Interrupted):
        raise Interrupted(quiet=quiet) from None
    except RuntimeError as exc:
        if not lost_a_rank(exc):
            raise
        # another rank died: `dmgl train --nproc` (or torchrun) reports which; rank 0 of another torchrun says so
        # in one line, not with the collective's traceback
        if quiet:
            raise SystemExit(1) from None
        raise DmglError(
            f"rank {distributed.rank} stopped: another rank of the job is gone (its connection closed)"
        ) from None
    distributed.release_followers()


def _train(options: dict[str, Any], nproc: int, distributed: DistributedContext | None = None) -> None:
    """``dmgl train`` in this process (``options``: the command's), or, with ``nproc`` > 1, in ``nproc`` processes
    launched on the same command line; ``distributed``: this process's rank in a data-parallel job."""
    recipe, strategy, alpha, p, method, modality, seeds, epochs = (
        options[k] for k in ("recipe", "strategy", "alpha", "p", "method", "modality", "seeds", "epochs")
    )
    overrides, experiment, run_name, resume_run, deterministic, print_config, dry_run = (
        options[k]
        for k in ("overrides", "experiment", "run_name", "resume_run", "deterministic", "print_config", "dry_run")
    )
    tracking_uri, as_json, silent = options["tracking_uri"], options["as_json"], options["silent"]
    # Only light modules here: the config is resolved (and a typo refused) before torch or MLflow is imported.
    from dmgl_cli.config import parse_seeds, resolve
    from dmgl_cli.paths import safe_name
    from dmgl_cli.strategies import spec_from_flags

    say = Messages(as_json=as_json, silent=silent)
    if resume_run and nproc > 1:
        _launch(nproc)
        return
    if resume_run:
        given = [
            n
            for n, v in (
                ("--strategy", strategy),
                ("--alpha", alpha),
                ("--p", p),
                ("--method", method),
                ("--modality", modality),
                ("--epochs", epochs),
                ("--experiment", experiment),
                ("--name", run_name),
                ("--deterministic", deterministic or None),
                ("--print-config", print_config or None),
                ("--dry-run", dry_run or None),
            )
            if v is not None
        ]
        if overrides:
            given.append("--set")
        if given:
            raise DmglError(f"--resume continues a recorded run with its recorded config; drop {', '.join(given)}")
        from dmgl_cli.tracking import Tracker

        tracker = Tracker(tracking_uri)
        resume_run = tracker.find_run(resume_run).run_id  # an unknown or ambiguous one: refused before torch loads

        from dmgl_cli import runner
        from dmgl_cli.distributed import SINGLE_PROCESS, note_run

        note_run(resume_run)
        with _step_bar(silent) as bar:
            outcome = runner.resume(
                resume_run,
                tracker=tracker,
                progress=_epoch_printer(say, bar),
                step_progress=bar,
                distributed=distributed or SINGLE_PROCESS,
            )
        _print_outcome(outcome, tracker, as_json)
        return
    if print_config and dry_run:
        raise DmglError("--print-config and --dry-run each print and exit; give one")
    parse_seeds(seeds, 0)  # its form, before the config loads; the count starts at train.seed below
    for flag, name in (("run name", run_name), ("experiment", experiment)):
        if name is not None:
            safe_name(name, flag)
    settings = {
        key: value
        for key, value in (
            ("train.epochs", epochs),
            ("experiment", experiment),
            ("train.deterministic", deterministic or None),
        )
        if value is not None
    }
    config = resolve(
        recipe,
        overrides,
        strategy=spec_from_flags(strategy, alpha, p),
        method=method,
        modality=modality,
        settings=settings,
    )
    seed_list = parse_seeds(seeds, config.train.seed)
    if print_config:
        if as_json:
            echo_json(config.to_dict())
        else:
            from dmgl_cli.run_queries import train_config_listing

            click.echo(train_config_listing(config, recipe, overrides).text(), nl=False)
        return
    if dry_run:
        from dmgl_cli.run_queries import train_plan

        _print_plan(train_plan(config, seed_list, run_name), as_json)
        return
    if nproc > 1:
        from dmgl_cli.runner import open_checked_dataset
        from dmgl_cli.train import check_data_parallel

        check_data_parallel(config, nproc)  # before any process starts
        open_checked_dataset(config)
        _launch(nproc)
        return

    from dmgl_cli.data.registry import open_dataset

    open_dataset(config.dataset)  # an unprepared dataset is refused before MLflow and the trainer load

    from dmgl_cli import runner
    from dmgl_cli.distributed import SINGLE_PROCESS, note_run
    from dmgl_cli.tracking import Tracker

    def announce(parent_id: str) -> None:
        from dmgl_cli.run_queries import url_of

        note_run(parent_id)
        say(
            f"parent run {parent_id}: {config.method.name} / {config.strategy.name} on "
            f"{config.dataset}, seeds {','.join(map(str, seed_list))}"
        )
        say(view_line(url_of(tracker, parent_id)))  # to follow the curves while it trains

    tracker = Tracker(tracking_uri)
    with _step_bar(silent) as bar:
        outcome = runner.train(
            config,
            seed_list,
            tracker=tracker,
            progress=_epoch_printer(say, bar),
            step_progress=bar,
            run_name=run_name,
            on_parent=announce,
            distributed=distributed or SINGLE_PROCESS,
        )
    _print_outcome(outcome, tracker, as_json)


def _launch(nproc: int) -> None:
    """This same command line in ``nproc`` processes (torchrun), ``--nproc`` left out; rank 0 prints."""
    import sys

    from dmgl_cli.distributed import launch

    argv, skip = [], False
    for token in sys.argv[1:]:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            argv.append(token)
    if "train" not in argv:
        raise DmglError("--nproc needs the dmgl command line (`dmgl train ... --nproc N`)")
    launch(nproc, argv)


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
            f"{k} {score(outcome.summary[k + '_mean'], outcome.summary[k + '_std'] if several else None)}"
            for k in keys + ["test_gap_acc"]
            if k + "_mean" in outcome.summary
        )
        click.echo(f"mean over {len(outcome.seeds)} seeds: {summary}")
    click.echo(f"parent run {outcome.parent_run_id} in experiment {outcome.experiment!r}; browse with `dmgl ui`")
    click.echo(view_line(run_url(ui_base(tracker.uri), outcome.experiment_id, outcome.parent_run_id)))
