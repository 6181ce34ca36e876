"""``dmgl sweep``: compare integration strategies, and tune hyperparameters within each, with Optuna.

The only module that imports Optuna. Design:

* **A study is a plan.** Creating a study records its settings (resolved base config, strategies, tuned ranges,
  seeds, trials per strategy) as a study user attribute and enqueues one WAITING trial per (strategy, repeat)
  with the strategy fixed. Workers only *claim* waiting trials — Optuna's own atomic pop of its trial queue —
  and never create trials of their own, so several workers on one or many machines complete exactly the
  requested trials, none lost or duplicated. Without ``--tune`` this queue is the grid of strategies; with
  ``--tune`` each trial's remaining parameters are sampled by TPE under per-strategy names (``lr@lb``), so the
  model of each strategy learns from that strategy's trials only, and pruning compares a trial with the median
  of its own strategy's trials at the same step.
* **Dead workers.** A claimed trial is kept alive by Optuna's heartbeat protocol. RDB storages (SQLite,
  PostgreSQL, MySQL) implement it natively; Optuna's journal storage does not (Optuna 5), so
  :class:`HeartbeatJournalStorage` implements the same protocol by stamping the running trial's system attribute
  (machines sharing a journal file need clocks agreeing to well within the grace period). A trial whose heartbeat
  is older than the grace period (3x the study's interval) is failed by the next worker that looks, its MLflow
  runs marked FAILED, and it is re-enqueued (``RetryHeartbeatStaleTrialCallback``). A worker with nothing left to
  claim waits while other workers' trials run, so one surviving worker finishes a study.
* **Ctrl-C** stops training (runs marked KILLED by the runner), fails the trial, re-enqueues it and leaves the
  study resumable: ``dmgl sweep --study NAME`` continues. A trial that raises an error is failed and not retried
  automatically (errors repeat); running ``dmgl sweep --study NAME`` again re-enqueues what the plan lacks.
* **MLflow.** One sweep run (``dmgl.role=sweep``) holds the study name, storage, search space and, once the study
  is complete, the best result. Each trial is one ``runner.train`` parent run nested under it with a child per
  seed; the trial keeps its parent run id as the user attribute ``mlflow_run_id``. The objective is the mean over
  seeds of the validation metric at each seed's validation-selected epoch — never test.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import optuna
import sqlalchemy.exc
import yaml
from optuna.storages import RDBStorage, fail_stale_trials

# Optuna's heartbeat protocol (the base class RDBStorage implements, and the thread optimize() runs) is not
# exported; it is the only way to give the journal storage the same stale-trial handling as RDB storages.
from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from dmgl_cli.config import Config, config_from_dict, load_config, parse_seeds, validate
from dmgl_cli.errors import DmglError, Interrupted
from dmgl_cli.paths import default_optuna_storage, ensure_registry, safe_name, warn_if_shared_sqlite
from dmgl_cli.report import Cell, Row, StrategySpec, Table, mark_best, parse_strategies, parse_strategy, render_text
from dmgl_cli.runner import Stopped

optuna.logging.set_verbosity(optuna.logging.WARNING)
RetryStaleTrial = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
    optuna.storages.RetryFailedTrialCallback  # the name before Optuna 4.9

SETTINGS_ATTR = "dmgl"
READY_ATTR = "dmgl_ready"
SWEEP_RUN_ATTR = "mlflow_sweep_run_id"
TRACKING_ATTR = "mlflow_tracking_uri"
RUN_ATTR = "mlflow_run_id"
MAX_RETRIES = 3  # heartbeat-stale retries of one trial
DEFAULT_HEARTBEAT = 30  # seconds; grace period = 3 x interval
SETTINGS_VERSION = 1


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning (heartbeat, retry callback) around the calls that raise it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class PrunedTrial(Stopped, optuna.TrialPruned):
    """Raised from the epoch callback: the runner marks the runs KILLED, Optuna's tell records PRUNED."""


# ------------------------------------------------------------------------------------------- tunables


@dataclass(frozen=True)
class Tunable:
    key: str  # config setting
    low: float
    high: float
    log: bool
    strategies: tuple[str, ...] | None = None  # strategy names it applies to; None: all
    help: str = ""

    def applies(self, spec: StrategySpec) -> bool:
        if self.strategies is not None and spec.name not in self.strategies:
            return False
        # alpha = 0 has no matching loss, so its settings change nothing there
        return not (self.key.startswith("loss.") and spec.name == "constant" and spec.value == 0.0)


