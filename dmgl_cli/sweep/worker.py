"""A sweep worker: claims planned trials one at a time, trains each, and tells Optuna the outcome.

* **Claiming.** Workers only *claim* waiting trials — Optuna's own atomic pop of its trial queue — and never create
  trials of their own, so several workers on one or many machines complete exactly the requested trials, none lost
  or duplicated. A worker with nothing left to claim waits while other workers' trials run, so one surviving worker
  finishes a study.
* **Dead workers.** A claimed trial beats (:func:`dmgl_cli.sweep.storage.heartbeat`); one whose worker stopped
  beating is failed by the next worker that looks, its MLflow runs marked FAILED, and it is re-enqueued
  (:class:`StaleTrialHandler`).
* **Ctrl-C** stops training (its runs marked KILLED), fails the trial and re-enqueues it. One that lands while a
  trial is being claimed is held until the claim is over (:func:`_interrupts_held`): a claimed trial that never
  beat would stay RUNNING for good, and a resumed study would wait for it. A trial that raises an error is failed
  and not retried automatically (errors repeat).
* **Pruning** compares a trial with the median of its own strategy's trials at the same step
  (:class:`StrategyMedianPruner`).
* **MLflow.** Each trial is one ``training.train`` parent run nested under the sweep run, with a child per seed; the
  trial keeps its parent run id as the user attribute ``mlflow_run_id``. The objective is the mean over seeds of
  the validation metric at each seed's validation-selected epoch — never test. Its std over seeds is the user
  attribute ``val_std``, the per-seed values ``val_by_seed`` (seed -> value), for the summary's paired tests.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import signal
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from dmgl_cli.device import pick_device
from dmgl_cli.errors import DmglError, Interrupted, Stopped, signals_handled
from dmgl_cli.over_seeds import mean_std
from dmgl_cli.run import training
from dmgl_cli.strategies import StrategySpec, parse_strategy
from dmgl_cli.sweep.space import SweepSettings, trial_config, tuned_settings
from dmgl_cli.sweep.storage import heartbeat, quiet
from dmgl_cli.tunables import TUNABLE

if TYPE_CHECKING:
    from dmgl_cli.tracking import Tracker

RetryStaleTrial = (
    getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
)  # the name before Optuna 4.9

RUN_ATTR = "mlflow_run_id"
MAX_RETRIES = 3  # heartbeat-stale retries of one trial


class PrunedTrial(Stopped, optuna.TrialPruned):
    """Raised from the epoch callback: training marks the runs KILLED, Optuna's tell records PRUNED."""


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
        peers = [
            t.intermediate_values[step]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.params.get("strategy") == strategy and step in t.intermediate_values
        ]
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


def sampler_for(settings: SweepSettings) -> optuna.samplers.BaseSampler:
    """TPE for tuned settings. Without --tune every parameter is fixed by the queue (the queue is the grid), so
    the sampler is never asked; not GridSampler, whose bookkeeping assumes it assigned the grid points itself."""
    return optuna.samplers.TPESampler() if settings.tune else optuna.samplers.RandomSampler()


def pruner_for(settings: SweepSettings) -> optuna.pruners.BasePruner:
    return StrategyMedianPruner() if settings.prune else optuna.pruners.NopPruner()


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Ctrl-C is held while the block runs and raised as it ends: the block's assignments are done by then."""
    held: list[int] = []
    try:
        with signals_handled(lambda signum, frame: held.append(signum), (signal.SIGINT,)):
            yield
    finally:
        if held:
            signal.raise_signal(signal.SIGINT)  # to the handler it had again, at once


def _claim(study: optuna.Study) -> optuna.Trial | None:
    """Study.ask() without its fallback of creating a fresh trial when the queue is empty: only planned trials
    run. Stale trials (dead workers) are failed and re-enqueued first."""
    storage = study._storage
    with quiet():
        fail_stale_trials(study)
    study._thread_local.cached_all_trials = None  # as ask(): samplers see the trials as they are now
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, trial._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


