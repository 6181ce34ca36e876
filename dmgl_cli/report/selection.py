"""Which runs a report reads, and how they are grouped into table cells.

Reading. One MLflow search returns the seed runs (``dmgl.role=seed``) with their latest metrics, params and tags,
so a registry of a thousand runs reports in seconds.

Grouping. Seed runs are grouped into cells by (dataset, method, strategy spec) — the compared axes; the spec tells
constant alphas and stepwise p values apart (``constant:0.5``, ``stepwise:0.95``), and a ``unimodal`` run's modality
is part of its method. Everything else a run records — its parameters (the flattened config, less the seed and
settings that do not change what is learnt) and the checksum of the prepared dataset it read — is its
*configuration*. A seed recorded twice for one configuration counts once (the latest run). A cell whose runs hold
several configurations is:

* a tuned sweep when all of them come from one ``dmgl sweep`` study (tag ``dmgl.sweep``) and the same dataset: the
  sweep searched those settings and scored its trials on validation, so the configuration with the best mean
  *validation* score is shown and a note names the tuned settings and the values chosen;
* otherwise refused (:class:`~dmgl_cli.errors.DmglError` naming each setting that differs with its values), since
  20-epoch and 5-epoch runs, or two learning rates, or two versions of a dataset, are not one result; with
  ``allow_mixed`` the best-on-validation configuration is shown, with a note naming what differs.

Nothing is ever chosen on test. A group's statistics are mean ± std over seeds (:func:`dmgl_cli.metrics.mean_std`),
from each seed's ``final_<split>_*`` metrics, i.e. the scores at the validation-selected epoch.
:func:`setting_differences` names the settings that differ *between* cells (e.g. rows of one table), which the
tables report in a note.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dmgl_cli.config import setting_applies
from dmgl_cli.errors import DmglError
from dmgl_cli.over_seeds import mean_std
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
    "train.deterministic",
    "train.eval_test_every_epoch",  # the former name of train.test_curves
    "train.test_curves",
    "train.compile",
    "recipe",
}
# Settings added after runs were first recorded, with the value every run recorded before them used: a run without
# the param compares equal to one that records this value.
_ADDED_SETTINGS = {
    "train.eval_every": "1",
    # Ours-LB's settings of dmgl 0.3: a run of 0.2 took one-batch hypergradients ("step") and learnt their direction
    "strategy.lb.estimator": "step",
    "strategy.lb.direction": "hypergradient",
    "strategy.lb.horizon": "epoch",
    "strategy.lb.mixed_every": "4",
    "strategy.lb.relative_damping": "0.01",
    "strategy.lb.cg_tolerance": "1e-06",
    "strategy.lb.max_residual": "0.5",
}
# A configuration's pseudo-setting for the prepared data it read (tag dmgl.dataset_checksum).
DATA_CHECKSUM = "dataset checksum"
MAX_LISTED = 6  # settings named in one message before "and N more"


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
    def variant(self) -> str:
        """What else names the method's row: the modality of a ``unimodal`` run."""
        return self.params.get("method.options.unimodal.modality", "") if self.method == "unimodal" else ""

    @property
    def settings(self) -> dict[str, str]:
        """The run's configuration: its settings beyond the seed, and the checksum of the data it read."""
        strategy = self.spec.name if self.spec else self.params.get("strategy.name", "")
        settings = {
            k: v
            for k, v in {**_ADDED_SETTINGS, **self.params}.items()
            if k not in _NOT_CONFIGURATION and setting_applies(k, strategy, self.method)
        }
        if self.tags.get("dmgl.dataset_checksum"):
            settings[DATA_CHECKSUM] = self.tags["dmgl.dataset_checksum"]
        return settings

    @property
    def config_key(self) -> str:
        return json.dumps(self.settings, sort_keys=True)

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
    by_seed: dict[int, float] = field(default_factory=dict)  # the values by seed (runs without a seed left out)


@dataclass
class Group:
    """The seed runs of one cell: (dataset, method, strategy), from one configuration."""

    dataset: str
    method: str
    spec: StrategySpec
    runs: list[SeedRun]
    configurations: int = 1
    variant: str = ""  # a unimodal run's modality

    @property
    def method_label(self) -> str:
        return f"{self.method} {self.variant}" if self.variant else self.method

    @property
    def label(self) -> str:
        return f"{self.method_label} ({self.spec.label})"

    @property
    def settings(self) -> dict[str, str]:
        return self.runs[0].settings if self.runs else {}

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
        by_seed = {r.seed: r.metrics[key] for r in self.runs if key in r.metrics and r.seed is not None}
        return Stat(mean, std, len(values), tuple(r for r, _ in values), by_seed)


def validation_score(runs: Sequence[SeedRun]) -> float:
    """Mean over ``runs`` of each run's validation score on its selection metric (-inf if none is recorded)."""
    values = [r.metrics.get(f"final_val_{r.select_metric}") for r in runs]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else -math.inf


NOT_RECORDED = "(not recorded)"