TUNABLE: dict[str, Tunable] = {
    "lr": Tunable("optim.lr", 1e-4, 1e-1, True, help="learning rate"),
    "weight_decay": Tunable("optim.weight_decay", 1e-6, 1e-2, True, help="weight decay"),
    "dropout": Tunable("model.dropout", 0.0, 0.5, False, help="dropout before the head"),
    "tau": Tunable("loss.tau", 0.02, 1.0, True, help="temperature of the matching loss"),
    "alpha_lr": Tunable("strategy.lb.alpha_lr", 0.005, 0.5, True, ("lb",), "step size of alpha (lb; with adam, about "
                        "how far one update moves alpha)"),
    "initial_alpha": Tunable("strategy.lb.initial_alpha", 0.0, 1.0, False, ("lb",), "alpha at the start (lb)"),
    "lb_scale": Tunable("strategy.lb.scale", 1e-3, 1e-1, True, ("lb",), "identity's look-ahead step or Neumann's series step (lb)"),
}


def parse_tune(text: str | None) -> dict[str, list]:
    """``lr,tau`` or ``lr=1e-3:1e-1,alpha_lr`` -> {name: [low, high, log]}."""
    if not text:
        return {}
    tune: dict[str, list] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, bounds = part.partition("=")
        name = name.strip()
        if name not in TUNABLE:
            raise DmglError(f"--tune: unknown hyperparameter {name!r}; tunable: "
                            + ", ".join(f"{n} ({t.key})" for n, t in TUNABLE.items()))
        tunable = TUNABLE[name]
        low, high = tunable.low, tunable.high
        if bounds:
            try:
                low_text, high_text = bounds.split(":")
                low, high = float(low_text), float(high_text)
            except ValueError:
                raise DmglError(f"--tune {part!r}: a range looks like {name}=LOW:HIGH, e.g. lr=0.001:0.1") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise DmglError(f"--tune {part!r}: LOW must be below HIGH, got {low}:{high}")
        if tunable.log and low <= 0:
            raise DmglError(f"--tune {part!r}: {name} is searched on a log scale, so LOW must be > 0")
        if name in tune:
            raise DmglError(f"--tune lists {name} more than once")
        tune[name] = [low, high, tunable.log]
    return tune


# ------------------------------------------------------------------------------------------- settings


@dataclass
class SweepSettings:
    """What a study was created with; stored in the study (user attribute ``dmgl``) so workers need nothing else."""

    recipe: str
    base_config: str  # resolved config YAML (recipe + --set), before strategy and tuned settings
    overrides: list[str]
    strategies: list[str]  # spec keys, in order
    tune: dict[str, list]
    trials_per_strategy: int
    seeds: list[int]
    metric: str  # the validation metric: val_<metric> is the objective
    prune: bool
    heartbeat: int
    experiment: str
    dataset: str
    method: str
    version: int = SETTINGS_VERSION

    @property
    def specs(self) -> list[StrategySpec]:
        return [parse_strategy(k) for k in self.strategies]

    @property
    def total_trials(self) -> int:
        return len(self.strategies) * self.trials_per_strategy

    def search_space(self) -> dict[str, Any]:
        space: dict[str, Any] = {"strategy": {"type": "categorical", "choices": self.strategies}}
        for spec in self.specs:
            for name, (low, high, log) in self.tune.items():
                if TUNABLE[name].applies(spec):
                    space[f"{name}@{spec.key}"] = {"type": "float", "low": low, "high": high, "log": log,
                                                   "setting": TUNABLE[name].key}
        return space

    def base_dict(self) -> dict[str, Any]:
        return yaml.safe_load(self.base_config)


