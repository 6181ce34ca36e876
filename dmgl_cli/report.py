"""Paper-style tables and figures regenerated from recorded runs (``dmgl report``).

Reading. One MLflow search returns the seed runs (``dmgl.role=seed``) with their latest metrics, params and tags,
so a registry of a thousand runs reports in seconds; per-epoch metric histories are read only for the figures that
draw them (alpha trajectories, validation curves), and only for the runs those figures show.

Grouping. Seed runs are grouped by (dataset, method, strategy spec), where the spec tells constant alphas and
stepwise p values apart (``constant:0.5``, ``stepwise:0.95``). If a group holds several configurations (a sweep
that tuned the learning rate, two ``dmgl train`` runs with different settings), the configuration with the best
mean *validation* score is shown — never chosen on test — and a note says so; a seed recorded twice for that
configuration counts once (the latest run). Cells are mean ± std over seeds (sample std, as
:func:`dmgl_cli.metrics.summarise_over_seeds`), from each seed's ``final_<split>_*`` metrics, i.e. the scores at the
validation-selected epoch.

Tables. ``main`` (Table 1 / A1): rows method (strategy), columns dataset x (ACC, MAP) for audio-video data or
(ACC, macro-F1) for text-image data; best bold, second best underlined per column. ``strategies`` (Table 4 / A3):
fused and per-modality rows (plus their gap) x strategies, marks per row. ``ablation`` (Table 3 / A2): matching
loss on/off x dynamic integration on/off with per-modality scores and their gap. ``runs``: one line per seed run.
Formats: text, markdown, LaTeX (booktabs), and CSV/JSON with raw fractions for other programs.

The strategy specs live here (not in ``sweep``) so that reporting never imports Optuna.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmgl_cli.errors import DmglError

# ------------------------------------------------------------------------------------------ strategy specs

STRATEGY_ORDER = ("constant", "stepwise", "heuristic", "lb")
STRATEGY_GROUPS = {"constant": "Constant", "stepwise": "Stepwise", "heuristic": "Dynamic", "lb": "Dynamic"}
# The columns of the paper's Table 4 / A3, in the paper's order.
TABLE4 = ("constant:0", "constant:0.5", "constant:1", "stepwise:0", "stepwise:1", "stepwise:0.05", "stepwise:0.95",
          "heuristic", "lb")
STRATEGY_SETS: dict[str, tuple[str, ...]] = {"table4": TABLE4}


def _number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class StrategySpec:
    """One integration strategy with its setting: ``constant:0.5``, ``stepwise:0.95``, ``heuristic``, ``lb``."""

    name: str
    value: float | None = None

    @property
    def key(self) -> str:
        return self.name if self.value is None else f"{self.name}:{_number(self.value)}"

    @property
    def label(self) -> str:
        """Stand-alone column label: ``const 0.5``, ``h(0.95)``, ``heuristic``, ``LB``."""
        if self.name == "constant":
            return f"const {_number(self.value)}"
        return self.short

    @property
    def short(self) -> str:
        """Label under its group header (Constant / Stepwise / Dynamic), as in Table 4."""
        if self.name == "constant":
            return _number(self.value)
        if self.name == "stepwise":
            return f"h({_number(self.value)})"
        return "LB" if self.name == "lb" else self.name

    @property
    def group(self) -> str:
        return STRATEGY_GROUPS.get(self.name, self.name)

    def settings(self) -> dict[str, Any]:
        """Config settings (dotted keys) that select this strategy."""
        settings: dict[str, Any] = {"strategy.name": self.name}
        if self.name == "constant":
            settings["strategy.alpha"] = self.value
        elif self.name == "stepwise":
            settings["strategy.p"] = self.value
        return settings

    def sort_key(self) -> tuple:
        table4 = TABLE4.index(self.key) if self.key in TABLE4 else len(TABLE4)
        rank = STRATEGY_ORDER.index(self.name) if self.name in STRATEGY_ORDER else len(STRATEGY_ORDER)
        return (rank, table4, self.value if self.value is not None else -1.0, self.name)


_STEPWISE_ALIAS = re.compile(r"^h\((?P<p>[^)]*)\)$")


def parse_strategy(text: str) -> StrategySpec:
    """``constant:0.5`` / ``stepwise:0.95`` (or ``h(0.95)``) / ``heuristic`` / ``lb``."""
    raw = text.strip()
    alias = _STEPWISE_ALIAS.match(raw)
    name, _, value = ("stepwise", ":", alias["p"]) if alias else raw.partition(":")
    name = name.strip().lower()
    valid = "constant:A, stepwise:P (or h(P)), heuristic, lb, or the set " + ", ".join(STRATEGY_SETS)
    if name not in STRATEGY_ORDER:
        raise DmglError(f"unknown strategy {raw!r} in --strategies; valid: {valid}")
    if name in ("constant", "stepwise"):
        what = "alpha" if name == "constant" else "p"
        if not value.strip():
            raise DmglError(f"strategy {raw!r} needs its {what}, e.g. {name}:0.5")
        try:
            number = float(value)
        except ValueError:
            raise DmglError(f"strategy {raw!r}: {what} must be a number in [0, 1], got {value!r}") from None
        if not (math.isfinite(number) and 0.0 <= number <= 1.0):
            raise DmglError(f"strategy {raw!r}: {what} must be in [0, 1], got {value}")
        return StrategySpec(name, number)
    if value:
        raise DmglError(f"strategy {raw!r}: {name} takes no value (write just {name!r})")
    return StrategySpec(name)


def parse_strategies(text: str) -> list[StrategySpec]:
    """A named set (``table4``) or a comma-separated list of specs; duplicates are an error."""
    specs: list[StrategySpec] = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower() in STRATEGY_SETS:
            specs.extend(parse_strategy(k) for k in STRATEGY_SETS[part.lower()])
        elif part:
            specs.append(parse_strategy(part))
    if not specs:
        raise DmglError(f"--strategies {text!r} names no strategy; e.g. table4 or constant:0.5,stepwise:0.95,lb")
    keys = [s.key for s in specs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise DmglError(f"--strategies lists {', '.join(repeated)} more than once")
    return specs


def spec_from_params(params: dict[str, str], tags: dict[str, str] | None = None) -> StrategySpec | None:
    """The strategy spec a run was trained with, from its logged (flattened) config; None if unrecognisable."""
    name = params.get("strategy.name") or (tags or {}).get("dmgl.strategy")
    if name not in STRATEGY_ORDER:
        return None
    setting = {"constant": "strategy.alpha", "stepwise": "strategy.p"}.get(name)
    if setting is None:
        return StrategySpec(name)
    try:
        return StrategySpec(name, float(params[setting]))
    except (KeyError, ValueError):
        return None


# -------------------------------------------------------------------------------------------------- runs

# Params that differ between seeds of one configuration, or do not change what is learnt.
_NOT_CONFIGURATION = {"train.seed", "seeds", "experiment", "train.device", "data.num_workers", "train.eval_batch_size",
                      "recipe"}


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
        return sorted(k[len(prefix):] for k in self.metrics if k.startswith(prefix))


def seed_run_from_mlflow(run, experiment: str) -> SeedRun:
    tags, params = dict(run.data.tags), dict(run.data.params)
    seed = tags.get("dmgl.seed", params.get("train.seed"))
    try:
        seed_number = int(seed) if seed is not None else None
    except ValueError:
        seed_number = None
    return SeedRun(
        run_id=run.info.run_id, experiment=experiment, dataset=tags.get("dmgl.dataset", params.get("dataset", "?")),
        method=tags.get("dmgl.method", params.get("method.name", "?")), spec=spec_from_params(params, tags),
        seed=seed_number, status=run.info.status, start_time=int(run.info.start_time or 0),
        metrics=dict(run.data.metrics), params=params, tags=tags,
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
        parts = [f"experiments {', '.join(names) if names else '(none)'}" if self.experiments or names
                 else "all experiments"]
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


def select_runs(selection: Selection, tracking_uri: str | None = None) -> tuple[list[SeedRun], str]:
    """Seed runs matching ``selection`` (any status), and a sentence saying what was searched."""
    from dmgl_cli.tracking import Tracker

    tracker = Tracker(tracking_uri)
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
    seeds = [seed_run_from_mlflow(r, experiments.get(r.info.experiment_id, r.info.experiment_id)) for r in runs]
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
            warn(f"run {', run '.join(missing)} ({self.dataset} / {self.label}) has no metric {key}; "
                 + ("its cell shows -" if not values else f"the mean uses the other {len(values)} seed(s)"))
        if not values:
            return Stat(None, None, 0)
        numbers = [v for _, v in values]
        mean = sum(numbers) / len(numbers)
        std = math.sqrt(sum((v - mean) ** 2 for v in numbers) / (len(numbers) - 1)) if len(numbers) > 1 else 0.0
        return Stat(mean, std, len(numbers), tuple(r for r, _ in values))


def _validation_score(runs: list[SeedRun]) -> float:
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
            candidates.append((_validation_score(chosen), len(chosen), max(r.start_time for r in chosen), chosen))
        candidates.sort(key=lambda c: c[:3], reverse=True)
        best = candidates[0][3]
        group = Group(dataset, method, spec, best, configurations=len(configurations))
        if len(configurations) > 1 and note:
            metric = best[0].select_metric
            note(f"{dataset} / {group.label}: {len(configurations)} configurations recorded; showing the best by "
                 f"mean validation {metric} ({_validation_score(best):.4f}, runs {', '.join(r.run_id for r in best)})")
        groups.append(group)
    return sorted(groups, key=lambda g: (g.dataset, g.method, g.spec.sort_key()))


# ------------------------------------------------------------------------------------------------ tables

# Primary metrics per dataset as in the paper: audio-video (ACC, MAP), text-image and NVGesture (ACC, macro-F1).
DATASET_METRICS: dict[str, tuple[str, str]] = {
    "kinetics-sounds": ("acc", "map"),
    "crema-d": ("acc", "map"),
    "sarcasm": ("acc", "f1"),
    "twitter2015": ("acc", "f1"),
    "nvgesture": ("acc", "f1"),
}
METRIC_NAMES = {"acc": "ACC", "map": "MAP", "f1": "F1"}
TABLES = ("main", "strategies", "ablation", "runs")
FORMATS = ("text", "markdown", "latex", "csv", "json")
CHECK, CROSS = "✓", "×"


def dataset_metrics(dataset: str, modalities: Iterable[str]) -> tuple[str, str]:
    if dataset.lower() in DATASET_METRICS:
        return DATASET_METRICS[dataset.lower()]
    return ("acc", "f1") if {"text", "image"} & {m.lower() for m in modalities} else ("acc", "map")


@dataclass
class Cell:
    """A number (``mean``/``std`` over ``n`` seeds) or a piece of ``text``; ``mark`` is best / second / ''."""

    mean: float | None = None
    std: float | None = None
    n: int = 0
    kind: str = "percent"  # percent | number | integer | text
    text: str = ""
    mark: str = ""
    runs: tuple[str, ...] = ()

    @classmethod
    def of(cls, stat: Stat, kind: str = "percent") -> Cell:
        return cls(stat.mean, stat.std, stat.n, kind, runs=stat.runs)

    @classmethod
    def literal(cls, text: str) -> Cell:
        return cls(kind="text", text=text)

    def rounded(self) -> float | None:
        if self.kind == "text" or self.mean is None or not math.isfinite(self.mean):
            return None
        return round(self.mean * 100, 2) if self.kind == "percent" else round(self.mean, 3)

    def parts(self) -> tuple[str, str | None]:
        """(mean, std) as displayed; std is None for a single seed or a literal."""
        if self.kind == "text":
            return self.text, None
        if self.mean is None:
            return "-", None
        if self.kind == "integer":
            return f"{self.mean:.0f}", None
        if not math.isfinite(self.mean):
            return "nan", None
        scale, unit, digits = (100.0, "%", 2) if self.kind == "percent" else (1.0, "", 3)
        mean = f"{self.mean * scale:.{digits}f}{unit}"
        std = f"{self.std * scale:.{digits}f}{unit}" if self.n > 1 and self.std is not None else None
        return mean, std


@dataclass
class Row:
    stub: list[str]
    cells: list[Cell]


@dataclass
class Table:
    kind: str
    title: str
    stub_columns: list[str]
    columns: list[str]
    rows: list[Row] = field(default_factory=list)
    groups: list[tuple[str, int]] | None = None  # header spans over the cell columns
    dataset: str = ""
    method: str = ""
    marks: str = ""  # "column" | "row" | "": how best / second best were chosen
    notes: list[str] = field(default_factory=list)


def mark_best(cells: Sequence[Cell], higher_is_better: bool = True) -> None:
    """Best value bold, second best underlined; equal displayed values share a mark; needs two valued cells."""
    valued = [(c.rounded(), c) for c in cells if c.rounded() is not None]
    if len(valued) < 2:
        return
    distinct = sorted({v for v, _ in valued}, reverse=higher_is_better)
    for value, cell in valued:
        if value == distinct[0]:
            cell.mark = "best"
        elif len(distinct) > 1 and value == distinct[1]:
            cell.mark = "second"


def _mark_columns(table: Table, lower_is_better: Iterable[int] = ()) -> None:
    lower = set(lower_is_better)
    for index in range(len(table.columns)):
        mark_best([row.cells[index] for row in table.rows], higher_is_better=index not in lower)
    table.marks = "column"


def main_table(groups: Sequence[Group], split: str = "test", warn: Callable[[str], None] | None = None) -> Table:
    """Table 1 / A1: method (strategy) x dataset (ACC, MAP or ACC, F1), mean ± std over seeds."""
    datasets = sorted({g.dataset for g in groups})
    metrics = {d: dataset_metrics(d, {m for g in groups if g.dataset == d for m in g.modalities}) for d in datasets}
    labels = sorted({(g.method, g.spec) for g in groups}, key=lambda ms: (ms[0], ms[1].sort_key()))
    by_key = {(g.dataset, g.method, g.spec): g for g in groups}
    table = Table("main", f"Comparison of methods ({split} scores, mean ± std over seeds)", ["Method"],
                  [METRIC_NAMES[m] for d in datasets for m in metrics[d]], groups=[(d, 2) for d in datasets])
    for method, spec in labels:
        cells = []
        for dataset in datasets:
            group = by_key.get((dataset, method, spec))
            for metric in metrics[dataset]:
                cells.append(Cell.of(group.stat(f"final_{split}_{metric}", warn)) if group else Cell())
        table.rows.append(Row([f"{method} ({spec.label})"], cells))
    _mark_columns(table)
    return table


def strategies_tables(groups: Sequence[Group], split: str = "test", metric: str = "acc",
                      warn: Callable[[str], None] | None = None) -> list[Table]:
    """Table 4 / A3: fused, per-modality and gap rows x integration strategies; one table per dataset and method."""
    tables = []
    for (dataset, method) in sorted({(g.dataset, g.method) for g in groups}):
        mine = sorted((g for g in groups if (g.dataset, g.method) == (dataset, method)), key=lambda g: g.spec.sort_key())
        modalities = sorted({m for g in mine for m in g.modalities})
        spans: list[tuple[str, int]] = []
        for group in mine:
            if spans and spans[-1][0] == group.spec.group:
                spans[-1] = (group.spec.group, spans[-1][1] + 1)
            else:
                spans.append((group.spec.group, 1))
        name = METRIC_NAMES[metric]
        table = Table("strategies", f"Integration strategies on {dataset} ({method}): {split} {name}, mean ± std",
                      ["Modality"], [g.spec.short for g in mine], groups=spans, dataset=dataset, method=method,
                      marks="row")
        rows = [("Multi", f"final_{split}_{metric}")] + [(m, f"final_{split}_{metric}_{m}") for m in modalities]
        if len(modalities) > 1:
            rows.append(("Gap", f"final_{split}_gap_{metric}"))
        for label, key in rows:
            cells = [Cell.of(g.stat(key, warn)) for g in mine]
            mark_best(cells, higher_is_better=label != "Gap")
            table.rows.append(Row([label], cells))
        tables.append(table)
    return tables


def ablation_tables(groups: Sequence[Group], split: str = "test", metric: str | None = None,
                    warn: Callable[[str], None] | None = None) -> list[Table]:
    """Table 3 / A2: matching loss (CL) and dynamic integration (DI) on/off.

    CL×/DI× is ``constant:0`` (classification only); CL✓/DI× the constant 0 < alpha < 1 with the best validation
    score; CL✓/DI✓ the dynamic strategies (heuristic, then learning-based). Default metric: the dataset's second
    one (MAP or F1), as in the paper."""
    tables = []
    for (dataset, method) in sorted({(g.dataset, g.method) for g in groups}):
        mine = [g for g in groups if (g.dataset, g.method) == (dataset, method)]
        modalities = sorted({m for g in mine for m in g.modalities})
        chosen_metric = metric or dataset_metrics(dataset, modalities)[1]
        by_spec = {g.spec.key: g for g in mine}
        constants = [g for g in mine if g.spec.name == "constant" and 0.0 < (g.spec.value or 0.0) < 1.0]
        rows: list[tuple[str, str, Group]] = []
        if "constant:0" in by_spec:
            rows.append((CROSS, CROSS, by_spec["constant:0"]))
        if constants:
            rows.append((CHECK, CROSS, max(constants, key=lambda g: _validation_score(g.runs))))
        rows += [(CHECK, CHECK, by_spec[k]) for k in ("heuristic", "lb") if k in by_spec]
        if not rows:
            if warn:
                warn(f"no ablation table for {dataset} / {method}: it needs constant:0, a constant 0<alpha<1, "
                     "heuristic or lb runs")
            continue
        name = METRIC_NAMES[chosen_metric]
        columns = ["Multi", *modalities] + (["GAP"] if len(modalities) > 1 else [])
        table = Table("ablation", f"Ablation on {dataset} ({method}): {split} {name}; CL = matching loss, "
                      "DI = dynamic integration", ["CL", "DI", "Strategy"], columns, groups=[(name, len(columns))],
                      dataset=dataset, method=method)
        for cl, di, group in rows:
            keys = [f"final_{split}_{chosen_metric}"] + [f"final_{split}_{chosen_metric}_{m}" for m in modalities]
            if len(modalities) > 1:
                keys.append(f"final_{split}_gap_{chosen_metric}")
            table.rows.append(Row([cl, di, group.spec.label], [Cell.of(group.stat(k, warn)) for k in keys]))
        _mark_columns(table, lower_is_better=[len(columns) - 1] if len(modalities) > 1 else [])
        tables.append(table)
    return tables


def runs_table(runs: Sequence[SeedRun], split: str = "test", warn: Callable[[str], None] | None = None) -> Table:
    """One line per seed run, any status."""
    table = Table("runs", f"Seed runs ({split} scores at the validation-selected epoch)",
                  ["Run", "Parent", "Dataset", "Method", "Strategy", "Seed", "Status"],
                  ["Best epoch", "Val (select)", f"{split} ACC", f"{split} MAP", f"{split} F1", "Modality gap"])
    ordered = sorted(runs, key=lambda r: (r.dataset, r.method, r.spec.sort_key() if r.spec else (9,), r.seed or 0,
                                          r.start_time))
    for run in ordered:
        keys = ["final_best_epoch", f"final_val_{run.select_metric}"] + [f"final_{split}_{m}" for m in ("acc", "map", "f1")]
        missing = [k for k in keys if k not in run.metrics]
        if missing and run.status == "FINISHED" and warn:
            warn(f"run {run.run_id} ({run.dataset} / {run.method}) has no metric {', '.join(missing)}; shown as -")
        cells = [Cell(run.metrics.get(keys[0]), None, 1, "integer")]
        cells += [Cell(run.metrics.get(k), None, 1) for k in keys[1:]]
        cells.append(Cell(run.metrics.get(f"final_{split}_modality_gap"), None, 1, "number"))
        table.rows.append(Row([run.run_id, run.parent_id[:12], run.dataset, run.method,
                               run.spec.label if run.spec else run.tags.get("dmgl.strategy", "?"),
                               "" if run.seed is None else str(run.seed), run.status], cells))
    return table


def attach_notes(tables: Sequence[Table], notes: Sequence[str]) -> None:
    """Give each table the grouping notes about its own cells (notes read "DATASET / METHOD (STRATEGY): ...")."""
    for table in tables:
        prefix = f"{table.dataset} / {table.method} (" if table.dataset else ""
        table.notes.extend(n for n in notes if n.startswith(prefix))


def build_tables(kind: str, runs: Sequence[SeedRun], split: str = "test", metric: str | None = None,
                 warn: Callable[[str], None] | None = None, note: Callable[[str], None] | None = None) -> list[Table]:
    if kind not in TABLES:
        raise DmglError(f"unknown table {kind!r}; valid: {', '.join(TABLES)}")
    if split not in ("val", "test"):
        raise DmglError(f"--split must be val or test, got {split!r}")
    if metric is not None and metric not in METRIC_NAMES:
        raise DmglError(f"unknown metric {metric!r}; valid: {', '.join(METRIC_NAMES)}")
    if kind == "runs":
        return [runs_table(runs, split, warn)]
    groups = group_runs(runs, note)
    if kind == "main":
        return [main_table(groups, split, warn)]
    if kind == "strategies":
        return strategies_tables(groups, split, metric or "acc", warn)
    return ablation_tables(groups, split, metric, warn)


# --------------------------------------------------------------------------------------------- rendering

_ANSI = {"best": ("\033[1m", "\033[0m"), "second": ("\033[4m", "\033[0m")}
_PLAIN = {"best": ("*", "*"), "second": ("_", "_")}
_MARKDOWN = {"best": ("**", "**"), "second": ("<u>", "</u>")}
_LATEX = {"best": (r"\textbf{", "}"), "second": (r"\underline{", "}")}
_ANSI_CODE = re.compile(r"\033\[[0-9;]*m")


def _display(cell: Cell, style: dict[str, tuple[str, str]], pm: str = " ± ") -> str:
    mean, std = cell.parts()
    text = mean if std is None else f"{mean}{pm}{std}"
    if cell.mark and cell.mark in style:
        before, after = style[cell.mark]
        text = f"{before}{text}{after}"
    return text


def _width(text: str) -> int:
    return len(_ANSI_CODE.sub("", text))


def _legend(table: Table, best: str, second: str) -> str | None:
    if not any(c.mark for r in table.rows for c in r.cells):
        return None
    return f"{best} best, {second} second best per {table.marks or 'column'}"


def render_text(table: Table, color: bool = False) -> str:
    style = _ANSI if color else _PLAIN
    header = table.stub_columns + table.columns
    body = [row.stub + [_display(c, style) for c in row.cells] for row in table.rows]
    widths = [max([_width(h)] + [_width(line[i]) for line in body]) for i, h in enumerate(header)]
    stub = len(table.stub_columns)

    def line(values: list[str]) -> str:
        out = []
        for i, value in enumerate(values):
            pad = " " * (widths[i] - _width(value))
            out.append(value + pad if i < stub else pad + value)
        return "  ".join(out).rstrip()

    lines = [table.title]
    if table.groups:
        spans, index = [" " * (sum(widths[:stub]) + 2 * (stub - 1))], stub
        for label, span in table.groups:
            width = sum(widths[index:index + span]) + 2 * (span - 1)
            spans.append(label[:width].center(width))
            index += span
        lines.append("  ".join(spans).rstrip())
    lines.append(line(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(values) for values in body)
    legend = _legend(table, "bold" if color else "*x*", "underlined" if color else "_x_")
    if legend:
        lines.append(legend)
    lines.extend(f"note: {n}" for n in table.notes)
    return "\n".join(lines) + "\n"


def _markdown_escape(text: str) -> str:
    return text.replace("|", r"\|")


def render_markdown(table: Table) -> str:
    header = list(table.stub_columns)
    index = 0
    for label, span in table.groups or []:
        header += [f"{label} {column}" for column in table.columns[index:index + span]]
        index += span
    header += table.columns[index:]
    align = [":--"] * len(table.stub_columns) + ["--:"] * len(table.columns)
    lines = [f"**{_markdown_escape(table.title)}**", "", "| " + " | ".join(map(_markdown_escape, header)) + " |",
             "| " + " | ".join(align) + " |"]
    for row in table.rows:
        values = [_markdown_escape(s) for s in row.stub] + [_markdown_escape(_display(c, _MARKDOWN)) for c in row.cells]
        lines.append("| " + " | ".join(values) + " |")
    legend = _legend(table, "**bold**:", "<u>underlined</u>:")
    if legend:
        lines += ["", legend]
    lines.extend(f"\nNote: {_markdown_escape(n)}" for n in table.notes)
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", CHECK: r"\checkmark", CROSS: r"$\times$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_label(table: Table) -> str:
    parts = ["tab:dmgl", table.kind] + [p for p in (table.dataset, table.method) if p]
    return re.sub(r"[^A-Za-z0-9:.-]+", "-", "-".join(parts))


_WIDE = 6  # value columns beyond which a table is scaled to the line width


def render_latex(table: Table) -> str:
    stub, count = len(table.stub_columns), len(table.columns)
    tabular = f"\\begin{{tabular}}{{{'l' * stub}{'c' * count}}}"
    lines = [r"\begin{table}[t]", r"  \centering", f"  \\caption{{{latex_escape(table.title)}}}",
             f"  \\label{{{_latex_label(table)}}}",
             f"  \\resizebox{{\\linewidth}}{{!}}{{{tabular}" if count > _WIDE else f"  {tabular}",
             r"    \toprule"]
    if table.groups:
        heads, rules, index = [""] * stub, [], stub + 1
        for label, span in table.groups:
            heads.append(f"\\multicolumn{{{span}}}{{c}}{{{latex_escape(label)}}}" if span > 1 else latex_escape(label))
            rules.append(f"\\cmidrule(lr){{{index}-{index + span - 1}}}")
            index += span
        lines.append("    " + " & ".join(heads) + r" \\")
        lines.append("    " + " ".join(rules))
    lines.append("    " + " & ".join(latex_escape(h) for h in table.stub_columns + table.columns) + r" \\")
    lines.append(r"    \midrule")
    for row in table.rows:
        cells = []
        for cell in row.cells:
            mean, std = cell.parts()
            text = latex_escape(mean)
            if std is not None:  # a small std keeps wide tables readable, as in most ML papers
                text += f" {{\\scriptsize $\\pm$ {latex_escape(std)}}}"
            if cell.mark in _LATEX:
                before, after = _LATEX[cell.mark]
                text = f"{before}{text}{after}"
            cells.append(text)
        lines.append("    " + " & ".join([latex_escape(s) for s in row.stub] + cells) + r" \\")
    lines += [r"    \bottomrule", r"  \end{tabular}}" if count > _WIDE else r"  \end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


LATEX_PREAMBLE = ("% generated by `dmgl report`; needs \\usepackage{booktabs} (graphicx for \\resizebox, amssymb for "
                  "\\checkmark)\n")


def _cell_json(cell: Cell) -> dict[str, Any]:
    if cell.kind == "text":
        return {"text": cell.text}
    return {"mean": cell.mean, "std": cell.std if cell.n > 1 else None, "n": cell.n, "mark": cell.mark or None,
            "runs": list(cell.runs)}


def render_json(tables: Sequence[Table], warnings: Sequence[str] = ()) -> str:
    data = {
        "tables": [{
            "kind": t.kind, "title": t.title, "dataset": t.dataset or None, "method": t.method or None,
            "stub_columns": t.stub_columns, "columns": t.columns,
            "column_groups": [list(g) for g in t.groups] if t.groups else None, "marks": t.marks or None,
            "rows": [{"stub": r.stub, "cells": [_cell_json(c) for c in r.cells]} for r in t.rows],
            "notes": t.notes,
        } for t in tables],
        "warnings": list(warnings),
    }
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


CSV_COLUMNS = ["table", "dataset", "method", "row", "group", "column", "text", "mean", "std", "n", "mark"]


def render_csv(tables: Sequence[Table]) -> str:
    """Tidy CSV: one line per cell, raw fractions (not percentages), for pandas & co."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for table in tables:
        column_groups = []
        for label, span in table.groups or []:
            column_groups += [label] * span
        column_groups += [""] * (len(table.columns) - len(column_groups))
        for row in table.rows:
            for column, group, cell in zip(table.columns, column_groups, row.cells, strict=True):
                numeric = cell.kind != "text"
                writer.writerow([
                    table.kind, table.dataset, table.method, " / ".join(row.stub), group, column,
                    cell.text if not numeric else "",
                    "" if not numeric or cell.mean is None else repr(cell.mean),
                    "" if not numeric or cell.std is None or cell.n < 2 else repr(cell.std),
                    cell.n if numeric else "", cell.mark,
                ])
    return out.getvalue()


