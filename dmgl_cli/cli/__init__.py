"""The ``dmgl`` command line: parse, call one function, print. No training logic lives here.

One module per command group (``prepare``, ``datasets``, ``train``, ``evaluate``, ``runs``, ``ui``, ``recipes``,
``sweep``, ``report``, ``register``); shared options in :mod:`dmgl_cli.cli.options`, how results print (``--json``,
tables, links, the progress bar) in :mod:`dmgl_cli.cli.output`, the group class in :mod:`dmgl_cli.cli.base`.
Command modules never import this package's ``__init__``; it imports them and registers each command below.
"""

from __future__ import annotations

import functools
import os

import click

from dmgl_cli import __version__
from dmgl_cli.cli import (
    datasets,
    evaluate,
    explain,
    prepare,
    recipes,
    register,
    report,
    reproduce,
    runs,
    sweep,
    train,
    ui,
)
from dmgl_cli.cli.base import DmglGroup

__all__ = ["DmglGroup", "cli", "main"]


@click.group(cls=DmglGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dmgl")
def cli() -> None:
    """dmgl — Dynamic Modality Gap Learning for imbalanced multimodal classification.

    Trains a multimodal classifier on (1 - alpha) * cross-entropy + alpha * modality matching, with alpha
    constant, stepwise, heuristic or learned by bilevel optimisation (NeurIPS 2024), and records every run in
    MLflow under ./registry (or $DMGL_HOME).

    \b
    Quick start:
      dmgl prepare synthetic
      dmgl train --recipe synthetic --strategy lb --seeds 3
      dmgl ui
    """
    _route_warnings()
    _quiet_mlflow()


def _quiet_mlflow() -> None:
    """No MLflow "Downloading artifacts" bars: `dmgl eval` and `dmgl train --resume` read config.yaml and
    checkpoints through MLflow, and only dmgl's own output should reach the terminal (read when MLflow downloads)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _route_warnings() -> None:
    """dmgl's warnings (stale runs, storages that cannot be shared) go to stderr as one line each."""
    import logging

    log = logging.getLogger("dmgl")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
        log.propagate = False


# Every command, registered explicitly (``dmgl --help`` lists them sorted by name). The submodules stay
# reachable as ``dmgl_cli.cli.train`` etc.: import the modules here, never their same-named commands.
cli.add_command(prepare.prepare)
cli.add_command(datasets.datasets)
cli.add_command(train.train)
cli.add_command(evaluate.eval_command)
cli.add_command(runs.runs)
cli.add_command(ui.ui)
cli.add_command(recipes.recipes)
cli.add_command(sweep.sweep)
cli.add_command(report.report)
cli.add_command(register.register)
cli.add_command(explain.explain)
cli.add_command(reproduce.reproduce)


def main() -> None:
    """The ``dmgl`` process (console script, ``python -m dmgl_cli``): the command, then an exit without the
    interpreter's 1-2 s teardown (:mod:`dmgl_cli.quick_exit`)."""
    from dmgl_cli.quick_exit import run_then_exit

    run_then_exit(functools.partial(cli, prog_name="dmgl"))
