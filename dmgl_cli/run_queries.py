"""Reading recorded runs (``dmgl runs list | show | compare``) and the runs a ``dmgl train`` would create
(``dmgl train --dry-run``).

Everything here works on :class:`~dmgl_cli.tracking.RunRecord` values read through the command's
:class:`~dmgl_cli.tracking.Tracker`, which is only named for types: importing this module loads neither MLflow nor
torch (``dmgl runs list`` checks its filters before they load), and ``dmgl train --dry-run`` opens no MLflow store.
The result types carry ``to_dict()`` for ``--json``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from dmgl_cli import links
from dmgl_cli.config import setting_applies
from dmgl_cli.errors import DmglError
from dmgl_cli.paths import safe_name
from dmgl_cli.strategies import StrategySpec, parse_strategy, spec_from_params

if TYPE_CHECKING:
    from dmgl_cli.config import Config
    from dmgl_cli.sweep import SweepRequest
    from dmgl_cli.tracking import RunRecord, Tracker

ROLES = ("parent", "seed", "sweep")
STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
FINAL_PREFIX = "final_"  # what run.training logs as a run's final metrics
_TAG_VALUE = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")  # method and dataset names; nothing to escape in a filter


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def finite_or_none(value: Any) -> Any:
    """NaN and infinities as None (JSON has no NaN; ``jq`` refuses it)."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def jsonable(value: Any) -> Any:
    """Plain JSON values throughout: tuples as lists, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return finite_or_none(value)


def strategy_of(run: RunRecord) -> StrategySpec | None:
    """The strategy a dmgl run trained with (``constant:0.5``), from its params and tags."""
    return spec_from_params(run.params, run.tags)


def final_metrics(run: RunRecord) -> dict[str, float]:
    """A run's ``final_*`` metrics without the prefix (a seed: ``test_acc``; a parent: ``test_acc``, the mean over its seeds, and ``test_acc_std``)."""
    return {k[len(FINAL_PREFIX) :]: v for k, v in sorted(run.metrics.items()) if k.startswith(FINAL_PREFIX)}


def run_url(tracker: Tracker, run: RunRecord) -> str:
    """The run's page in the MLflow UI that serves ``tracker``'s store."""
    return links.run_url(links.ui_base(tracker.uri), run.experiment_id, run.run_id)


def url_of(tracker: Tracker, run_id: str) -> str:
    """:func:`run_url` for a run known by its id (one read)."""
    return run_url(tracker, tracker.get_run(run_id))


# --------------------------------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class RunSummary:
    """One line of ``dmgl runs list``: who the run is and its headline score."""

    run_id: str
    name: str
    experiment_id: str
    experiment: str
    role: str | None
    status: str
    dataset: str | None
    method: str | None
    strategy: str | None  # a StrategySpec key: constant:0.5, stepwise:0.95, heuristic, lb
    seeds: list[int]
    parent_run_id: str | None
    started: str | None  # ISO 8601, UTC
    ended: str | None
    duration_s: float | None
    metric: str  # the headline metric: test_<select_metric> (a sweep run: best_val_<select_metric>)
    value: float | None
    std: float | None  # None for a single seed
    url: str

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def _seeds(run: RunRecord) -> list[int]:
    text = run.tags.get("dmgl.seeds") or run.tags.get("dmgl.seed") or run.params.get("seeds") or ""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        return []


def _headline(run: RunRecord) -> tuple[str, float | None, float | None]:
    chosen = run.params.get("train.select_metric") or "acc"
    if run.role == "sweep":
        key = next((k for k in run.metrics if k.startswith("best_val_")), f"best_val_{chosen}")
        return key, run.metrics.get(key), None
    metrics = run.metrics
    key = f"test_{chosen}"
    if f"{FINAL_PREFIX}{key}_mean" in metrics:  # a parent recorded by an earlier version
        return key, metrics[f"{FINAL_PREFIX}{key}_mean"], metrics.get(f"{FINAL_PREFIX}{key}_std")
    return key, metrics.get(f"{FINAL_PREFIX}{key}"), metrics.get(f"{FINAL_PREFIX}{key}_std")