def _set_setting(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def trial_config(base: dict[str, Any], settings: dict[str, Any]) -> Config:
    """The base config with dotted ``settings`` applied (values kept as Python numbers), validated."""
    data = copy.deepcopy(base)
    for dotted, value in settings.items():
        _set_setting(data, dotted, value)
    config = config_from_dict(data)
    validate(config)
    return config


def _tuned_settings(spec: StrategySpec, tune: dict[str, list], values: dict[str, float]) -> dict[str, Any]:
    settings = spec.settings()
    for name, value in values.items():
        settings[TUNABLE[name].key] = value
    return settings


def _check_plan(settings: SweepSettings) -> None:
    """Fail at creation, not in trial 7: every strategy (at both ends of every tuned range) must make a valid
    config that its method accepts, and the dataset must be prepared."""
    from dmgl_cli.methods import build_method
    from dmgl_cli.runner import open_dataset

    base = settings.base_dict()
    open_dataset(settings.dataset)
    for spec in settings.specs:
        applicable = {n: r for n, r in settings.tune.items() if TUNABLE[n].applies(spec)}
        for end in (0, 1):
            try:
                config = trial_config(base, _tuned_settings(spec, settings.tune,
                                                            {n: r[end] for n, r in applicable.items()}))
                build_method(config)
            except DmglError as exc:
                where = f" with {', '.join(f'{n}={r[end]:g}' for n, r in applicable.items())}" if applicable else ""
                raise DmglError(f"strategy {spec.key}{where}: {exc}") from None
            if not applicable:
                break
    for name in settings.tune:
        if not any(TUNABLE[name].applies(s) for s in settings.specs):
            only = ", ".join(TUNABLE[name].strategies or ())
            raise DmglError(f"--tune {name} applies only to {only}; add it to --strategies or drop {name}")


# -------------------------------------------------------------------------------------------- storage


def redact(url: str) -> str:
    """The storage URL without its password, for logs, tags and messages."""
    parsed = urlparse(url)
    if parsed.password:
        netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
        return urlunparse(parsed._replace(netloc=netloc))
    return url


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal:"):
        rest = url[len("journal:"):]
        return Path(rest[2:] if rest.startswith("//") else rest).expanduser()
    if "://" not in url and url.endswith((".log", ".journal", ".jsonl")):
        return Path(url).expanduser()
    return None


def _check_journal(path: Path) -> None:
    """Every complete line of a journal must be a JSON record. (Optuna tolerates a torn last line, which a
    crashed writer leaves, but raises on a bad line only once another follows — after we appended to it.)"""
    if not path.is_file():
        return
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                continue
            try:
                json.loads(line)
            except ValueError:
                raise DmglError(f"cannot open Optuna storage journal:{path}: line {number} is not an Optuna "
                                "journal record; point --storage at the right file or start a new one") from None


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with Optuna's heartbeat protocol (see the module docstring)."""

    HEARTBEAT_ATTR = "dmgl:heartbeat"

    def __init__(self, backend: JournalFileBackend, heartbeat_interval: int | None, grace_period: int | None,
                 stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, self.HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker declared this trial dead; the worker's tell will say so

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(self.HEARTBEAT_ATTR)
            if beat is None:
                beat = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - float(beat) > (self.grace_period or math.inf):
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.stale_trial_callback

    def get_failed_trial_callback(self):  # the same hook under its name before Optuna 4.9
        return self.stale_trial_callback


def open_storage(url: str, heartbeat: int | None = None,
                 stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None):
    """An Optuna storage for ``url``: an RDB URL (sqlite:///, postgresql://, mysql://) or a journal file
    (``journal:PATH`` or a path ending in .log). Anything that cannot be opened is a DmglError."""
    grace = 3 * heartbeat if heartbeat else None
    if url.startswith(("redis://", "rediss://", "http://", "https://")):
        raise DmglError(f"Optuna storage {redact(url)} is not supported by dmgl; use sqlite:///PATH, "
                        "postgresql://..., mysql://... or journal:PATH")
    journal = _journal_path(url)
    try:
        with _quiet():
            if journal is not None:
                if journal.is_dir() or not journal.parent.is_dir():
                    raise DmglError(f"cannot open the Optuna journal {journal}: "
                                    + ("it is a folder" if journal.is_dir() else f"folder {journal.parent} does not exist"))
                _check_journal(journal)
                storage = HeartbeatJournalStorage(JournalFileBackend(str(journal)), heartbeat, grace,
                                                  stale_trial_callback)
            elif "://" in url:
                if url.startswith("sqlite:///"):
                    warn_if_shared_sqlite(Path(url[len("sqlite:///"):]), "Optuna storage")
                callback_arg = ("heartbeat_stale_trial_callback"
                                if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback") else "failed_trial_callback")
                kwargs = {"heartbeat_interval": heartbeat, "grace_period": grace, callback_arg: stale_trial_callback} \
                    if heartbeat else {}
                storage = RDBStorage(url, **kwargs)
            else:
                raise DmglError(f"--storage {url!r} is not a storage URL; use sqlite:///PATH, postgresql://USER@HOST/DB, "
                                "mysql://USER@HOST/DB or journal:PATH")
            storage.get_all_studies()  # reads the store now, so a broken one fails here with a clear message
    except DmglError:
        raise
    except ImportError as exc:
        raise DmglError(f"cannot open Optuna storage {redact(url)}: its database driver is not installed "
                        f"({exc.name or exc}); pip install it (e.g. psycopg2-binary or pymysql)") from None
    except (ValueError, RuntimeError, OSError, KeyError, sqlalchemy.exc.SQLAlchemyError) as exc:
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise DmglError(f"cannot open Optuna storage {redact(url)}: {detail}") from None
    return storage


class _StaleTrialHandler:
    """Called for a trial whose worker stopped beating: its MLflow runs are marked FAILED, then it is retried."""

    def __init__(self, tracking_uri: str | None):
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            from dmgl_cli.tracking import Tracker

            try:
                tracker = Tracker(self.tracking_uri)
                for run in [tracker.get_run(run_id), *tracker.children(run_id)]:
                    if run.info.status == "RUNNING":
                        tracker.end_run(run.info.run_id, "FAILED")
            except DmglError:
                pass  # the run lives in another MLflow store; the Optuna side is what must not block
        with _quiet():
            RetryStaleTrial(max_retry=MAX_RETRIES)(study, trial)


# ---------------------------------------------------------------------------------------------- records


@dataclass
class TrialRecord:
    number: int
    state: str
    strategy: str
    label: str
    params: dict[str, float]
    value: float | None = None
    value_std: float | None = None
    test: float | None = None
    test_std: float | None = None
    run_id: str | None = None
    seconds: float | None = None
    message: str = ""
    retry_of: int | None = None
    metric: str = "acc"

    def line(self) -> str:
        metric = self.metric
        params = " ".join(f"{k}={v:.4g}" for k, v in self.params.items())
        head = f"trial {self.number:>3} {self.label:<10} {params + ' ' if params else ''}"
        took = f" {self.seconds:.0f}s" if self.seconds is not None else ""
        run = f"  run {self.run_id}" if self.run_id else ""
        if self.state == "COMPLETE":
            std = f" ± {self.value_std:.4f}" if self.value_std else ""
            test = f"  (test {metric} {self.test:.4f})" if self.test is not None else ""
            return f"{head}val {metric} {self.value:.4f}{std}{test}{took}{run}"
        return f"{head}{self.state.lower()}{': ' + self.message if self.message else ''}{took}{run}"


def _record(trial: FrozenTrial, metric: str) -> TrialRecord:
    strategy = trial.params.get("strategy") or trial.system_attrs.get("fixed_params", {}).get("strategy", "?")
    params = {k.split("@")[0]: float(v) for k, v in trial.params.items() if "@" in k}
    attrs = trial.user_attrs
    seconds = None
    if trial.datetime_start and trial.datetime_complete:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    label = parse_strategy(strategy).label if strategy != "?" else "?"
    return TrialRecord(trial.number, trial.state.name, strategy, label, params,
                       trial.value if trial.state == TrialState.COMPLETE else None, attrs.get("val_std"),
                       attrs.get("test_mean"), attrs.get("test_std"), attrs.get(RUN_ATTR), seconds,
                       attrs.get("message") or "", trial.system_attrs.get("failed_trial"), metric)


_STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "RUNNING": "running", "WAITING": "waiting",
                "FAIL": "failed"}


def summary_table(records: list[TrialRecord], settings: SweepSettings, study_name: str) -> Table:
    """Per strategy: trials by state and the best trial (by validation, the objective) with its test score."""
    metric = settings.metric.upper()
    table = Table("sweep", f"Sweep {study_name}: best trial per strategy ({settings.trials_per_strategy} trial(s) "
                  f"x {len(settings.seeds)} seed(s) each; chosen on validation {metric})",
                  ["Strategy", "Trials"], [f"val {metric}", f"test {metric}", "params", "MLflow run"], marks="column")
    for spec in settings.specs:
        mine = [r for r in records if r.strategy == spec.key]
        counts = {name: sum(r.state == state for r in mine) for state, name in _STATE_NAMES.items()}
        state = ", ".join(f"{n} {name}" for name, n in counts.items() if n) or "none"
        done = [r for r in mine if r.state == "COMPLETE" and r.value is not None]
        best = max(done, key=lambda r: r.value) if done else None
        n = len(settings.seeds)
        cells = [Cell(best.value, best.value_std, n) if best else Cell(),
                 Cell(best.test, best.test_std, n) if best and best.test is not None else Cell(),
                 Cell.literal(" ".join(f"{k}={v:.3g}" for k, v in best.params.items()) if best else ""),
                 Cell.literal(best.run_id or "" if best else "")]
        table.rows.append(Row([spec.label, state], cells))
    mark_best([row.cells[0] for row in table.rows])
    return table


# -------------------------------------------------------------------------------------------- the sweep


@dataclass
class SweepRequest:
    """What the command line asked for; None means "not given" (a joining worker takes the study's)."""

    study: str | None = None
    storage: str | None = None
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    strategies: str | None = None
    tune: str | None = None
    n_trials: int | None = None
    seeds: str | None = None
    experiment: str | None = None
    prune: bool | None = None
    heartbeat: int | None = None
    tracking_uri: str | None = None
    create_only: bool = False


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
    return (f"study {name} ({'created' if created else 'joined'}) in {redact(url)}: {len(settings.strategies)} "
            f"strateg{'ies' if len(settings.strategies) > 1 else 'y'} x {settings.trials_per_strategy} trial(s) x "
            f"{len(settings.seeds)} seed(s), objective val_{settings.metric}; MLflow sweep run {sweep_run_id}")


def _settings_from_request(request: SweepRequest, name: str) -> SweepSettings:
    recipe = request.recipe or "synthetic"
    overrides = list(request.overrides)
    if request.experiment:
        overrides.append(f"experiment={request.experiment}")
    config = load_config(recipe, overrides)
    specs = parse_strategies(request.strategies or "table4")
    tune = parse_tune(request.tune)
    if request.n_trials is not None and request.n_trials < 1:
        raise DmglError(f"--n-trials must be >= 1, got {request.n_trials}")
    if request.n_trials and request.n_trials > 1 and not tune:
        raise DmglError("--n-trials N > 1 repeats each strategy N times, which only makes sense with --tune "
                        "(add more seeds with --seeds instead)")
    heartbeat = DEFAULT_HEARTBEAT if request.heartbeat is None else request.heartbeat
    if heartbeat < 1:
        raise DmglError(f"--heartbeat must be >= 1 second, got {heartbeat}")
    settings = SweepSettings(
        recipe=recipe, base_config=config.to_yaml(), overrides=overrides, strategies=[s.key for s in specs],
        tune=tune, trials_per_strategy=request.n_trials or 1,
        seeds=parse_seeds(request.seeds or "1", config.train.seed), metric=config.train.select_metric,
        prune=bool(tune) if request.prune is None else request.prune, heartbeat=heartbeat,
        experiment=config.experiment or config.dataset, dataset=config.dataset, method=config.method.name,
    )
    _check_plan(settings)
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
        base = yaml.safe_load(settings.base_config)["train"]["seed"]
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
        raise DmglError(f"study {name!r} was created with other settings: {flags}; drop those options to join it, "
                        "or pass a new --study name")


def _read_settings(study: optuna.Study, wait_s: float = 30.0) -> SweepSettings:
    """The study's settings; waits while its creator (another process) is still setting it up."""
    deadline = time.time() + wait_s
    while True:
        attrs = study.user_attrs
        if attrs.get(READY_ATTR) and SETTINGS_ATTR in attrs:
            data = attrs[SETTINGS_ATTR]
            if data.get("version") != SETTINGS_VERSION:
                raise DmglError(f"study {study.study_name!r} was made by another dmgl version (settings version "
                                f"{data.get('version')}); start a new study")
            return SweepSettings(**data)
        # a study being set up by dmgl has no trials until its plan is enqueued; one with trials is someone else's
        foreign = SETTINGS_ATTR not in attrs and study.get_trials(deepcopy=False)
        if foreign or time.time() > deadline:
            raise DmglError(f"study {study.study_name!r} was not created by `dmgl sweep` (or its creator stopped "
                            "before finishing it); pick another --study name")
        time.sleep(0.5)


def _plan_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                          TrialState.RUNNING, TrialState.WAITING)):
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


