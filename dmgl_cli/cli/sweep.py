"""``dmgl sweep``: parse, call :func:`dmgl_cli.sweep.study.run_sweep`, print. The logic lives in :mod:`dmgl_cli.sweep`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict

import click

from dmgl_cli.cli.options import json_option, silent_option, tracking_option
from dmgl_cli.cli.output import Messages, echo_json, view_line
from dmgl_cli.errors import DmglError, Interrupted
from dmgl_cli.links import run_url, ui_base


@click.command()
@click.option("--recipe", "-r", help="Recipe name or YAML path (new study; default synthetic).")
@click.option(
    "--strategies",
    "-s",
    metavar="SPECS",
    help="table4 (constant 0, 0.5, 1; stepwise h(0), h(1), h(0.05), h(0.95); heuristic; lb) or a list "
    "such as constant:0.5,stepwise:0.95,lb. Default for a new study: table4.",
)
@click.option(
    "--tune",
    metavar="NAMES",
    help="Hyperparameters tuned by TPE within each strategy: lr, weight_decay, dropout, tau, alpha_lr, "
    "initial_alpha, lb_scale; a range as lr=0.001:0.1.",
)
@click.option("--n-trials", type=int, help="Trials per strategy (with --tune; default 1).")
@click.option("--seeds", help="Seeds per trial: a count (from train.seed up) or a list 0,1,2. Default 1.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe setting.")
@click.option("--experiment", help="MLflow experiment (default: the dataset's name).")
@click.option("--study", help="Optuna study name: joins it if it exists (default: a new RECIPE-DATE-TIME study).")
@click.option(
    "--storage",
    metavar="URL",
    help="Optuna storage: sqlite:///PATH, postgresql://..., mysql://..., or journal:PATH (a journal file). "
    "Default: sqlite:///<registry>/optuna.db.",
)
@click.option(
    "--prune/--no-prune",
    default=None,
    help="Median-prune trials on the per-epoch validation metric (default: on with --tune, off otherwise).",
)
@click.option(
    "--heartbeat",
    type=int,
    metavar="SECONDS",
    help="Heartbeat interval of a new study (default 30); a trial silent for 3x this is failed and retried.",
)
@click.option("--create-only", is_flag=True, help="Create the study and its plan, then exit; start workers after.")
@click.option(
    "--devices",
    metavar="DEVICES",
    help="Start one worker process per device on the study and wait for all of them: cuda:0,cuda:1 (or cuda: "
    "every visible GPU), or cpu:N for N CPU workers (cpu: one). Each worker trains its trials with train.device "
    "set to its device and gets cores // N torch threads (OMP_NUM_THREADS, unless already set). The study is "
    "created first, by this process; Ctrl-C stops every worker and leaves the study resumable.",
)
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the base config of the trials and each strategy's settings (YAML; JSON with --json) and exit; "
    "opens no study or MLflow store.",
)
@click.option("--worker-device", hidden=True, help="(internal: a worker started by --devices) train.device to use.")
@tracking_option
@json_option
@silent_option(help="Print only the summary.")
def sweep(devices, print_config, tracking_uri, as_json, silent, **options) -> None:
    """Compare integration strategies (and tune within each) with Optuna; every trial is an MLflow run.

    Each trial trains --seeds seeds and scores the mean validation metric (never test). Several workers, on one
    machine or many, can join one study through a shared --storage; a dead worker's trial is retried, and Ctrl-C
    leaves the study resumable: run the same `dmgl sweep --study NAME` again. With --json the outcome (study,
    trials, the best trial, MLflow UI links) is one JSON document on stdout; progress goes to stderr.

    \b
    Examples:
      dmgl sweep --recipe synthetic --strategies table4 --seeds 2
      dmgl sweep --strategies constant:0.5,stepwise:0.95,lb --study cmp
      dmgl sweep --strategies lb --tune lr,alpha_lr --n-trials 20 --study lb-tune
      dmgl sweep --study cmp --storage journal:/shared/optuna.log --strategies table4 --create-only
      dmgl sweep --study cmp --storage journal:/shared/optuna.log      # on each worker machine
      dmgl sweep --strategies table4 --seeds 3 --study cmp --devices cuda:0,cuda:1,cuda:2,cuda:3
      dmgl sweep --study cmp --devices cpu:2                            # two CPU workers
      dmgl sweep --strategies table4 --json --silent | jq .best
      dmgl report --sweep cmp --table strategies --format latex
      dmgl sweep --strategies table4 --set train.epochs=5 --print-config   # what the trials would train
    """
    from dmgl_cli.sweep import SweepRequest, check_request

    device = options.pop("worker_device")
    request = check_request(SweepRequest(**{**options, "overrides": list(options["overrides"]), "device": device}))
    if print_config:
        from dmgl_cli.run_queries import sweep_config_listing

        listing = sweep_config_listing(request)
        if as_json:
            echo_json(listing.to_dict())
        else:
            click.echo(listing.text(), nl=False)
        return
    with _interrupts(request.study):
        from dmgl_cli.tracking import Tracker

        tracker = Tracker(tracking_uri)
        if devices is not None:
            _launch(request, devices, tracker, as_json, silent, _messages(silent))
            return
        _run_here(request, tracker, as_json, silent)


def _messages(silent: bool):
    """Where the sweep's own messages go: stderr, unless --silent."""

    def on_message(text: str) -> None:
        if not silent:
            click.echo(text, err=True)

    return on_message


