"""Create or join a sweep's Optuna study and work on it (:func:`run_sweep`): the study's plan and settings, its
MLflow sweep run, and what is recorded on that run once the study ends (see :mod:`dmgl_cli.sweep`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from dmgl_cli.config import parse_seeds
from dmgl_cli.errors import DmglError
from dmgl_cli.paths import default_optuna_storage, ensure_registry, safe_name
from dmgl_cli.strategies import parse_strategies
from dmgl_cli.sweep import DEFAULT_RECIPE, SweepRequest, base_config
from dmgl_cli.sweep.figures import close as close_figures
from dmgl_cli.sweep.figures import study_figures
from dmgl_cli.sweep.space import SETTINGS_VERSION, SweepSettings, check_plan
from dmgl_cli.sweep.storage import open_storage, quiet, redact
from dmgl_cli.sweep.summary import summary_table, trial_value
from dmgl_cli.sweep.worker import (
    StaleTrialHandler,
    TrialProgress,
    TrialRecord,
    Worker,
    pruner_for,
    sampler_for,
    trial_record,
)
from dmgl_cli.tables import Table, render_markdown, render_text
from dmgl_cli.tunables import parse_tune

if TYPE_CHECKING:
    from dmgl_cli.tracking import Tracker

SETTINGS_ATTR = "dmgl"
READY_ATTR = "dmgl_ready"
SWEEP_RUN_ATTR = "mlflow_sweep_run_id"
TRACKING_ATTR = "mlflow_tracking_uri"
DEFAULT_HEARTBEAT = 30  # seconds; grace period = 3 x interval


@dataclass
class SweepOutcome:
    study: str
    storage: str
    created: bool
    settings: SweepSettings
    sweep_run_id: str
    records: list[TrialRecord]
    ran: list[int]
    complete: bool
    interrupted: bool = False
    summary: Table | None = None

    def summary_text(self) -> str:
        return render_text(self.summary) if self.summary else ""


def _header(name: str, url: str, created: bool, settings: SweepSettings, sweep_run_id: str) -> str:
    return (
        f"study {name} ({'created' if created else 'joined'}) in {redact(url)}: {len(settings.strategies)} "
        f"strateg{'ies' if len(settings.strategies) > 1 else 'y'} x {settings.trials_per_strategy} trial(s) x "
        f"{len(settings.seeds)} seed(s), objective val_{settings.metric}; MLflow sweep run {sweep_run_id}"
    )


def _settings_from_request(request: SweepRequest, name: str) -> SweepSettings:
    recipe = request.recipe or DEFAULT_RECIPE
    overrides = request.config_overrides()
    config = base_config(request)
    specs = parse_strategies(request.strategies or "table4")
    tune = parse_tune(request.tune)
    if request.n_trials is not None and request.n_trials < 1:
        raise DmglError(f"--n-trials must be >= 1, got {request.n_trials}")
    if request.n_trials and request.n_trials > 1 and not tune:
        raise DmglError(
            "--n-trials N > 1 repeats each strategy N times, which only makes sense with --tune "
            "(add more seeds with --seeds instead)"
        )
    heartbeat = DEFAULT_HEARTBEAT if request.heartbeat is None else request.heartbeat
    if heartbeat < 1:
        raise DmglError(f"--heartbeat must be >= 1 second, got {heartbeat}")
    settings = SweepSettings(
        recipe=recipe,
        base_config=config.to_yaml(),
        overrides=overrides,
        strategies=[s.key for s in specs],
        tune=tune,
        trials_per_strategy=request.n_trials or 1,
        seeds=parse_seeds(request.seeds or "1", config.train.seed),
        metric=config.train.select_metric,
        prune=bool(tune) if request.prune is None else request.prune,
        heartbeat=heartbeat,
        experiment=config.experiment or config.dataset,
        dataset=config.dataset,
        method=config.method.name,
    )
    check_plan(settings)
    return settings


def _check_join(request: SweepRequest, settings: SweepSettings, name: str) -> None:
    """A worker joining a study takes its settings; an option that contradicts them is an error."""
    conflicts = []
    if request.recipe is not None and request.recipe != settings.recipe:
        conflicts.append(("--recipe", settings.recipe))
    wanted = list(request.overrides) + ([f"experiment={request.experiment}"] if request.experiment else [])
    if wanted and wanted != settings.overrides:
        conflicts.append(("--set/--experiment", " ".join(settings.overrides) or "(none)"))
    if request.strategies is not None and [s.key for s in parse_strategies(request.strategies)] != settings.strategies:
        conflicts.append(("--strategies", ",".join(settings.strategies)))
    if request.tune is not None and parse_tune(request.tune) != settings.tune:
        conflicts.append(("--tune", ",".join(settings.tune) or "(none)"))
    if request.seeds is not None:
        base = settings.base_dict()["train"]["seed"]
        if parse_seeds(request.seeds, base) != settings.seeds:
            conflicts.append(("--seeds", ",".join(map(str, settings.seeds))))
    if request.prune is not None and request.prune != settings.prune:
        conflicts.append(("--prune/--no-prune", "on" if settings.prune else "off"))
    if request.heartbeat is not None and request.heartbeat != settings.heartbeat:
        conflicts.append(("--heartbeat", str(settings.heartbeat)))
    if request.n_trials is not None and request.n_trials < settings.trials_per_strategy:
        conflicts.append(("--n-trials", f"{settings.trials_per_strategy} (it can only be raised)"))
    if conflicts:
        flags = ", ".join(f"{flag} (study has {value})" for flag, value in conflicts)
        raise DmglError(
            f"study {name!r} was created with other settings: {flags}; drop those options to join it, "
            "or pass a new --study name"
        )


def _read_settings(study: optuna.Study, wait_s: float = 30.0) -> SweepSettings:
    """The study's settings; waits while its creator (another process) is still setting it up."""
    deadline = time.time() + wait_s
    while True:
        attrs = study.user_attrs
        if attrs.get(READY_ATTR) and SETTINGS_ATTR in attrs:
            data = attrs[SETTINGS_ATTR]
            if data.get("version") != SETTINGS_VERSION:
                raise DmglError(
                    f"study {study.study_name!r} was made by another dmgl version (settings version "
                    f"{data.get('version')}); start a new study"
                )
            return SweepSettings(**data)
        # a study being set up by dmgl has no trials until its plan is enqueued; one with trials is someone else's
        foreign = SETTINGS_ATTR not in attrs and study.get_trials(deepcopy=False)
        if foreign or time.time() > deadline:
            raise DmglError(
                f"study {study.study_name!r} was not created by `dmgl sweep` (or its creator stopped "
                "before finishing it); pick another --study name"
            )
        time.sleep(0.5)


