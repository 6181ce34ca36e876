"""Which runs a report reads, and how they are grouped into table cells.

Reading. One MLflow search returns the seed runs (``dmgl.role=seed``) with their latest metrics, params and tags,
so a registry of a thousand runs reports in seconds.

Grouping. Seed runs are grouped by (dataset, method, strategy spec), where the spec tells constant alphas and
stepwise p values apart (``constant:0.5``, ``stepwise:0.95``). If a group holds several configurations (a sweep
that tuned the learning rate, two ``dmgl train`` runs with different settings), the configuration with the best
mean *validation* score is shown — never chosen on test — and a note says so; a seed recorded twice for that
configuration counts once (the latest run). A group's statistics are mean ± std over seeds
(:func:`dmgl_cli.metrics.mean_std`), from each seed's ``final_<split>_*`` metrics, i.e. the scores at the
validation-selected epoch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dmgl_cli.errors import DmglError
from dmgl_cli.metrics import mean_std
from dmgl_cli.strategies import StrategySpec, spec_from_params

if TYPE_CHECKING:
    from dmgl_cli.tracking import RunRecord, Tracker

# Params that differ between seeds of one configuration, or do not change what is learnt.
_NOT_CONFIGURATION = {
    "train.seed",
    "seeds",
    "experiment",
    "train.device",
    "data.num_workers",
    "train.eval_batch_size",
    "recipe",
}


@dataclass
class SeedRun:
    run_id: str
    experiment: str
    dataset: str
    method: str
    spec: StrategySpec | None
    seed: int | None
    status: str
    start_time: int
    metrics: dict[str, float]
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def parent_id(self) -> str:
        return self.tags.get("mlflow.parentRunId", "")

    @property
    def select_metric(self) -> str:
        return self.params.get("train.select_metric", "acc")

    @property
    def config_key(self) -> str:
        return json.dumps({k: v for k, v in self.params.items() if k not in _NOT_CONFIGURATION}, sort_keys=True)

    @property
    def modalities(self) -> list[str]:
        prefix = "final_val_acc_" if any(k.startswith("final_val_acc_") for k in self.metrics) else "final_test_acc_"
        return sorted(k[len(prefix) :] for k in self.metrics if k.startswith(prefix))


def seed_run_from_record(run: RunRecord, experiment: str) -> SeedRun:
    tags, params = dict(run.tags), dict(run.params)
    seed = tags.get("dmgl.seed", params.get("train.seed"))
    try:
        seed_number = int(seed) if seed is not None else None
    except ValueError:
        seed_number = None
    return SeedRun(
        run_id=run.run_id,
        experiment=experiment,
        dataset=tags.get("dmgl.dataset", params.get("dataset", "?")),
        method=tags.get("dmgl.method", params.get("method.name", "?")),
        spec=spec_from_params(params, tags),
        seed=seed_number,
        status=run.status,
        start_time=run.start_time,
        metrics=dict(run.metrics),
        params=params,
        tags=tags,
    )


@dataclass
class Selection:
    """Which runs a report reads."""

    experiments: list[str] | None = None
    datasets: list[str] | None = None
    sweep: str | None = None
    filter: str | None = None

    def describe(self, experiment_names: Iterable[str] = ()) -> str:
        names = sorted(experiment_names)
        parts = [
            f"experiments {', '.join(names) if names else '(none)'}" if self.experiments or names else "all experiments"
        ]
        if self.datasets:
            parts.append(f"dataset {', '.join(self.datasets)}")
        if self.sweep:
            parts.append(f"sweep {self.sweep!r}")
        if self.filter:
            parts.append(f"filter {self.filter!r}")
        return "; ".join(parts)


def _quote(value: str, what: str) -> str:
    if "'" in value:
        raise DmglError(f"{what} {value!r} must not contain a quote")
    return f"'{value}'"


def select_runs(selection: Selection, tracker: Tracker) -> tuple[list[SeedRun], str]:
    """Seed runs matching ``selection`` (any status), and a sentence saying what was searched."""
    experiments = tracker.experiments(selection.experiments)
    searched = f"{selection.describe(experiments.values())} in {tracker.uri}"
    if not experiments:
        return [], searched
    clauses = ["tags.`dmgl.role` = 'seed'"]
    if selection.datasets and len(selection.datasets) == 1:
        clauses.append(f"tags.`dmgl.dataset` = {_quote(selection.datasets[0], 'dataset')}")
    if selection.sweep:
        clauses.append(f"tags.`dmgl.sweep` = {_quote(selection.sweep, 'sweep')}")
    if selection.filter:
        clauses.append(selection.filter)  # MLflow's grammar: clauses joined by AND
    runs = tracker.find_runs(list(experiments), " and ".join(clauses))
    seeds = [seed_run_from_record(r, experiments.get(r.experiment_id, r.experiment_id)) for r in runs]
    if selection.datasets:
        seeds = [r for r in seeds if r.dataset in selection.datasets]
    return seeds, searched


# ------------------------------------------------------------------------------------------------ groups


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int
    runs: tuple[str, ...] = ()


@dataclass
class Group:
    """The seed runs of one (dataset, method, strategy), from one configuration."""

    dataset: str
    method: str
    spec: StrategySpec
    runs: list[SeedRun]
    configurations: int = 1

    @property
    def label(self) -> str:
        return f"{self.method} ({self.spec.label})"

    @property
    def modalities(self) -> list[str]:
        names: set[str] = set()
        for run in self.runs:
            names.update(run.modalities)
        return sorted(names)

    def stat(self, key: str, warn: Callable[[str], None] | None = None) -> Stat:
        values = [(r.run_id, r.metrics[key]) for r in self.runs if key in r.metrics]
        missing = [r.run_id for r in self.runs if key not in r.metrics]
        if missing and warn:
            warn(
                f"run {', run '.join(missing)} ({self.dataset} / {self.label}) has no metric {key}; "
                + ("its cell shows -" if not values else f"the mean uses the other {len(values)} seed(s)")
            )
        if not values:
            return Stat(None, None, 0)
        mean, std = mean_std([v for _, v in values])
        return Stat(mean, std, len(values), tuple(r for r, _ in values))


def validation_score(runs: Sequence[SeedRun]) -> float:
    """Mean over ``runs`` of each run's validation score on its selection metric (-inf if none is recorded)."""
    values = [r.metrics.get(f"final_val_{r.select_metric}") for r in runs]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else -math.inf