def _sampler(settings: SweepSettings):
    """TPE for tuned settings. Without --tune every parameter is fixed by the queue (the queue is the grid), so
    the sampler is never asked; not GridSampler, whose bookkeeping assumes it assigned the grid points itself."""
    return optuna.samplers.TPESampler() if settings.tune else optuna.samplers.RandomSampler()


class StrategyMedianPruner(optuna.pruners.BasePruner):
    """Median pruning among the finished trials *of the same strategy*: a trial stops when its best intermediate
    value is below the median of those trials at the same step (after ``n_startup_trials`` of them finished and
    past ``n_warmup_steps``). Steps are epochs counted across the trial's seeds."""

    def __init__(self, n_startup_trials: int = 3, n_warmup_steps: int = 1) -> None:
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step <= self.n_warmup_steps:
            return False
        strategy = trial.params.get("strategy")
        peers = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.params.get("strategy") == strategy and step in t.intermediate_values]
        peers = [v for v in peers if math.isfinite(v)]
        if len(peers) < self.n_startup_trials:
            return False
        values = [v for v in trial.intermediate_values.values() if math.isfinite(v)]
        if not values:
            return True
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        best = max(values) if maximize else min(values)
        median = statistics.median(peers)
        return best < median if maximize else best > median


def _pruner(settings: SweepSettings):
    return StrategyMedianPruner() if settings.prune else optuna.pruners.NopPruner()