def _plan_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    ):
        key = trial.params.get("strategy") or trial.system_attrs.get("fixed_params", {}).get("strategy")
        counts[key] = counts.get(key, 0) + 1
    return counts


def _top_up(study: optuna.Study, settings: SweepSettings) -> int:
    """Enqueue what the plan lacks per strategy (all of it for a new study); returns how many were added."""
    counts = _plan_counts(study)
    added = 0
    for spec in settings.specs:
        for _ in range(settings.trials_per_strategy - counts.get(spec.key, 0)):
            study.enqueue_trial({"strategy": spec.key}, user_attrs={"strategy_label": spec.label})
            added += 1
    return added


def _create(
    request: SweepRequest, name: str, storage, url: str, tracker: Tracker
) -> tuple[optuna.Study, SweepSettings, bool]:
    """Create the study and its plan, or join it if another process created it first."""
    settings = _settings_from_request(request, name)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it meanwhile: join it
        study = optuna.load_study(study_name=name, storage=storage)
        joined = _read_settings(study)
        _check_join(request, joined, name)
        return study, joined, False
    experiment_id = tracker.experiment_id(settings.experiment)
    space = settings.search_space()
    sweep_run_id = tracker.start_run(
        experiment_id,
        f"sweep-{name}"[:100],
        {
            "dmgl.role": "sweep",
            "dmgl.sweep": name,
            "dmgl.dataset": settings.dataset,
            "dmgl.method": settings.method,
            "dmgl.recipe": settings.recipe,
            "optuna.study": name,
            "optuna.storage": redact(url),
        },
    )
    tracker.log_params(
        sweep_run_id,
        {
            "study": name,
            "storage": redact(url),
            "recipe": settings.recipe,
            "overrides": " ".join(settings.overrides),
            "strategies": ",".join(settings.strategies),
            "tune": json.dumps(settings.tune),
            "trials_per_strategy": settings.trials_per_strategy,
            "seeds": ",".join(map(str, settings.seeds)),
            "objective": f"val_{settings.metric} (mean over seeds, maximised)",
            "prune": settings.prune,
            "sampler": "TPE" if settings.tune else "grid",
            "heartbeat_s": settings.heartbeat,
        },
    )
    tracker.log_text(sweep_run_id, json.dumps(space, indent=2), "search_space.json")
    tracker.log_text(sweep_run_id, settings.base_config, "config.yaml")
    study.set_user_attr(SETTINGS_ATTR, asdict(settings))
    study.set_user_attr(SWEEP_RUN_ATTR, sweep_run_id)
    study.set_user_attr(TRACKING_ATTR, redact(tracker.uri))
    _top_up(study, settings)
    study.set_user_attr(READY_ATTR, True)
    return study, settings, True