def _run_here(request, tracker, as_json: bool, silent: bool) -> None:
    """Work on the study in this process (:func:`dmgl_cli.sweep.study.run_sweep`) and print its outcome."""
    from dmgl_cli.sweep.study import run_sweep

    say = Messages(as_json=as_json, silent=silent)
    on_message = _messages(silent)
    outcome = run_sweep(
        request,
        tracker=tracker,
        on_trial=lambda record: say(record.line()),
        on_message=on_message,
        on_epoch=lambda progress: on_message(progress.line()),  # live: trial, seed, epoch, val metric
    )
    if request.device is not None:  # started by --devices: the launcher prints the summary
        if outcome.interrupted:
            click.echo("interrupted; the study is resumable (a trial of this worker went back to the queue)", err=True)
            raise SystemExit(130)
        say(f"this worker ran {len(outcome.ran)} trial(s)")
        return
    sweep_run = tracker.get_run(outcome.sweep_run_id)
    base = ui_base(tracker.uri)
    url = run_url(base, sweep_run.experiment_id, outcome.sweep_run_id)
    if as_json:
        echo_json(_document(outcome, sweep_run.experiment_id, base))
        if not silent and outcome.summary is not None and not request.create_only:
            click.echo(outcome.summary_text(), nl=False, err=True)
        if outcome.interrupted:
            click.echo(f"\nInterrupted; the study is resumable: `dmgl sweep --study {outcome.study}`", err=True)
            raise SystemExit(130)
        return
    storage = request.storage
    if request.create_only:
        click.echo(
            f"study {outcome.study} is ready ({outcome.settings.total_trials} trials queued); start workers "
            f"with: dmgl sweep --study {outcome.study}" + (f" --storage {storage}" if storage else "")
        )
        click.echo(view_line(url))
        return
    click.echo(outcome.summary_text(), nl=False)
    if outcome.interrupted:
        click.echo(
            f"\nInterrupted; the study is resumable (an interrupted trial goes back to the queue): "
            f"`dmgl sweep --study {outcome.study}" + (f" --storage {storage}`" if storage else "`"),
            err=True,
        )
        raise SystemExit(130)
    state = "complete" if outcome.complete else "not complete yet (other workers are still running trials)"
    click.echo(f"study {outcome.study} is {state}; this worker ran {len(outcome.ran)} trial(s)")
    click.echo(browse_line(outcome.storage, outcome.study))
    click.echo(view_line(url))