def group_runs(runs: Sequence[SeedRun], note: Callable[[str], None] | None = None) -> list[Group]:
    """Finished seed runs grouped by (dataset, method, strategy spec); see the module docstring for the rules."""
    buckets: dict[tuple[str, str, StrategySpec], dict[str, list[SeedRun]]] = {}
    for run in runs:
        if run.status != "FINISHED" or run.spec is None:
            continue
        buckets.setdefault((run.dataset, run.method, run.spec), {}).setdefault(run.config_key, []).append(run)
    groups = []
    for (dataset, method, spec), configurations in buckets.items():
        candidates = []
        for config_runs in configurations.values():
            latest: dict[Any, SeedRun] = {}
            for run in sorted(config_runs, key=lambda r: r.start_time):
                latest[run.seed if run.seed is not None else run.run_id] = run
            chosen = sorted(latest.values(), key=lambda r: (r.seed is None, r.seed or 0, r.run_id))
            candidates.append((validation_score(chosen), len(chosen), max(r.start_time for r in chosen), chosen))
        candidates.sort(key=lambda c: c[:3], reverse=True)
        best = candidates[0][3]
        group = Group(dataset, method, spec, best, configurations=len(configurations))
        if len(configurations) > 1 and note:
            metric = best[0].select_metric
            note(
                f"{dataset} / {group.label}: {len(configurations)} configurations recorded; showing the best by "
                f"mean validation {metric} ({validation_score(best):.4f}, runs {', '.join(r.run_id for r in best)})"
            )
        groups.append(group)
    return sorted(groups, key=lambda g: (g.dataset, g.method, g.spec.sort_key()))