def summarise(tracker: Tracker, run: RunRecord, experiments: dict[str, str] | None = None) -> RunSummary:
    """The :class:`RunSummary` of one run; ``experiments`` ({id: name}) saves a lookup per run."""
    experiment = (experiments or {}).get(run.experiment_id) or tracker.experiment_name(run.experiment_id)
    spec = strategy_of(run) if run.role in ("parent", "seed") else None
    metric, value, std = _headline(run)
    seeds = _seeds(run)
    if len(seeds) == 1:
        std = None  # one seed has no spread (its recorded std is 0 by definition)
    duration = (run.end_time - run.start_time) / 1000 if run.end_time and run.start_time else None
    return RunSummary(
        run_id=run.run_id,
        name=run.name,
        experiment_id=run.experiment_id,
        experiment=experiment,
        role=run.role,
        status=run.status,
        dataset=run.tags.get("dmgl.dataset"),
        method=run.tags.get("dmgl.method"),
        strategy=spec.key if spec else run.tags.get("dmgl.strategy"),
        seeds=seeds,
        parent_run_id=run.parent_id,
        started=_iso(run.start_time),
        ended=_iso(run.end_time),
        duration_s=duration,
        metric=metric,
        value=value,
        std=std,
        url=run_url(tracker, run),
    )


# -------------------------------------------------------------------------------------------------------- list


@dataclass(frozen=True)
class RunFilter:
    """What ``dmgl runs list`` selects; None (or empty) means any."""

    experiments: tuple[str, ...] = ()
    strategy: str | None = None  # a name (constant) or a spec key (constant:0.5)
    method: str | None = None
    dataset: str | None = None
    status: str | None = None
    role: str | None = "parent"
    limit: int | None = 50

    def check(self) -> None:
        """Refuse malformed values before any store is opened."""
        if self.strategy is not None:
            parse_strategy(self.strategy, value_required=False)
        for flag, value in (("--method", self.method), ("--dataset", self.dataset)):
            if value is not None and not _TAG_VALUE.match(value):
                raise DmglError(f"{flag} {value!r} is not a name dmgl records (letters, digits, '.', '_', '-', ':')")
        if self.status is not None and self.status.upper() not in STATUSES:
            raise DmglError(f"unknown --status {self.status!r}; valid: {', '.join(s.lower() for s in STATUSES)}")
        if self.role is not None and self.role not in ROLES:
            raise DmglError(f"unknown --role {self.role!r}; valid: {', '.join(ROLES)}, all")
        if self.limit is not None and self.limit < 1:
            raise DmglError(f"--limit must be >= 1, got {self.limit}")

    def filter_string(self) -> str:
        """The MLflow search filter for everything but a strategy's value (which lives in the params)."""
        clauses = []
        if self.role is not None:
            clauses.append(f"tags.`dmgl.role` = '{self.role}'")
        if self.status is not None:
            clauses.append(f"attributes.status = '{self.status.upper()}'")
        if self.method is not None:
            clauses.append(f"tags.`dmgl.method` = '{self.method}'")
        if self.dataset is not None:
            clauses.append(f"tags.`dmgl.dataset` = '{self.dataset}'")
        if self.strategy is not None:
            clauses.append(f"tags.`dmgl.strategy` = '{parse_strategy(self.strategy, value_required=False).name}'")
        return " and ".join(clauses)

    def matches(self, run: RunRecord) -> bool:
        """The checks a filter string cannot make: a strategy's alpha or p."""
        if self.strategy is None:
            return True
        wanted = parse_strategy(self.strategy, value_required=False)
        if wanted.value is None:
            return run.tags.get("dmgl.strategy") == wanted.name
        spec = strategy_of(run)
        return spec is not None and spec.key == wanted.key


def list_runs(tracker: Tracker, selection: RunFilter) -> list[RunSummary]:
    """The runs ``selection`` picks, newest first, at most ``selection.limit``."""
    selection.check()
    experiments = tracker.experiments(list(selection.experiments) or None)
    if not experiments:
        return []
    filter_string = selection.filter_string()
    exact = selection.strategy is None or parse_strategy(selection.strategy, value_required=False).value is None
    if exact and selection.limit is not None:
        runs = tracker.search(list(experiments), filter_string, max_results=selection.limit)
    else:
        runs = tracker.find_runs(list(experiments), filter_string)
    runs = sorted((r for r in runs if selection.matches(r)), key=lambda r: (-r.start_time, r.run_id))
    if selection.limit is not None:
        runs = runs[: selection.limit]
    return [summarise(tracker, run, experiments) for run in runs]


# -------------------------------------------------------------------------------------------------------- show


@dataclass(frozen=True)
class RunDetail:
    """``dmgl runs show``: the run, its params, tags, final metrics and children."""

    summary: RunSummary
    params: dict[str, str]
    tags: dict[str, str]
    final: dict[str, float]
    metrics: dict[str, float]  # the latest value of every metric
    children: list[RunSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                **self.summary.to_dict(),
                "params": self.params,
                "tags": self.tags,
                "final": self.final,
                "metrics": self.metrics,
                "children": [c.to_dict() for c in self.children],
            }
        )