def render(tables: Sequence[Table], fmt: str, warnings: Sequence[str] = (), color: bool = False) -> str:
    if fmt not in FORMATS:
        raise DmglError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "json":
        return render_json(tables, warnings)
    if fmt == "csv":
        return render_csv(tables)
    if fmt == "latex":
        return LATEX_PREAMBLE + "\n".join(render_latex(t) for t in tables)
    if fmt == "markdown":
        return "\n".join(render_markdown(t) for t in tables)
    return "\n".join(render_text(t, color) for t in tables)


# ------------------------------------------------------------------------------------------------- plots

PLOTS = ("alpha", "gap", "curves")


def _safe_file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def _mean_trajectory(series: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for history in series:
        for step, value in history:
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def write_plots(kinds: Sequence[str], runs: Sequence[SeedRun], out_dir: Path, split: str = "test",
                metric: str = "acc", tracking_uri: str | None = None, warn: Callable[[str], None] | None = None,
                note: Callable[[str], None] | None = None) -> list[Path]:
    """Write the requested figures as PNG under ``out_dir``; returns the files written."""
    from dmgl_cli import plots
    from dmgl_cli.tracking import Tracker

    unknown = [k for k in kinds if k not in PLOTS]
    if unknown:
        raise DmglError(f"unknown plot {', '.join(unknown)}; valid: {', '.join(PLOTS)}")
    groups = group_runs(runs, note)
    tracker = Tracker(tracking_uri) if {"alpha", "curves"} & set(kinds) else None
    written: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    if "alpha" in kinds:
        trajectories, bands = {}, {}
        lb = [g for g in groups if g.spec.name == "lb"]
        if not lb:
            raise DmglError("--plot alpha needs runs of the learning-based strategy (lb); none is selected")
        for group in lb:
            series = [tracker.metric_history(r.run_id, "alpha") for r in group.runs]
            series = [s for s in series if s]
            if not series:
                if warn:
                    warn(f"runs {', '.join(r.run_id for r in group.runs)} ({group.dataset}) recorded no alpha")
                continue
            _, mean = _mean_trajectory(series)
            label = f"{group.dataset} ({group.method}, {len(series)} seed{'s' if len(series) > 1 else ''})"
            trajectories[label] = mean
            if len(series) > 1:
                length = min(len(s) for s in series)
                bands[label] = ([min(s[i][1] for s in series) for i in range(length)],
                                [max(s[i][1] for s in series) for i in range(length)])
        figure = plots.alpha_figure(trajectories, title="Learned alpha during training (mean over seeds; band: min-max)",
                                    bands=bands)
        written.append(plots.save_png(figure, out_dir / "alpha.png"))
    if "gap" in kinds:
        for dataset in sorted({g.dataset for g in groups}):
            mine = [g for g in groups if g.dataset == dataset]
            modalities = sorted({m for g in mine for m in g.modalities})
            scores, distances = {}, {}
            for group in mine:
                values = {"fused": group.stat(f"final_{split}_{metric}", warn).mean}
                values.update({m: group.stat(f"final_{split}_{metric}_{m}", warn).mean for m in modalities})
                scores[group.label] = values
                distances[group.label] = group.stat(f"final_{split}_modality_gap", warn).mean
            figure = plots.gap_figure(scores, distances, title=f"{dataset}: per-modality {split} "
                                      f"{METRIC_NAMES[metric]} and modality gap", metric=METRIC_NAMES[metric])
            written.append(plots.save_png(figure, out_dir / f"gap-{_safe_file_part(dataset)}.png"))
    if "curves" in kinds:
        for dataset in sorted({g.dataset for g in groups}):
            panels = {}
            for group in (g for g in groups if g.dataset == dataset):
                keys = [f"val_{metric}"] + [f"val_{metric}_{m}" for m in group.modalities]
                curves = {}
                for key in keys:
                    series = [s for s in (tracker.metric_history(r.run_id, key) for r in group.runs) if s]
                    if series:
                        curves["fused" if key == f"val_{metric}" else key.rsplit("_", 1)[-1]] = _mean_trajectory(series)
                panels[group.label] = curves
            figure = plots.curves_figure(panels, title=f"{dataset}: validation {METRIC_NAMES[metric]} per epoch "
                                         "(mean over seeds)", metric=METRIC_NAMES[metric])
            written.append(plots.save_png(figure, out_dir / f"curves-{_safe_file_part(dataset)}.png"))
    return written


# ------------------------------------------------------------------------------------------------ facade


@dataclass
class Report:
    text: str
    tables: list[Table]
    plots: list[Path]
    warnings: list[str]
    notes: list[str]
    runs: int


def make_report(selection: Selection, *, table: str | None = "main", fmt: str = "text", split: str = "test",
                metric: str | None = None, plot_kinds: Sequence[str] = (), out_dir: Path | None = None,
                tracking_uri: str | None = None, color: bool = False) -> Report:
    """Select runs, build the table (if any) and write the figures (if any)."""
    if table is not None and table not in TABLES:
        raise DmglError(f"unknown table {table!r}; valid: {', '.join(TABLES)}")
    if fmt not in FORMATS:
        raise DmglError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    warnings: list[str] = []
    notes: list[str] = []
    warn = _once(warnings)
    note = _once(notes)
    runs, searched = select_runs(selection, tracking_uri)
    if not runs:
        raise DmglError(f"no seed runs match ({searched}); train or sweep first, or widen the selection")
    finished = [r for r in runs if r.status == "FINISHED"]
    if table not in (None, "runs") and not finished:
        raise DmglError(f"{len(runs)} seed run(s) match ({searched}) but none finished; `--table runs` lists them")
    tables = build_tables(table, runs, split, metric, warn, note) if table else []
    attach_notes(tables, notes)
    written = []
    if plot_kinds:
        written = write_plots(plot_kinds, runs, out_dir or Path("dmgl-report"), split, metric or "acc", tracking_uri,
                              warn, note)
    text = render(tables, fmt, warnings, color) if tables else ""
    return Report(text, tables, written, warnings, notes, len(runs))


def _once(sink: list[str]) -> Callable[[str], None]:
    def add(message: str) -> None:
        if message not in sink:
            sink.append(message)

    return add