class StaleTrialHandler:
    """Called for a trial whose worker stopped beating: its MLflow runs are marked FAILED, then it is retried."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            try:
                for run in [self.tracker.get_run(run_id), *self.tracker.children(run_id)]:
                    if run.status == "RUNNING":
                        self.tracker.end_run(run.run_id, "FAILED")
            except DmglError:
                pass  # the run lives in another MLflow store; the Optuna side is what must not block
        with quiet():
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
    value_by_seed: dict[int, float] = field(default_factory=dict)  # the objective's per-seed values

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


def trial_record(trial: FrozenTrial, metric: str) -> TrialRecord:
    """What a finished (or waiting, running) trial shows, from what Optuna stored."""
    strategy = trial.params.get("strategy") or trial.system_attrs.get("fixed_params", {}).get("strategy", "?")
    params = {k.split("@")[0]: float(v) for k, v in trial.params.items() if "@" in k}
    attrs = trial.user_attrs
    seconds = None
    if trial.datetime_start and trial.datetime_complete:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    label = parse_strategy(strategy).label if strategy != "?" else "?"
    return TrialRecord(
        trial.number,
        trial.state.name,
        strategy,
        label,
        params,
        trial.value if trial.state == TrialState.COMPLETE else None,
        attrs.get("val_std"),
        attrs.get("test_mean"),
        attrs.get("test_std"),
        attrs.get(RUN_ATTR),
        seconds,
        attrs.get("message") or "",
        trial.system_attrs.get("failed_trial"),
        metric,
        {int(seed): float(value) for seed, value in (attrs.get("val_by_seed") or {}).items()},
    )


@dataclass(frozen=True)
class TrialProgress:
    """One epoch of a running trial, for the live progress line (``dmgl sweep`` prints it on stderr)."""

    trial: int
    label: str
    seed: int
    seed_index: int  # 0-based among the trial's seeds
    seeds: int
    epoch: int
    epochs: int
    metric: str
    value: float | None  # this epoch's validation metric
    best: float | None  # the best validation value of this seed so far

    def line(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.4f}"
        best = "" if self.best is None else f" (best {self.best:.4f})"
        # indented: a line under the trial's own "trial N ..." line, which it precedes
        return (
            f"  trial {self.trial} {self.label}  seed {self.seed} ({self.seed_index + 1}/{self.seeds})  "
            f"epoch {self.epoch}/{self.epochs}  val {self.metric} {shown}{best}"
        )


# --------------------------------------------------------------------------------------------- the worker


def study_tag(study_name: str) -> str:
    """Six hex digits of the study's name: enough to tell one user's studies apart in a run name, short enough
    that the UI's runs table shows the name whole."""
    return hashlib.sha1(study_name.encode()).hexdigest()[:6]