def _claim(study: optuna.Study) -> optuna.Trial | None:
    """Study.ask() without its fallback of creating a fresh trial when the queue is empty: only planned trials
    run. Stale trials (dead workers) are failed and re-enqueued first."""
    storage = study._storage
    with _quiet():
        fail_stale_trials(study)
    study._thread_local.cached_all_trials = None  # as ask(): samplers see the trials as they are now
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, trial._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _run_name(study_name: str, number: int, spec: StrategySpec) -> str:
    """``STUDY-tN-STRATEGY`` within the characters and length dmgl allows for run names."""
    suffix = re.sub(r"[^A-Za-z0-9._-]+", "-", f"-t{number}-{spec.key}")
    return study_name[: 100 - len(suffix)] + suffix


class _Worker:
    def __init__(self, study: optuna.Study, settings: SweepSettings, sweep_run_id: str, tracking_uri: str | None,
                 on_trial: Callable[[TrialRecord], None], on_message: Callable[[str], None]):
        self.study, self.settings, self.sweep_run_id = study, settings, sweep_run_id
        self.tracking_uri, self.on_trial, self.on_message = tracking_uri, on_trial, on_message
        self.base = settings.base_dict()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def run_trial(self, trial: optuna.Trial) -> TrialRecord:
        from dmgl_cli import runner

        settings = self.settings
        spec = parse_strategy(trial.suggest_categorical("strategy", settings.strategies))
        values = {}
        for name, (low, high, log) in settings.tune.items():
            if TUNABLE[name].applies(spec):
                values[name] = trial.suggest_float(f"{name}@{spec.key}", low, high, log=log)
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("strategy_label", spec.label)
        for stale in (RUN_ATTR, "message"):  # a retried trial inherits its failed original's attributes
            if stale in trial.user_attrs:
                trial.set_user_attr(stale, None)
        config = trial_config(self.base, _tuned_settings(spec, settings.tune, values))
        seeds, metric = settings.seeds, settings.metric
        started = time.time()

        def progress(seed: int, epoch: int, total: int, metrics: dict[str, float]) -> None:
            value = metrics.get(f"val_{metric}")
            if not settings.prune or value is None or not math.isfinite(value):
                return
            trial.report(value, seeds.index(seed) * total + epoch)
            if trial.should_prune():
                raise PrunedTrial(f"seed {seed} epoch {epoch}: val {metric} {value:.4f} below its strategy's median")

        def on_parent(run_id: str) -> None:
            trial.set_user_attr(RUN_ATTR, run_id)

        outcome = runner.train(
            config, seeds, tracking_uri=self.tracking_uri, progress=progress, on_parent=on_parent,
            run_name=_run_name(self.study.study_name, trial.number, spec),
            sweep_run_id=self.sweep_run_id,
            extra_tags={"dmgl.sweep": self.study.study_name, "dmgl.trial": str(trial.number),
                        "optuna.study": self.study.study_name, "optuna.trial_number": str(trial.number)},
        )
        mean, std = _mean_std([s.final[f"val_{metric}"] for s in outcome.seeds])
        test = [s.final[f"test_{metric}"] for s in outcome.seeds if f"test_{metric}" in s.final]
        test_mean, test_std = _mean_std(test) if test else (None, None)
        trial.set_user_attr("val_std", std)
        trial.set_user_attr("test_mean", test_mean)
        trial.set_user_attr("test_std", test_std)
        trial.set_user_attr("seed_run_ids", [s.run_id for s in outcome.seeds])
        return TrialRecord(trial.number, "COMPLETE", spec.key, spec.label, values, value=mean, value_std=std,
                           test=test_mean, test_std=test_std, run_id=outcome.parent_run_id,
                           seconds=time.time() - started, metric=metric)

    def run(self) -> tuple[list[int], bool]:
        """Claim and run trials until none is waiting or running; returns (trials run, interrupted)."""
        ran: list[int] = []
        try:
            interrupted = self._loop(ran)
        except (KeyboardInterrupt, Interrupted):
            interrupted = True  # while waiting or between trials: no trial of ours is left half-done
        return ran, interrupted

    def _loop(self, ran: list[int]) -> bool:
        waiting_said = False
        while True:
            trial = _claim(self.study)
            if trial is None:
                running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if not running:
                    return False
                if not waiting_said:
                    self.on_message(f"waiting for {len(running)} trial(s) running in other workers (a dead worker's "
                                    f"trial is retried after {3 * self.settings.heartbeat}s without heartbeat)")
                    waiting_said = True
                time.sleep(1.0)  # one cheap storage read per second while other workers finish
                continue
            waiting_said = False
            ran.append(trial.number)
            started = time.time()
            with get_heartbeat_thread(trial._trial_id, self.study._storage):
                try:
                    record = self.run_trial(trial)
                except PrunedTrial as exc:
                    trial.set_user_attr("message", str(exc))
                    self._tell(trial, state=TrialState.PRUNED)
                    self.on_trial(self._finished_record(trial.number, time.time() - started))
                    continue
                except (KeyboardInterrupt, Interrupted):
                    trial.set_user_attr("message", "interrupted (Ctrl-C / SIGTERM); re-enqueued")
                    if self._tell(trial, state=TrialState.FAIL):
                        with _quiet():
                            RetryStaleTrial(max_retry=None)(self.study, self._frozen(trial.number))
                    return True
                except BaseException as exc:
                    trial.set_user_attr("message", f"{type(exc).__name__}: {exc}"[:500])
                    self._tell(trial, state=TrialState.FAIL)
                    raise
            if self._tell(trial, values=record.value):
                self.on_trial(record)

    def _frozen(self, number: int) -> FrozenTrial:
        return next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)

    def _finished_record(self, number: int, seconds: float) -> TrialRecord:
        record = _record(self._frozen(number), self.settings.metric)
        record.seconds = seconds
        return record

    def _tell(self, trial: optuna.Trial, values: float | None = None, state: TrialState | None = None) -> bool:
        try:
            self.study.tell(trial, values, state=state)
            return True
        except optuna.exceptions.UpdateFinishedTrialError:
            self.on_message(f"trial {trial.number} was declared dead by another worker (no heartbeat for "
                            f"{3 * self.settings.heartbeat}s) and retried; this result stays in MLflow only")
            return False