def _check_tracking(study: optuna.Study, tracker: Tracker) -> str:
    """The study's sweep run id, which must be in ``tracker``'s store."""
    # Set by _create before it marks the study ready, and only ready studies get here (_read_settings).
    run_id = cast(str, study.user_attrs.get(SWEEP_RUN_ATTR))
    try:
        tracker.get_run(run_id)
    except DmglError:
        raise DmglError(
            f"the sweep run {run_id} of study {study.study_name!r} is not in the MLflow store "
            f"{tracker.uri}; point --tracking-uri at the store the study was created with "
            f"({study.user_attrs.get(TRACKING_ATTR)})"
        ) from None
    return run_id


def _sweep_run_status(tracker: Tracker, sweep_run_id: str, status: str) -> None:
    """RUNNING (owned by this worker: host/pid stamped for stale-run detection) or SCHEDULED (no worker holds it;
    the study is incomplete and other workers, or a later `dmgl sweep --study`, continue it)."""
    if status == "RUNNING":
        tracker.mark_running(sweep_run_id)
    else:
        tracker.set_status(sweep_run_id, status)


def _finish(
    tracker: Tracker,
    settings: SweepSettings,
    sweep_run_id: str,
    records: list[TrialRecord],
    summary: Table,
    status: str,
    trials: Sequence[FrozenTrial] = (),
) -> None:
    """Record the outcome on the sweep run (idempotent: any worker that sees the study end may do it): the best
    trial's metrics and tags, ``trials.csv``, ``summary.txt``, the summary table as the run's description, and
    Optuna's importance and parallel-coordinate figures of ``trials`` (:mod:`dmgl_cli.sweep.figures`)."""
    if status in ("FINISHED", "KILLED"):
        figures = study_figures(trials, settings.metric)
        for item in figures:
            tracker.log_figure(sweep_run_id, item.figure, item.artifact_file)
        close_figures(figures)
        drawn = ", ".join(f"`{item.artifact_file}`" for item in figures)
        tracker.set_description(
            sweep_run_id,
            render_markdown(summary, padded=True)
            + (f"\n\nOptuna's views of the tuned settings, in the artifacts: {drawn}\n" if drawn else ""),
        )
    if status == "FINISHED":
        done = [r for r in records if r.state == "COMPLETE" and r.value is not None]
        if done:
            best = max(done, key=trial_value)
            tracker.log_metrics(
                sweep_run_id,
                {
                    f"best_val_{settings.metric}": trial_value(best),
                    "complete_trials": len(done),
                    "trials": len(records),
                },
            )
            tracker.set_tags(
                sweep_run_id,
                {
                    "dmgl.best_trial": str(best.number),
                    "dmgl.best_strategy": best.strategy,
                    "dmgl.best_run_id": best.run_id or "",
                    "dmgl.best_params": json.dumps(best.params),
                },
            )
        lines = ["number,state,strategy,params,val_mean,val_std,test_mean,test_std,mlflow_run_id,retry_of"]
        for r in records:
            lines.append(
                ",".join(
                    [
                        str(r.number),
                        r.state,
                        r.strategy,
                        json.dumps(r.params).replace(",", ";"),
                        *("" if v is None else repr(v) for v in (r.value, r.value_std, r.test, r.test_std)),
                        r.run_id or "",
                        "" if r.retry_of is None else str(r.retry_of),
                    ]
                )
            )
        tracker.log_text(sweep_run_id, "\n".join(lines) + "\n", "trials.csv")
        tracker.log_text(sweep_run_id, render_text(summary), "summary.txt")
    tracker.end_run(sweep_run_id, status)