def setting_differences(members: dict[str, dict[str, str]], ignore: Iterable[str] = ()) -> dict[str, dict[str, list]]:
    """Settings whose values differ between ``members`` (name -> settings): {setting: {value: [names]}}, values in
    numeric (else alphabetical) order; a setting some members lack shows as ``(not recorded)``. Keys starting with
    an ``ignore`` prefix are skipped (the compared axes)."""
    prefixes = tuple(ignore)
    keys = sorted({k for settings in members.values() for k in settings if not (prefixes and k.startswith(prefixes))})
    found: dict[str, dict[str, list]] = {}
    for key in keys:
        values: dict[str, list] = {}
        for name, settings in members.items():
            values.setdefault(settings.get(key, NOT_RECORDED), []).append(name)
        if len(values) > 1:
            found[key] = dict(sorted(values.items(), key=lambda item: _value_order(item[0])))
    return found


def _value_order(value: str) -> tuple:
    """Numbers by value, then other text, then ``(not recorded)``."""
    if value == NOT_RECORDED:
        return (2, 0.0, value)
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def describe_differences(found: dict[str, dict[str, list]], name: Callable[[list], str]) -> str:
    """``optim.lr = 0.01 (NAME), 0.05 (NAME); train.epochs = ...``, at most MAX_LISTED settings."""
    parts = [
        f"{key} = " + ", ".join(f"{value} ({name(members)})" for value, members in values.items())
        for key, values in list(found.items())[:MAX_LISTED]
    ]
    if len(found) > MAX_LISTED:
        parts.append(f"and {len(found) - MAX_LISTED} more")
    return "; ".join(parts)


def _runs_phrase(runs: list) -> str:
    return f"run {runs[0].run_id}" if len(runs) == 1 else f"{len(runs)} runs, e.g. {runs[0].run_id}"


def _filter_hint(key: str, value: str) -> str:
    if key == DATA_CHECKSUM:
        return f"--filter \"tags.`dmgl.dataset_checksum` = '{value}'\""
    return f"--filter \"params.`{key}` = '{value}'\""


def group_runs(
    runs: Sequence[SeedRun], note: Callable[[str], None] | None = None, *, allow_mixed: bool = False
) -> list[Group]:
    """Finished seed runs grouped into cells; see the module docstring for the rules. Raises DmglError for a cell
    whose runs differ in settings beyond the compared axes, unless ``allow_mixed``."""
    buckets: dict[tuple[str, str, str, StrategySpec], dict[str, list[SeedRun]]] = {}
    for run in runs:
        if run.status != "FINISHED" or run.spec is None:
            continue
        key = (run.dataset, run.method, run.variant, run.spec)
        buckets.setdefault(key, {}).setdefault(run.config_key, []).append(run)
    groups, mixed = [], []
    for (dataset, method, variant, spec), configurations in buckets.items():
        candidates = []
        for config_runs in configurations.values():
            latest: dict[Any, SeedRun] = {}
            for run in sorted(config_runs, key=lambda r: r.start_time):
                latest[run.seed if run.seed is not None else run.run_id] = run
            chosen = sorted(latest.values(), key=lambda r: (r.seed is None, r.seed or 0, r.run_id))
            candidates.append((validation_score(chosen), len(chosen), max(r.start_time for r in chosen), chosen))
        candidates.sort(key=lambda c: c[:3], reverse=True)
        best = candidates[0][3]
        group = Group(dataset, method, spec, best, configurations=len(configurations), variant=variant)
        groups.append(group)
        if len(configurations) == 1:
            continue
        every = [r for config_runs in configurations.values() for r in config_runs]
        found = setting_differences({c: rs[0].settings for c, rs in configurations.items()})
        by_value = {
            key: {value: [r for c in names for r in configurations[c]] for value, names in values.items()}
            for key, values in found.items()
        }
        differences = describe_differences(by_value, _runs_phrase)
        sweeps = {r.tags.get("dmgl.sweep", "") for r in every}
        tuned = len(sweeps) == 1 and "" not in sweeps and DATA_CHECKSUM not in found
        metric = best[0].select_metric
        chosen_values = ", ".join(f"{k}={best[0].settings.get(k, NOT_RECORDED)}" for k in list(found)[:MAX_LISTED])
        choice = (
            f"showing the best by mean validation {metric}: {chosen_values} ({validation_score(best):.4f}, "
            f"runs {', '.join(r.run_id for r in best)})"
        )
        if tuned:
            if note:
                note(
                    f"{dataset} / {group.label}: {len(configurations)} configurations tuned by sweep "
                    f"{next(iter(sweeps))!r} ({', '.join(found)}); {choice}"
                )
        elif allow_mixed:
            if note:
                note(
                    f"{dataset} / {group.label}: --allow-mixed: {len(configurations)} configurations with different "
                    f"settings ({differences}); {choice}"
                )
        else:
            first_key, first_values = next(iter(found.items())) if found else ("", {})
            mixed.append((f"{dataset} / {group.label}: {differences}", first_key, next(iter(first_values), "")))
    if mixed:
        lines = [f"  {text}" for text, _, _ in mixed[:10]]
        if len(mixed) > 10:
            lines.append(f"  and {len(mixed) - 10} more cells")
        _, key, value = mixed[0]
        raise DmglError(
            "runs with different settings would share a table cell (not one result):\n"
            + "\n".join(lines)
            + f"\nselect one configuration (e.g. {_filter_hint(key, value)}, or --sweep / --experiment), or pass "
            "--allow-mixed to show in each such cell the configuration with the best mean validation score"
        )
    return sorted(groups, key=lambda g: (g.dataset, g.method, g.variant, g.spec.sort_key()))