def _create(request: SweepRequest, name: str, storage, url: str) -> tuple[optuna.Study, SweepSettings, bool]:
    """Create the study and its plan, or join it if another process created it first."""
    settings = _settings_from_request(request, name)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it meanwhile: join it
        study = optuna.load_study(study_name=name, storage=storage)
        joined = _read_settings(study)
        _check_join(request, joined, name)
        return study, joined, False
    from dmgl_cli.tracking import Tracker

    tracker = Tracker(request.tracking_uri)
    experiment_id = tracker.experiment_id(settings.experiment)
    space = settings.search_space()
    sweep_run_id = tracker.start_run(experiment_id, f"sweep-{name}"[:100], {
        "dmgl.role": "sweep", "dmgl.sweep": name, "dmgl.dataset": settings.dataset, "dmgl.method": settings.method,
        "dmgl.recipe": settings.recipe, "optuna.study": name, "optuna.storage": redact(url),
    })
    tracker.log_params(sweep_run_id, {
        "study": name, "storage": redact(url), "recipe": settings.recipe, "overrides": " ".join(settings.overrides),
        "strategies": ",".join(settings.strategies), "tune": json.dumps(settings.tune),
        "trials_per_strategy": settings.trials_per_strategy, "seeds": ",".join(map(str, settings.seeds)),
        "objective": f"val_{settings.metric} (mean over seeds, maximised)", "prune": settings.prune,
        "sampler": "TPE" if settings.tune else "grid", "heartbeat_s": settings.heartbeat,
    })
    tracker.log_text(sweep_run_id, json.dumps(space, indent=2), "search_space.json")
    tracker.log_text(sweep_run_id, settings.base_config, "config.yaml")
    study.set_user_attr(SETTINGS_ATTR, asdict(settings))
    study.set_user_attr(SWEEP_RUN_ATTR, sweep_run_id)
    study.set_user_attr(TRACKING_ATTR, redact(tracker.uri))
    _top_up(study, settings)
    study.set_user_attr(READY_ATTR, True)
    return study, settings, True