def run_sweep(
    request: SweepRequest,
    *,
    tracker: Tracker,
    on_trial: Callable[[TrialRecord], None] | None = None,
    on_message: Callable[[str], None] | None = None,
    on_epoch: Callable[[TrialProgress], None] | None = None,
) -> SweepOutcome:
    """Create or join a study and work on it until it is complete (see the module docstring); ``on_epoch`` hears
    every epoch of the trial this worker trains (the live progress line). Every MLflow run
    (the sweep run, each trial's runs) is read and written through ``tracker``."""
    on_trial = on_trial or (lambda record: None)
    on_message = on_message or (lambda text: None)
    url = request.storage or default_optuna_storage(ensure_registry())
    storage = open_storage(url)
    if request.study is not None:
        safe_name(request.study, "--study")
    known = optuna.get_all_study_names(storage)
    if request.study is not None and request.study in known:
        name, created = request.study, False
        study = optuna.load_study(study_name=name, storage=storage)
        settings = _read_settings(study)
        _check_join(request, settings, name)
        if request.n_trials and request.n_trials > settings.trials_per_strategy:
            settings.trials_per_strategy = request.n_trials
            study.set_user_attr(SETTINGS_ATTR, asdict(settings))
    else:
        if request.study is not None and request.strategies is None:
            raise DmglError(
                f"unknown study {request.study!r} in {redact(url)} (studies there: "
                f"{', '.join(sorted(known)) or 'none'}); to create it, pass --strategies"
            )
        recipe_stem = Path(request.recipe or DEFAULT_RECIPE).stem
        name = request.study or safe_name(f"{recipe_stem}-{time.strftime('%Y%m%d-%H%M%S')}", "study name")
        study, settings, created = _create(request, name, storage, url, tracker)
    sweep_run_id = _check_tracking(study, tracker)
    on_message(_header(name, url, created, settings, sweep_run_id))
    if not created:
        added = _top_up(study, settings)
        if added:
            on_message(f"re-enqueued {added} trial(s) the plan still lacked")
    if request.create_only:
        _sweep_run_status(tracker, sweep_run_id, "SCHEDULED")
        records = [trial_record(t, settings.metric) for t in study.get_trials(deepcopy=False)]
        return SweepOutcome(
            name,
            redact(url),
            created,
            settings,
            sweep_run_id,
            records,
            [],
            False,
            summary=summary_table(records, settings, name),
        )
    # The worker's own storage carries the study's heartbeat, so every worker judges staleness alike.
    worker_storage = open_storage(url, settings.heartbeat, StaleTrialHandler(tracker))
    with quiet():
        study = optuna.load_study(
            study_name=name, storage=worker_storage, sampler=sampler_for(settings), pruner=pruner_for(settings)
        )
    worker = Worker(study, settings, sweep_run_id, tracker, on_trial, on_message, request.device, on_epoch)
    _sweep_run_status(tracker, sweep_run_id, "RUNNING")
    try:
        ran, interrupted = worker.run()
    except BaseException:
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            _sweep_run_status(tracker, sweep_run_id, "SCHEDULED")
        else:
            _finish(tracker, settings, sweep_run_id, [], summary_table([], settings, name), "FAILED")
        raise
    records = [trial_record(t, settings.metric) for t in study.get_trials(deepcopy=False)]
    summary = summary_table(records, settings, name)
    pending = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    complete = not pending
    if complete:
        _finish(tracker, settings, sweep_run_id, records, summary, "FINISHED", study.get_trials(deepcopy=False))
    elif interrupted and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        _finish(tracker, settings, sweep_run_id, records, summary, "KILLED", study.get_trials(deepcopy=False))
    else:
        _sweep_run_status(tracker, sweep_run_id, "SCHEDULED")
    return SweepOutcome(
        name, redact(url), created, settings, sweep_run_id, records, ran, complete, interrupted, summary
    )