def show_run(tracker: Tracker, reference: str) -> RunDetail:
    """``reference``: a run's id, a unique prefix of it or its unique name (:meth:`Tracker.find_run`)."""
    run = tracker.find_run(reference)
    names = tracker.experiments()
    children = [summarise(tracker, child, names) for child in tracker.children(run.run_id)]
    return RunDetail(
        summary=summarise(tracker, run, names),
        params=dict(sorted(run.params.items())),
        tags=dict(sorted(run.tags.items())),
        final=final_metrics(run),
        metrics=dict(sorted(run.metrics.items())),
        children=children,
    )


# ----------------------------------------------------------------------------------------------------- compare


@dataclass(frozen=True)
class Comparison:
    """``dmgl runs compare``: the params that differ between the runs and their final metrics, side by side.
    Each value list follows ``runs``; None where a run lacks the key."""

    runs: list[RunSummary]
    params: dict[str, list[str | None]]
    final: dict[str, list[float | None]]
    same_params: int  # how many params every run shares with the same value

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "runs": [r.to_dict() for r in self.runs],
                "params": self.params,
                "final": self.final,
                "same_params": self.same_params,
            }
        )


def _side_by_side(mappings: list[dict[str, Any]], keys: Iterable[str]) -> dict[str, list[Any]]:
    return {key: [m.get(key) for m in mappings] for key in keys}


def _applies_to_all(key: str, runs: list[RunRecord]) -> bool:
    """Whether the recorded param ``key`` is a setting of every run (``strategy.lb.*`` is not one of a constant
    run's): only those can differ; the others are what makes the runs' strategies or methods differ."""
    return all(
        setting_applies(key, r.tags.get("dmgl.strategy", ""), r.tags.get("dmgl.method", ""))
        for r in runs
        if r.role in ("parent", "seed")
    )


def compare_runs(tracker: Tracker, references: list[str]) -> Comparison:
    """``references``: run ids, unique id prefixes or unique names (:meth:`Tracker.find_run`). Params are
    compared where they apply to every run (:func:`dmgl_cli.config.setting_applies`), so an Ours-LB setting is no
    difference against a constant run."""
    if len(references) < 2:
        raise DmglError("compare needs at least two run ids")
    runs = [tracker.find_run(reference) for reference in references]
    ids = [r.run_id for r in runs]
    repeated = sorted({r for r in ids if ids.count(r) > 1})
    if repeated:
        raise DmglError(f"run {repeated[0]} is named more than once")
    names = tracker.experiments()
    params = [r.params for r in runs]
    keys = sorted(k for k in set().union(*params) if _applies_to_all(k, runs))
    differ = [k for k in keys if len({p.get(k) for p in params}) > 1]
    finals = [final_metrics(r) for r in runs]
    metric_keys = sorted(set().union(*finals))
    return Comparison(
        runs=[summarise(tracker, r, names) for r in runs],
        params=_side_by_side(params, differ),
        final=_side_by_side(finals, metric_keys),
        same_params=len(keys) - len(differ),
    )


# ------------------------------------------------------------------------------------------------ train --dry-run


def parent_run_name(config: Config, run_name: str | None = None) -> str:
    """The parent run's name: ``--name``, or :func:`dmgl_cli.run_names.default_run_name` (``concat-constant-0.5``),
    the rule run.training.train applies."""
    from dmgl_cli.run_names import default_run_name

    return safe_name(run_name or default_run_name(config), "run name")


@dataclass(frozen=True)
class TrainPlan:
    """The runs one ``dmgl train`` would create: a parent run and one seed run under it per seed."""

    experiment: str
    parent_run: str
    seed_runs: list[str]
    seeds: list[int]
    dataset: str
    recipe: str
    method: str
    strategy: str  # a StrategySpec key
    epochs: int

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def train_plan(config: Config, seeds: list[int], run_name: str | None = None) -> TrainPlan:
    """What :func:`dmgl_cli.run.training.train` would record for ``config`` and ``seeds``; opens no store."""
    if not seeds:
        raise DmglError("at least one seed is needed")
    from dmgl_cli.run_names import seed_run_name  # the rule run.training.train applies

    parent = parent_run_name(config, run_name)
    spec = spec_from_params({k: str(v) for k, v in config.flat().items()})
    return TrainPlan(
        experiment=config.experiment or config.dataset,
        parent_run=parent,
        seed_runs=[seed_run_name(parent, s) for s in seeds],
        seeds=list(seeds),
        dataset=config.dataset,
        recipe=config.recipe,
        method=config.method.name,
        strategy=spec.key if spec else config.strategy.name,
        epochs=config.train.epochs,
    )