def _run_name(study_name: str, number: int, spec: StrategySpec) -> str:
    """``tN-STRATEGY-TAG`` (``t3-stepwise-0.95-1f0c2a``, ``t0-lb-1f0c2a``), within the characters dmgl allows for run
    names. The study's tag (:func:`study_tag`) makes the name unique across studies, so that it names one run
    (``dmgl runs show t3-stepwise-0.95-1f0c2a``); the whole study name is the parent run's tag ``dmgl.sweep``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"t{number}-{spec.key}-{study_tag(study_name)}")[:100]


class Worker:
    """Runs a study's planned trials in this process, training each through ``tracker``."""

    def __init__(
        self,
        study: optuna.Study,
        settings: SweepSettings,
        sweep_run_id: str,
        tracker: Tracker,
        on_trial: Callable[[TrialRecord], None],
        on_message: Callable[[str], None],
        device: str | None = None,
        on_epoch: Callable[[TrialProgress], None] | None = None,
    ):
        self.study, self.settings, self.sweep_run_id = study, settings, sweep_run_id
        self.tracker, self.on_trial, self.on_message = tracker, on_trial, on_message
        self.on_epoch = on_epoch or (lambda progress: None)
        self.base = settings.base_dict()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.device = device  # train.device of this worker's trials (dmgl sweep --devices); None: the study's
        if device is not None and device.startswith("cuda:"):
            import torch

            torch.cuda.set_device(pick_device(device))  # calls without a device use it, not cuda:0

    def run_trial(self, trial: optuna.Trial) -> TrialRecord:
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
        dotted = tuned_settings(spec, values)
        if self.device is not None:
            dotted["train.device"] = self.device
        config = trial_config(self.base, dotted)
        seeds, metric = settings.seeds, settings.metric
        started = time.time()
        best_of_seed: dict[int, float] = {}

        def progress(seed: int, epoch: int, total: int, metrics: dict[str, float]) -> None:
            value = metrics.get(f"val_{metric}")
            finite = value is not None and math.isfinite(value)
            if finite:
                best_of_seed[seed] = max(best_of_seed.get(seed, -math.inf), cast(float, value))
            self.on_epoch(
                TrialProgress(
                    trial.number,
                    spec.label,
                    seed,
                    seeds.index(seed),
                    len(seeds),
                    epoch,
                    total,
                    metric,
                    value if finite else None,
                    best_of_seed.get(seed),
                )
            )
            if not settings.prune or value is None or not finite:
                return
            trial.report(value, seeds.index(seed) * total + epoch)
            if trial.should_prune():
                raise PrunedTrial(f"seed {seed} epoch {epoch}: val {metric} {value:.4f} below its strategy's median")

        def on_parent(run_id: str) -> None:
            trial.set_user_attr(RUN_ATTR, run_id)

        outcome = training.train(
            config,
            seeds,
            tracker=self.tracker,
            progress=progress,
            on_parent=on_parent,
            run_name=_run_name(self.study.study_name, trial.number, spec),
            sweep_run_id=self.sweep_run_id,
            extra_tags={
                "dmgl.sweep": self.study.study_name,
                "dmgl.trial": str(trial.number),
                "optuna.study": self.study.study_name,
                "optuna.trial_number": str(trial.number),
            },
        )
        mean, std = mean_std([s.final[f"val_{metric}"] for s in outcome.seeds])
        test = [s.final[f"test_{metric}"] for s in outcome.seeds if f"test_{metric}" in s.final]
        test_mean, test_std = mean_std(test) if test else (None, None)
        by_seed = {s.seed: s.final[f"val_{metric}"] for s in outcome.seeds}
        trial.set_user_attr("val_std", std)
        trial.set_user_attr("val_by_seed", {str(seed): value for seed, value in by_seed.items()})  # JSON keys
        trial.set_user_attr("test_mean", test_mean)
        trial.set_user_attr("test_std", test_std)
        trial.set_user_attr("seed_run_ids", [s.run_id for s in outcome.seeds])
        return TrialRecord(
            trial.number,
            "COMPLETE",
            spec.key,
            spec.label,
            values,
            value=mean,
            value_std=std,
            test=test_mean,
            test_std=test_std,
            run_id=outcome.parent_run_id,
            seconds=time.time() - started,
            metric=metric,
            value_by_seed=by_seed,
        )

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
            trial = None
            try:
                with _interrupts_held():  # a Ctrl-C during the claim is raised once ``trial`` holds what it claimed
                    trial = _claim(self.study)
                if trial is None:
                    running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if not running:
                        return False
                    if not waiting_said:
                        self.on_message(
                            f"waiting for {len(running)} trial(s) running in other workers (a dead worker's "
                            f"trial is retried after {3 * self.settings.heartbeat}s without heartbeat)"
                        )
                        waiting_said = True
                    time.sleep(1.0)  # one cheap storage read per second while other workers finish
                    continue
                waiting_said = False
                ran.append(trial.number)
                started = time.time()
                with heartbeat(trial):
                    try:
                        record = self.run_trial(trial)
                    except PrunedTrial as exc:
                        trial.set_user_attr("message", str(exc))
                        self._tell(trial, state=TrialState.PRUNED)
                        self.on_trial(self._finished_record(trial.number, time.time() - started))
                        continue
                    except (KeyboardInterrupt, Interrupted):
                        raise
                    except BaseException as exc:
                        trial.set_user_attr("message", f"{type(exc).__name__}: {exc}"[:500])
                        self._tell(trial, state=TrialState.FAIL)
                        raise
            except (KeyboardInterrupt, Interrupted):
                if trial is not None:  # claimed: back to the queue, whether or not it had begun
                    trial.set_user_attr("message", "interrupted (Ctrl-C / SIGTERM); re-enqueued")
                    if self._tell(trial, state=TrialState.FAIL):
                        with quiet():
                            RetryStaleTrial(max_retry=None)(self.study, self._frozen(trial.number))
                return True
            if self._tell(trial, values=record.value):
                self.on_trial(record)

    def _frozen(self, number: int) -> FrozenTrial:
        return next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)

    def _finished_record(self, number: int, seconds: float) -> TrialRecord:
        record = trial_record(self._frozen(number), self.settings.metric)
        record.seconds = seconds
        return record

    def _tell(self, trial: optuna.Trial, values: float | None = None, state: TrialState | None = None) -> bool:
        try:
            self.study.tell(trial, values, state=state)
            return True
        except optuna.exceptions.UpdateFinishedTrialError:
            self.on_message(
                f"trial {trial.number} was declared dead by another worker (no heartbeat for "
                f"{3 * self.settings.heartbeat}s) and retried; this result stays in MLflow only"
            )
            return False