def _check_tracking(study: optuna.Study, tracking_uri: str | None) -> str:
    from dmgl_cli.tracking import Tracker

    tracker = Tracker(tracking_uri)
    run_id = study.user_attrs.get(SWEEP_RUN_ATTR)
    try:
        tracker.get_run(run_id)
    except DmglError:
        raise DmglError(f"the sweep run {run_id} of study {study.study_name!r} is not in the MLflow store "
                        f"{tracker.uri}; point --tracking-uri at the store the study was created with "
                        f"({study.user_attrs.get(TRACKING_ATTR)})") from None
    return run_id


def _sweep_run_status(sweep_run_id: str, tracking_uri: str | None, status: str) -> None:
    """RUNNING (owned by this worker: host/pid stamped for stale-run detection) or SCHEDULED (no worker holds it;
    the study is incomplete and other workers, or a later `dmgl sweep --study`, continue it)."""
    from dmgl_cli.tracking import Tracker

    tracker = Tracker(tracking_uri)
    if status == "RUNNING":
        tracker.mark_running(sweep_run_id)
    else:
        tracker.set_status(sweep_run_id, status)


def _finish(study: optuna.Study, settings: SweepSettings, sweep_run_id: str, tracking_uri: str | None,
            records: list[TrialRecord], summary: Table, status: str) -> None:
    """Record the outcome on the sweep run (idempotent: any worker that sees the study end may do it)."""
    from dmgl_cli.tracking import Tracker

    tracker = Tracker(tracking_uri)
    if status == "FINISHED":
        done = [r for r in records if r.state == "COMPLETE" and r.value is not None]
        if done:
            best = max(done, key=lambda r: r.value)
            tracker.log_metrics(sweep_run_id, {f"best_val_{settings.metric}": best.value,
                                               "complete_trials": len(done), "trials": len(records)})
            tracker.set_tags(sweep_run_id, {"dmgl.best_trial": str(best.number), "dmgl.best_strategy": best.strategy,
                                            "dmgl.best_run_id": best.run_id or "",
                                            "dmgl.best_params": json.dumps(best.params)})
        lines = ["number,state,strategy,params,val_mean,val_std,test_mean,test_std,mlflow_run_id,retry_of"]
        for r in records:
            lines.append(",".join([str(r.number), r.state, r.strategy, json.dumps(r.params).replace(",", ";"),
                                   *("" if v is None else repr(v) for v in (r.value, r.value_std, r.test, r.test_std)),
                                   r.run_id or "", "" if r.retry_of is None else str(r.retry_of)]))
        tracker.log_text(sweep_run_id, "\n".join(lines) + "\n", "trials.csv")
        tracker.log_text(sweep_run_id, render_text(summary), "summary.txt")
    tracker.end_run(sweep_run_id, status)