# ------------------------------------------------------------------------------------------ --print-config


@dataclass(frozen=True)
class ConfigListing:
    """What ``--print-config`` prints: the resolved config, the settings that differ from the recipe (``--set`` or
    ``flag``: :func:`dmgl_cli.config.setting_origins`), and for sweep and reproduce what varies around it."""

    config: Config
    origins: dict[str, str]
    notes: list[str] = field(default_factory=list)  # comment lines above the YAML
    plan: dict[str, Any] = field(default_factory=dict)  # sweep / reproduce: what each trial or row changes

    def text(self) -> str:
        from dmgl_cli.config import marked_yaml

        head = [*self.notes, "settings that differ from the recipe end in `# --set` or `# flag`"]
        return "".join(f"# {line}\n" for line in head) + marked_yaml(self.config, self.origins)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"config": self.config.to_dict(), "differs_from_recipe": self.origins, **self.plan})


def train_config_listing(config: Config, recipe: str, overrides: list[str] | tuple[str, ...]) -> ConfigListing:
    from dmgl_cli.config import setting_origins

    return ConfigListing(config, setting_origins(config, recipe, overrides))


def sweep_config_listing(request: SweepRequest) -> ConfigListing:
    """``dmgl sweep --print-config``: the base config of every trial and each strategy's settings over it, as a new
    study would plan them; opens no Optuna storage or MLflow store (a study that exists keeps its own settings)."""
    from dmgl_cli.config import parse_seeds, setting_origins
    from dmgl_cli.strategies import parse_strategies
    from dmgl_cli.sweep import DEFAULT_RECIPE, base_config
    from dmgl_cli.tunables import parse_tune

    chosen = request.recipe or DEFAULT_RECIPE
    given = request.config_overrides()
    config = base_config(request)  # as check_request resolved it
    specs = parse_strategies(request.strategies or "table4")
    tuned = parse_tune(request.tune)
    seed_list = parse_seeds(request.seeds or "1", config.train.seed)
    per_strategy = {spec.key: spec.settings() for spec in specs}
    notes = [
        f"dmgl sweep: recipe {chosen}; {len(specs)} strateg{'ies' if len(specs) != 1 else 'y'} x seeds "
        f"{','.join(map(str, seed_list))}; each trial is this config with its strategy's settings"
        + (f" and the tuned {', '.join(tuned)}" if tuned else "")
        + ":",
        *(f"  {key}: {', '.join(f'{k}={v}' for k, v in settings.items())}" for key, settings in per_strategy.items()),
        "a study that exists already trains with the settings it was created with",
    ]
    plan = {"strategies": per_strategy, "tune": tuned, "seeds": seed_list}
    return ConfigListing(config, setting_origins(config, chosen, given), notes, plan)


def reproduce_config_listing(
    table: str, dataset: str, seeds: str, recipe: str | None, overrides: list[str] | tuple[str, ...]
) -> ConfigListing:
    """``dmgl reproduce --print-config``: the config every row starts from and the method and strategy each paper
    row sets on it; opens neither the dataset nor the MLflow store (``--dry-run`` says what is reused)."""
    from dmgl_cli.config import parse_seeds, resolve, setting_origins
    from dmgl_cli.reproduce.plan import check_table, recipe_for

    paper = check_table(table)
    chosen, _ = recipe_for(paper, dataset, recipe)
    config = resolve(chosen, overrides)
    seed_list = parse_seeds(seeds, config.train.seed)
    rows = {
        row.label: {"method": row.method, "strategy": row.strategy or "published", "modality": row.modality}
        for row in paper.rows
        if dataset in row.figures
    }
    notes = [
        f"dmgl reproduce {table} on {dataset}: recipe {chosen}, seeds {','.join(map(str, seed_list))}; each row is "
        "this config with its method and strategy"
        + (":" if rows else " (rows from the dataset's modalities: --dry-run lists them)"),
        *(
            f"  {label}: method {row['method']}, strategy {row['strategy']}"
            + (f", modality {row['modality']}" if row["modality"] else "")
            for label, row in rows.items()
        ),
    ]
    plan = {"rows": rows, "seeds": seed_list}
    return ConfigListing(config, setting_origins(config, chosen, overrides), notes, plan)


__all__ = [
    "Comparison",
    "ConfigListing",
    "RunDetail",
    "RunFilter",
    "RunSummary",
    "TrainPlan",
    "compare_runs",
    "final_metrics",
    "jsonable",
    "list_runs",
    "parent_run_name",
    "run_url",
    "show_run",
    "train_plan",
    "url_of",
]