@contextlib.contextmanager
def _interrupts(study: str | None) -> Iterator[None]:
    """Ctrl-C / SIGTERM outside a trial (starting up, joining, summing up): nothing of this worker is left running
    and the study, once created, is resumable. (Inside a trial the worker re-enqueues it and returns.)"""
    try:
        yield
    except (KeyboardInterrupt, Interrupted):
        how = f"`dmgl sweep --study {study}`" if study else "`dmgl sweep --study NAME`"
        click.echo(f"\nInterrupted; no trial of this worker is left running; continue the study with {how}", err=True)
        raise SystemExit(130) from None


def _launch(request, devices: str, tracker, as_json: bool, silent: bool, on_message) -> None:
    """``--devices``: one worker process per device (:func:`dmgl_cli.sweep.launcher.launch`), then the summary."""
    from dmgl_cli.sweep.launcher import launch

    def on_line(label: str, text: str, is_stderr: bool) -> None:
        click.echo(f"[{label}] {text}", err=as_json or is_stderr)

    launched = launch(request, devices, tracker=tracker, silent=silent, on_line=on_line, on_message=on_message)
    outcome = launched.sweep
    sweep_run = tracker.get_run(outcome.sweep_run_id)
    base = ui_base(tracker.uri)
    workers = ", ".join(f"{w.label} ran {len(w.trials)} trial(s)" for w in launched.workers)
    if as_json:
        document = _document(outcome, sweep_run.experiment_id, base)
        document["workers"] = [asdict(w) for w in launched.workers]
        echo_json(document)
        if not silent and outcome.summary is not None:
            click.echo(outcome.summary_text(), nl=False, err=True)
    else:
        click.echo(outcome.summary_text(), nl=False)
    if outcome.interrupted:
        click.echo(f"\nInterrupted ({workers}); the study is resumable: `{launched.command}`", err=True)
        raise SystemExit(130)
    if launched.failed:
        raise DmglError(launched.failure_message())
    if as_json:
        return
    state = "complete" if outcome.complete else "not complete yet (other workers are still running trials)"
    click.echo(f"study {outcome.study} is {state}; {workers}")
    click.echo(browse_line(outcome.storage, outcome.study))
    click.echo(view_line(run_url(base, sweep_run.experiment_id, outcome.sweep_run_id)))


def browse_line(storage: str, study: str) -> str:
    """Where to look next: the MLflow UI (the sweep run holds the summary and Optuna's figures), optuna-dashboard on
    the study's storage when it is installed (`pip install 'dmgl[dashboard]'`), the strategies table."""
    import importlib.util

    dashboard = f"optuna-dashboard {storage}  |  " if importlib.util.find_spec("optuna_dashboard") else ""
    return f"browse: dmgl ui  |  {dashboard}dmgl report --sweep {study} --table strategies"


def _document(outcome, experiment_id: str, base: str) -> dict:
    """The sweep's outcome for --json: the study, every trial (with its MLflow link) and the best trial."""
    trials = [
        {**asdict(r), "url": run_url(base, experiment_id, r.run_id) if r.run_id else None} for r in outcome.records
    ]
    done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    return {
        "study": outcome.study,
        "storage": outcome.storage,
        "created": outcome.created,
        "complete": outcome.complete,
        "interrupted": outcome.interrupted,
        "sweep_run_id": outcome.sweep_run_id,
        "experiment": outcome.settings.experiment,
        "experiment_id": experiment_id,
        "url": run_url(base, experiment_id, outcome.sweep_run_id),
        "objective": f"val_{outcome.settings.metric}",
        "strategies": outcome.settings.strategies,
        "seeds": outcome.settings.seeds,
        "ran": outcome.ran,
        "trials": trials,
        "best": max(done, key=lambda t: t["value"]) if done else None,
    }
