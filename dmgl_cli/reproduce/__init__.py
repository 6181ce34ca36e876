"""``dmgl reproduce TABLE --dataset NAME``: the paper's published figures next to dmgl's own measurements.

Modules: :mod:`~dmgl_cli.reproduce.paper` the published figures, :mod:`~dmgl_cli.reproduce.plan` the plan,
:mod:`~dmgl_cli.reproduce.compare` paper against measured; training the plan's missing seeds is :func:`run_plan`.

**The paper's figures** ship as package data (``dmgl_cli/paper_results.yaml``): Table 1 (methods x datasets),
Table 4 with its supplementary twin Table A3 (integration strategies on Kinetics-Sounds and CREMA-D) and Table 5
(CLIP encoders on Sarcasm and Twitter2015), every figure citing its table. Each paper row names the dmgl method and
strategy that reproduce it, each column the dmgl metric (and the kind of modality it is measured on).

**The plan.** The table's rows (methods or strategies) x seeds, each row's configuration resolved once from the
dataset's recipe (Table 5: ``sarcasm-clip`` / ``twitter2015-clip``) with the ``--set`` overrides, exactly as
``dmgl train --recipe R --method M --strategy S`` would resolve it. A seed is *reused* when a finished seed run
with the same configuration and seed is recorded, in any experiment: "the same configuration" is
:attr:`dmgl_cli.report.selection.SeedRun.config_key` — the run's recorded params (``config.recorded_params``) less
the seed and the settings that do not change what is learnt, plus the prepared dataset's checksum — the rule by
which ``dmgl report`` refuses to put different settings in one cell. A planned configuration is turned into that
key by building the :class:`~dmgl_cli.report.selection.SeedRun` its run would record, and when a seed was recorded
more than once the latest run counts (:func:`~dmgl_cli.report.selection.group_runs`, as in the report).

**Running the rest: one ``run.training.train`` call per row, not an Optuna study.** The plan is a fixed grid with
nothing to sample or prune, and what is missing is decided per (configuration, seed): a row may need seed 2 only.
One ``run.training.train(config, missing_seeds)`` per row trains exactly the missing seeds and records them as
``dmgl train`` does (a parent run per row with its seed runs, tag ``dmgl.reproduce=TABLE``), so ``dmgl report`` and later
``dmgl reproduce`` calls read them like any other run. A ``dmgl sweep`` study would add a study to store, trials
that always run every seed of a strategy, trial-named runs tagged ``dmgl.sweep`` (which the report treats as a
tuning search over their settings), and nothing this plan uses. An interrupted reproduction keeps every seed
that finished; running the command again reuses them and trains the rest.

**The measured side** is, per row and column, mean ± std (:func:`dmgl_cli.metrics.mean_std`, sample std) over the
planned seeds of each seed run's ``final_test_<metric>[_<modality>]``: the test score at the epoch chosen on
validation (never on test), grouped as ``dmgl report`` groups (:func:`~dmgl_cli.report.selection.group_runs`,
:meth:`~dmgl_cli.report.selection.Group.stat`). The difference is measured minus paper, in percentage points, and
each paper figure is placed against the measured mean's 95% t-interval (:func:`dmgl_cli.stats.t_interval`):
``inside``, ``below`` or ``above`` it (none with one seed). Inside: the paper's figure is consistent with the
measured seeds; below or above: the measured mean differs from it by more than its seed-to-seed uncertainty.

On a dataset the table covers, the rows with a figure for it are planned (Table 1's Channel and Greedy, "-" on
Sarcasm and Twitter2015, are not run there); ``--recipe`` trains them with another recipe, still against the
dataset's figures. A dataset none of these tables has figures for (the synthetic one, a custom dataset, Table 2's
NVGesture) has none to show: the table's rows are still planned, run and measured (Table 1: every method row, and one uni-modal row per modality of the dataset), with
the dataset's own recipe (or ``--recipe``). A dataset that one of these tables covers but this table does not
(``table5 --dataset crema-d``) is refused, naming the tables that have figures for it. A row that cannot run on the
dataset (a modality it lacks, a method that refuses the settings) is shown without a measurement, with the reason
in the table's notes; the other rows still run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from dmgl_cli.errors import DmglError
from dmgl_cli.reproduce.compare import FORMATS, Reproduction, compare, measured_cell, paper_against_interval
from dmgl_cli.reproduce.paper import TABLES, Column, PaperRow, PaperTable, paper_datasets, paper_tables
from dmgl_cli.reproduce.plan import REPRODUCE_TAG, Plan, PlannedRow, check_table, plan_reproduction, recipe_for

if TYPE_CHECKING:
    from dmgl_cli.tracking import Tracker

__all__ = [
    "FORMATS",
    "TABLES",
    "Column",
    "PaperRow",
    "PaperTable",
    "Plan",
    "PlannedRow",
    "Reproduction",
    "check_table",
    "compare",
    "measured_cell",
    "paper_against_interval",
    "paper_datasets",
    "paper_tables",
    "plan_reproduction",
    "recipe_for",
    "reproduce",
    "run_plan",
]


def run_plan(
    plan: Plan,
    *,
    tracker: Tracker,
    say: Callable[[str], None] = lambda text: None,
) -> None:
    """Train each row's missing seeds: one ``run.training.train`` per row (see the package docstring for why). A row
    whose training is refused (:class:`DmglError`) is marked skipped with the reason, and the other rows still run."""
    from dmgl_cli.run import training

    todo = [r for r in plan.rows if r.to_train and r.config is not None]
    for index, row in enumerate(todo, start=1):
        assert row.config is not None
        say(f"[{index}/{len(todo)}] {row.label} ({row.code}): training seed(s) {', '.join(map(str, row.to_train))}")

        def progress(seed: int, epoch: int, total: int, metrics: dict[str, float]) -> None:
            say(f"  seed {seed} epoch {epoch}/{total}  val acc {metrics.get('val_acc', float('nan')):.4f}")

        try:
            outcome = training.train(
                row.config,
                list(row.to_train),
                tracker=tracker,
                progress=progress,
                extra_tags={REPRODUCE_TAG: plan.table},
            )
        except DmglError as exc:  # this row cannot run here (e.g. the method refuses the data): the others still run
            row.skipped = f"training failed: {exc}"
            say(f"  {row.label}: {row.skipped}")
            continue
        for seed in outcome.seeds:
            row.trained[seed.seed] = seed.run_id
            say(f"  seed {seed.seed}: run {seed.run_id}, test acc {seed.final.get('test_acc', float('nan')):.4f}")
        row.to_train = [s for s in row.to_train if s not in row.trained]


def reproduce(
    table: str,
    dataset: str,
    *,
    tracker: Tracker,
    seeds: str = "3",
    recipe: str | None = None,
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
    say: Callable[[str], None] = lambda text: None,
) -> Reproduction:
    """Plan, train what is missing, and compare (see the module docstring)."""
    plan = plan_reproduction(
        table, dataset, tracker=tracker, seeds=seeds, recipe=recipe, overrides=overrides, only=only
    )
    run_plan(plan, tracker=tracker, say=say)
    return compare(plan, tracker=tracker)