def run_sweep(request: SweepRequest, on_trial: Callable[[TrialRecord], None] | None = None,
              on_message: Callable[[str], None] | None = None) -> SweepOutcome:
    """Create or join a study and work on it until it is complete (see the module docstring)."""
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
            raise DmglError(f"unknown study {request.study!r} in {redact(url)} (studies there: "
                            f"{', '.join(sorted(known)) or 'none'}); to create it, pass --strategies")
        recipe_stem = Path(request.recipe or "synthetic").stem
        name = request.study or safe_name(f"{recipe_stem}-{time.strftime('%Y%m%d-%H%M%S')}", "study name")
        study, settings, created = _create(request, name, storage, url)
    sweep_run_id = _check_tracking(study, request.tracking_uri)
    on_message(_header(name, url, created, settings, sweep_run_id))
    if not created:
        added = _top_up(study, settings)
        if added:
            on_message(f"re-enqueued {added} trial(s) the plan still lacked")
    if request.create_only:
        _sweep_run_status(sweep_run_id, request.tracking_uri, "SCHEDULED")
        records = [_record(t, settings.metric) for t in study.get_trials(deepcopy=False)]
        return SweepOutcome(name, redact(url), created, settings, sweep_run_id, records, [], False,
                            summary=summary_table(records, settings, name))
    # The worker's own storage carries the study's heartbeat, so every worker judges staleness alike.
    worker_storage = open_storage(url, settings.heartbeat, _StaleTrialHandler(request.tracking_uri))
    with _quiet():
        study = optuna.load_study(study_name=name, storage=worker_storage, sampler=_sampler(settings),
                                  pruner=_pruner(settings))
    worker = _Worker(study, settings, sweep_run_id, request.tracking_uri, on_trial, on_message)
    _sweep_run_status(sweep_run_id, request.tracking_uri, "RUNNING")
    try:
        ran, interrupted = worker.run()
    except BaseException:
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            _sweep_run_status(sweep_run_id, request.tracking_uri, "SCHEDULED")
        else:
            _finish(study, settings, sweep_run_id, request.tracking_uri, [], summary_table([], settings, name),
                    "FAILED")
        raise
    records = [_record(t, settings.metric) for t in study.get_trials(deepcopy=False)]
    summary = summary_table(records, settings, name)
    pending = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    complete = not pending
    if complete:
        _finish(study, settings, sweep_run_id, request.tracking_uri, records, summary, "FINISHED")
    elif interrupted and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        _finish(study, settings, sweep_run_id, request.tracking_uri, records, summary, "KILLED")
    else:
        _sweep_run_status(sweep_run_id, request.tracking_uri, "SCHEDULED")
    return SweepOutcome(name, redact(url), created, settings, sweep_run_id, records, ran, complete, interrupted,
                        summary)
