"""``dmgl reproduce TABLE --dataset NAME``: the paper's published figures next to dmgl's own measurements.

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

**Running the rest: one ``runner.train`` call per row, not an Optuna study.** The plan is a fixed grid with nothing
to sample or prune, and what is missing is decided per (configuration, seed): a row may need seed 2 only. One
``runner.train(config, missing_seeds)`` per row trains exactly the missing seeds and records them as ``dmgl train``
does (a parent run per row with its seed runs, tag ``dmgl.reproduce=TABLE``), so ``dmgl report`` and later
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

import importlib.resources
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from dmgl_cli.config import Config, parse_seeds, recipe_path, recorded_params, resolve
from dmgl_cli.errors import DmglError
from dmgl_cli.report.labels import method_label, row_label
from dmgl_cli.report.selection import Group, SeedRun, Selection, Stat, group_runs, select_runs
from dmgl_cli.report.tables import dataset_metrics
from dmgl_cli.strategies import parse_strategy, spec_from_params
from dmgl_cli.tables import Cell, Row, Table, render, render_latex

if TYPE_CHECKING:
    from dmgl_cli.data.prepared import PreparedDataset
    from dmgl_cli.tracking import Tracker

PAPER_RESULTS = "paper_results.yaml"
TABLES = ("table1", "table2", "table4", "table5")
FORMATS = ("text", "markdown", "latex")
REPRODUCE_TAG = "dmgl.reproduce"
METRIC_LABELS = {"acc": "ACC", "map": "MAP", "f1": "F1"}
LATEX_PREAMBLE = "% generated by `dmgl reproduce`; needs \\usepackage{booktabs,array,graphicx}\n"

__all__ = [
    "FORMATS",
    "TABLES",
    "Column",
    "PaperRow",
    "PaperTable",
    "Plan",
    "PlannedRow",
    "Reproduction",
    "compare",
    "paper_tables",
    "plan_reproduction",
    "reproduce",
    "run_plan",
]

# --------------------------------------------------------------------------------------------- paper figures


@dataclass(frozen=True)
class Column:
    """One figure column: ``metric`` (acc, map, f1) on the fused prediction, or on the dataset's one modality of
    kind ``modality`` (audio, video, image, text); ``=NAME`` names a modality itself (datasets the paper never
    used)."""

    id: str
    label: str
    metric: str
    modality: str | None = None


@dataclass(frozen=True)
class PaperDataset:
    recipe: str
    cite: str
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class PaperRow:
    label: str  # the paper's name for the row (Ours-LB, h(0.05), CLIP+MLA)
    cite: str
    method: str  # a key of dmgl_cli.methods.METHODS
    strategy: str | None  # a StrategySpec key; None: the method's published strategy
    modality: str | None  # unimodal rows: the kind of the one modality trained
    figures: dict[str, dict[str, float]]  # dataset -> column id -> percent
    std: dict[str, dict[str, float]] = field(default_factory=dict)  # Table A1's std, where the paper gives one


@dataclass(frozen=True)
class PaperTable:
    name: str
    cite: str
    title: str
    datasets: dict[str, PaperDataset]
    rows: tuple[PaperRow, ...]

    def covers(self) -> str:
        """``kinetics-sounds (Table 4), crema-d (Table A3 ...)``."""
        return ", ".join(f"{name} ({d.cite})" for name, d in self.datasets.items())


def _load() -> dict[str, Any]:
    text = importlib.resources.files("dmgl_cli").joinpath(PAPER_RESULTS).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def paper_tables() -> dict[str, PaperTable]:
    """The paper's published figures, by table name (``table1``, ``table2``, ``table4``, ``table5``)."""
    tables = {}
    for name, raw in _load()["tables"].items():
        datasets = {
            dataset: PaperDataset(
                recipe=spec["recipe"],
                cite=spec["cite"],
                columns=tuple(Column(c["id"], c["label"], c["metric"], c.get("modality")) for c in spec["columns"]),
            )
            for dataset, spec in raw["datasets"].items()
        }
        rows = tuple(
            PaperRow(
                label=str(row["paper"]),
                cite=row["cite"],
                method=row["method"],
                strategy=None if row.get("strategy") is None else str(row["strategy"]),
                modality=row.get("modality"),
                figures={d: {c: float(v) for c, v in f.items()} for d, f in row.get("figures", {}).items()},
                std={d: {c: float(v) for c, v in f.items()} for d, f in (row.get("std") or {}).items()},
            )
            for row in raw["rows"]
        )
        tables[name] = PaperTable(name, raw["cite"], raw["title"], datasets, rows)
    return tables


def paper_datasets() -> list[str]:
    """The datasets that the tables dmgl reproduces report on (kinetics-sounds, crema-d, sarcasm, twitter2015)."""
    names: dict[str, None] = {}
    for table in paper_tables().values():
        names.update(dict.fromkeys(table.datasets))
    return list(names)


# ------------------------------------------------------------------------------------------------------ plan


@dataclass
class PlannedRow:
    """One row of the table: a configuration, its seeds, which are recorded already and which are to train."""

    label: str  # paper style
    code: str  # dmgl's own name: concat (LB), ogm-ge (const 0), unimodal audio (const 0)
    cite: str
    method: str
    strategy: str  # the StrategySpec key it trains with
    modality: str | None  # unimodal rows: the dmgl modality name
    paper: dict[str, tuple[float, float | None]]  # column id -> (percent, std or None)
    config: Config | None = None
    config_key: str = ""  # SeedRun.config_key of its runs
    reused: dict[int, str] = field(default_factory=dict)  # seed -> run id
    to_train: list[int] = field(default_factory=list)
    trained: dict[int, str] = field(default_factory=dict)  # seed -> run id, filled by run_plan
    skipped: str | None = None  # why the row cannot run on this dataset

    def to_dict(self) -> dict[str, Any]:
        return {
            "row": self.label,
            "dmgl": self.code,
            "cite": self.cite,
            "method": self.method,
            "strategy": self.strategy,
            "modality": self.modality,
            "reused": {str(s): r for s, r in sorted(self.reused.items())},
            "to_train": list(self.to_train),
            "trained": {str(s): r for s, r in sorted(self.trained.items())},
            "skipped": self.skipped,
        }


@dataclass
class Plan:
    table: str
    dataset: str  # as given (the paper's column)
    recorded_dataset: str  # the prepared dataset the recipe trains on
    recipe: str
    cite: str | None  # where the figures come from; None: the paper has none for this dataset
    title: str
    table_cite: str  # the paper's table(s): Table 1, Table 4 / Table A3, Table 5
    columns: list[Column]
    measured_keys: dict[str, str | None]  # column id -> final_test_* metric key (None: no such modality)
    seeds: list[int]
    epochs: int | None
    experiment: str
    rows: list[PlannedRow]
    omitted: list[str] = field(default_factory=list)  # paper rows without a figure for this dataset (not run)
    notes: list[str] = field(default_factory=list)

    @property
    def has_paper(self) -> bool:
        return self.cite is not None

    @property
    def no_figures(self) -> str:
        """The line that says the paper has no figures for this dataset."""
        return f"the paper has no {self.table_cite} figures for {self.dataset}; measured side only"

    @property
    def reused_count(self) -> int:
        return sum(len(r.reused) for r in self.rows)

    @property
    def train_count(self) -> int:
        return sum(len(r.to_train) for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "dataset": self.dataset,
            "recorded_dataset": self.recorded_dataset,
            "recipe": self.recipe,
            "paper": self.cite,
            "paper_table": self.table_cite,
            "seeds": list(self.seeds),
            "epochs": self.epochs,
            "experiment": self.experiment,
            "reused": self.reused_count,
            "to_train": self.train_count,
            "rows": [r.to_dict() for r in self.rows],
            "omitted": list(self.omitted),
            "notes": list(self.notes),
        }


def _check_table(table: str) -> PaperTable:
    tables = paper_tables()
    if table not in tables:
        raise DmglError(f"unknown table {table!r}; valid: {', '.join(tables)}")
    return tables[table]


def _recipe_for(paper: PaperTable, dataset: str, recipe: str | None) -> tuple[str, str | None]:
    """(recipe, cite): the recipe the rows train with and where the paper's figures come from (None: nowhere)."""
    covered = paper.datasets.get(dataset)
    if covered is None and dataset in paper_datasets():
        elsewhere = [name for name, table in paper_tables().items() if dataset in table.datasets]
        raise DmglError(
            f"{paper.cite} has no figures for {dataset}; it covers {paper.covers()}. The paper's figures for "
            f"{dataset} are in: {', '.join(elsewhere)}"
        )
    chosen = recipe or (covered.recipe if covered else dataset)
    try:
        recipe_path(chosen)
    except DmglError as exc:
        if covered is not None and recipe is None:
            raise DmglError(
                f"{paper.cite} on {dataset} trains with recipe {chosen!r}, which is not installed ({exc}); "
                "update dmgl, or pass --recipe with a recipe of your own"
            ) from None
        if recipe is None:
            raise DmglError(
                f"unknown dataset {dataset!r}: {paper.cite} covers {paper.covers()}, and no recipe is named "
                f"{dataset!r} for a dataset of your own (`dmgl recipes` lists them; or pass --recipe)"
            ) from None
        raise
    return chosen, covered.cite if covered else None


def _prepare_hint(recipe: str) -> str:
    """`` (recipe R shows how: dmgl prepare ...)``, from the recipe's header comment, if it shows one."""
    try:
        lines = recipe_path(recipe).read_text(encoding="utf-8").splitlines()
    except (DmglError, OSError):
        return ""
    for line in lines:
        command = line.lstrip("#").strip()
        if line.startswith("#") and command.startswith("dmgl prepare "):
            return f" (recipe {recipe} shows how: {command})"
    return ""


def _modality_of(dataset: PreparedDataset, kind: str) -> tuple[str | None, str]:
    """The dataset's one modality of ``kind`` (audio, video, image, text), or (None, why not)."""
    names = [name for name, spec in dataset.modalities.items() if spec.get("kind") == kind]
    if len(names) == 1:
        return names[0], ""
    if not names:
        return None, f"the dataset has no {kind} modality"
    return None, f"the dataset has several {kind} modalities ({', '.join(names)})"


def _generic_columns(table: str, dataset: PreparedDataset, name: str) -> list[Column]:
    """The columns of a dataset the paper never used: Table 1's two metrics, or fused + per-modality ACC."""
    kinds = {str(spec.get("kind", "")) for spec in dataset.modalities.values()} | set(dataset.modalities)
    if table in ("table1", "table2"):
        return [Column(m, METRIC_LABELS[m], m) for m in dataset_metrics(name, kinds)]
    columns = [Column("multi", "Multi", "acc")]
    for modality in dataset.modalities:
        columns.append(Column(modality, modality, "acc", modality=f"={modality}"))  # "=name": the modality itself
    return columns


def _generic_rows(paper: PaperTable, dataset: PreparedDataset) -> list[PaperRow]:
    """A dataset the paper never used: every method / strategy row of the table without figures; Table 1's
    uni-modal rows become one per modality of the dataset."""
    rows = [r for r in paper.rows if r.method != "unimodal"]
    if any(r.method == "unimodal" for r in paper.rows):
        unimodal = [
            PaperRow(m[:1].upper() + m[1:], paper.cite, "unimodal", None, f"={m}", {}) for m in dataset.modalities
        ]
        rows = unimodal + rows
    return [PaperRow(r.label, r.cite, r.method, r.strategy, r.modality, {}) for r in rows]


def _resolve_modality(dataset: PreparedDataset, kind: str | None) -> tuple[str | None, str]:
    if kind is None:
        return None, ""
    if kind.startswith("="):
        return kind[1:], ""
    return _modality_of(dataset, kind)


def _config_key(config: Config, checksum: str) -> str:
    """The :attr:`SeedRun.config_key` that ``runner.train`` would record for ``config`` on data with ``checksum``:
    its params as ``Tracker.log_params`` stores them (text) and the checksum tag."""
    params = {key: str(value) for key, value in recorded_params(config).items()}
    planned = SeedRun(
        run_id="",
        experiment="",
        dataset=config.dataset,
        method=config.method.name,
        spec=spec_from_params(params),
        seed=None,
        status="PLANNED",
        start_time=0,
        metrics={},
        params=params,
        tags={"dmgl.dataset_checksum": checksum},
    )
    return planned.config_key


def _matching_group(runs: Sequence[SeedRun], key: str, seeds: Sequence[int]) -> Group | None:
    """The finished runs of configuration ``key`` for ``seeds``, the latest per seed (``group_runs``' rule)."""
    wanted = set(seeds)
    matching = [r for r in runs if r.status == "FINISHED" and r.seed in wanted and r.config_key == key]
    groups = group_runs(matching)
    return groups[0] if groups else None


def plan_reproduction(
    table: str,
    dataset: str,
    *,
    tracker: Tracker,
    seeds: str = "3",
    recipe: str | None = None,
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
) -> Plan:
    """What reproducing ``table`` on ``dataset`` needs: rows x seeds, each seed reused (a finished run with the same
    configuration and seed) or to train. Raises DmglError for an unknown table, a paper dataset the table does not
    cover, a missing recipe, an unprepared dataset or an ``only`` that names no row."""
    from dmgl_cli.data.registry import open_dataset

    paper = _check_table(table)
    parse_seeds(seeds, 0)  # its form, before any config resolves
    chosen_recipe, cite = _recipe_for(paper, dataset, recipe)
    base = resolve(chosen_recipe, overrides)
    covered = paper.datasets.get(dataset)
    if covered is not None:  # the paper's rows: --only is checked before the dataset is opened
        rows = _only([r for r in paper.rows if dataset in r.figures], only)
        omitted = [r.label for r in paper.rows if dataset not in r.figures and r.method != "unimodal"]
    try:
        prepared = open_dataset(base.dataset)
    except DmglError as exc:
        raise DmglError(f"{exc}{_prepare_hint(chosen_recipe)}") from None
    seed_list = parse_seeds(seeds, base.train.seed)
    if covered is not None:
        columns = list(covered.columns)
    else:
        columns = _generic_columns(table, prepared, base.dataset)
        rows, omitted = _only(_generic_rows(paper, prepared), only), []
    notes: list[str] = []
    measured_keys: dict[str, str | None] = {}
    for column in columns:
        name, why = _resolve_modality(prepared, column.modality)
        if column.modality is not None and name is None:
            measured_keys[column.id] = None
            notes.append(f"column {column.label}: {why}; not measured")
        else:
            measured_keys[column.id] = f"final_test_{column.metric}" + (f"_{name}" if name else "")
    planned: list[PlannedRow] = []
    for row in rows:
        planned.append(_plan_row(row, dataset, chosen_recipe, overrides, prepared))
    existing, _ = select_runs(Selection(datasets=[base.dataset]), tracker)
    for row in planned:
        if row.config is None:
            continue
        group = _matching_group(existing, row.config_key, seed_list)
        row.reused = {r.seed: r.run_id for r in group.runs if r.seed is not None} if group else {}
        row.to_train = [s for s in seed_list if s not in row.reused]
    return Plan(
        table=table,
        dataset=dataset,
        recorded_dataset=base.dataset,
        recipe=chosen_recipe,
        cite=cite,
        title=paper.title,
        table_cite=paper.cite,
        columns=columns,
        measured_keys=measured_keys,
        seeds=seed_list,
        epochs=base.train.epochs,
        experiment=base.experiment or base.dataset,
        rows=planned,
        omitted=omitted,
        notes=notes,
    )


def _row_names(row: PaperRow) -> set[str]:
    """What ``--only`` may call a row: its paper name, its strategy key (``constant:0.5``, ``lb``), and the
    method's name for a comparison method (``ogm-ge``; ``concat`` and ``unimodal`` name several rows)."""
    names = {row.label.lower()}
    if row.strategy:
        names.add(row.strategy.lower())
    if row.method not in ("concat", "unimodal"):
        names.add(row.method.lower())
    return names


def _only(rows: list[PaperRow], only: Sequence[str]) -> list[PaperRow]:
    """The rows ``only`` names (a paper label, a method, a strategy key such as ``constant:0.5`` or ``h(0.05)``)."""
    if not only:
        return rows
    wanted: list[str] = []
    for text in only:
        for part in text.split(","):
            part = part.strip().lower()
            if not part:
                continue
            try:  # h(0.05) and stepwise:0.050 name the key stepwise:0.05
                part = parse_strategy(part).key if part.startswith(("constant", "stepwise", "h(")) else part
            except DmglError:
                pass
            wanted.append(part)
    chosen = [r for r in rows if _row_names(r) & set(wanted)]
    unknown = [w for w in wanted if not any(w in _row_names(r) for r in rows)]
    if unknown:
        raise DmglError(
            f"--only {', '.join(unknown)} names no row of this table; its rows: {', '.join(r.label for r in rows)}"
        )
    return chosen


def _plan_row(
    row: PaperRow, dataset: str, recipe: str, overrides: Sequence[str], prepared: PreparedDataset
) -> PlannedRow:
    paper = {
        column: (value, row.std.get(dataset, {}).get(column)) for column, value in row.figures.get(dataset, {}).items()
    }
    spec = parse_strategy(row.strategy) if row.strategy else None
    modality, why = _resolve_modality(prepared, row.modality)
    planned = PlannedRow(
        label=row.label,
        code=method_label(row.method, modality or ""),
        cite=row.cite,
        method=row.method,
        strategy=spec.key if spec else "published",
        modality=modality,
        paper=paper,
    )
    if row.modality is not None and modality is None:
        planned.skipped = why
        return planned
    try:
        config = resolve(recipe, overrides, strategy=spec, method=row.method, modality=modality)
    except DmglError as exc:
        planned.skipped = str(exc)
        return planned
    recorded = spec_from_params({k: str(v) for k, v in recorded_params(config).items()})
    if recorded is not None:
        planned.strategy = recorded.key
        planned.code = row_label(row.method, recorded, modality or "")
    planned.config = config
    planned.config_key = _config_key(config, prepared.checksum)
    return planned


# ------------------------------------------------------------------------------------------------------- run


def run_plan(
    plan: Plan,
    *,
    tracker: Tracker,
    say: Callable[[str], None] = lambda text: None,
) -> None:
    """Train each row's missing seeds: one ``runner.train`` per row (see the module docstring for why). A row whose
    training is refused (:class:`DmglError`) is marked skipped with the reason, and the other rows still run."""
    from dmgl_cli import runner

    todo = [r for r in plan.rows if r.to_train and r.config is not None]
    for index, row in enumerate(todo, start=1):
        assert row.config is not None
        say(f"[{index}/{len(todo)}] {row.label} ({row.code}): training seed(s) {', '.join(map(str, row.to_train))}")

        def progress(seed: int, epoch: int, total: int, metrics: dict[str, float]) -> None:
            say(f"  seed {seed} epoch {epoch}/{total}  val acc {metrics.get('val_acc', float('nan')):.4f}")

        try:
            outcome = runner.train(
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


# ------------------------------------------------------------------------------------------------ compare


@dataclass
class Reproduction:
    """The side-by-side result: the plan (with what was trained), the table, and per cell the figures."""

    plan: Plan
    table: Table
    cells: list[dict[str, Any]]  # one per (row, column): paper, measured mean/std/n, runs, diff in points
    notes: list[str]

    def render(self, fmt: str = "text") -> str:
        """The table as text, markdown or LaTeX (booktabs), by :mod:`dmgl_cli.tables`' renderers."""
        if fmt not in FORMATS:
            raise DmglError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
        if fmt == "latex":
            return LATEX_PREAMBLE + render_latex(self.table)
        return render([self.table], fmt)

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "cells": self.cells, "notes": self.notes}


def _measured_cell(stat: Stat | None) -> Cell:
    if stat is None or stat.mean is None:
        return Cell()
    return Cell.over_seeds(stat.mean, stat.std, stat.n, runs=stat.runs, by_seed=stat.by_seed)


def paper_against_interval(figure: float, interval: tuple[float, float] | None) -> str | None:
    """Where the paper's ``figure`` (percent) lies against the measured 95% ``interval`` (fractions): ``inside``,
    ``below`` or ``above``; None without an interval."""
    if interval is None:
        return None
    low, high = 100 * interval[0], 100 * interval[1]
    return "below" if figure < low else "above" if figure > high else "inside"


def compare(plan: Plan, *, tracker: Tracker) -> Reproduction:
    """The paper's figure, the measured mean ± std over the plan's seeds and their difference, per row and
    column, read back from the recorded runs."""
    runs, _ = select_runs(Selection(datasets=[plan.recorded_dataset]), tracker)
    paper = plan.has_paper
    per_column = ["Paper", "Measured", "Δ"] if paper else ["Measured"]
    table = Table(
        kind="reproduce",
        title=(
            f"{plan.cite}: paper vs measured on {plan.dataset}, test scores"
            if paper
            else f"{plan.table_cite} rows measured on {plan.dataset}, test scores"
        ),
        stub_columns=["Row", "dmgl"],
        columns=[name for _ in plan.columns for name in per_column] if paper else [c.label for c in plan.columns],
        groups=[(c.label, len(per_column)) for c in plan.columns] if paper else None,
        dataset=plan.dataset,
        method=plan.table,
        latex_columns=(["Row", "dmgl"] + [n.replace("Δ", "Diff.") for _ in plan.columns for n in per_column])
        if paper
        else None,
    )
    cells: list[dict[str, Any]] = []
    counts: set[int] = set()
    for row in plan.rows:
        group = _matching_group(runs, row.config_key, plan.seeds) if row.config is not None else None
        shown: list[Cell] = []
        for column in plan.columns:
            key = plan.measured_keys.get(column.id)
            stat = group.stat(key) if group is not None and key is not None else None
            measured = _measured_cell(stat)
            if stat is not None and stat.n:
                counts.add(stat.n)
            figure = row.paper.get(column.id)
            diff = None
            position = None
            if figure is not None and measured.mean is not None:
                diff = measured.mean * 100 - figure[0]
                position = paper_against_interval(figure[0], measured.ci)
            if paper:
                shown.append(
                    Cell(figure[0] / 100, figure[1] / 100 if figure[1] is not None else None, 3 if figure[1] else 1)
                    if figure is not None
                    else Cell()
                )
                shown.append(measured)
                shown.append(
                    Cell.literal(f"{diff:+.2f}" + (f" ({position})" if position else ""))
                    if diff is not None
                    else Cell.literal("-")
                )
            else:
                shown.append(measured)
            cells.append(
                {
                    "row": row.label,
                    "column": column.label,
                    "metric": key,
                    "paper": figure[0] if figure is not None else None,
                    "paper_std": figure[1] if figure is not None else None,
                    "measured_mean": None if measured.mean is None else measured.mean * 100,
                    "measured_std": None if measured.std is None or measured.n < 2 else measured.std * 100,
                    "n": measured.n,
                    "measured_ci": None if measured.ci is None else [100 * v for v in measured.ci],
                    "paper_vs_ci": position,
                    "runs": list(measured.runs),
                    "diff_points": diff,
                }
            )
        table.rows.append(Row([row.label, row.code], shown))
    notes = _notes(plan, counts)
    table.notes.extend(notes)
    return Reproduction(plan, table, cells, notes)


def _notes(plan: Plan, counts: set[int]) -> list[str]:
    notes = []
    if plan.has_paper:
        with_std = any(std is not None for row in plan.rows for _, std in row.paper.values())
        notes.append(
            f"Paper: {plan.cite} ({plan.title.lower()})"
            + ("; a ± there is the paper's std over 3 seeds, from Table A1" if with_std else "")
            + "; Δ = measured − paper, in percentage points, then where the paper's figure lies against the "
            "measured 95% t-interval: (inside), (below) or (above) it"
        )
    else:
        notes.append(plan.no_figures)
    seeds = ",".join(map(str, plan.seeds))
    fewer = (
        f"; some cells hold fewer seeds (n = {', '.join(map(str, sorted(counts)))}; --json gives each cell's n)"
        if len(counts) > 1
        else ""
    )
    notes.append(
        f"Measured: mean ± std over seeds {seeds}{fewer} of each seed run's final test metric, the test score at "
        f"its best epoch on validation (as `dmgl report`); recipe {plan.recipe}"
        + (f", dataset {plan.recorded_dataset}" if plan.recorded_dataset != plan.dataset else "")
        + (f", {plan.epochs} epoch(s)" if plan.epochs is not None else "")
    )
    if plan.omitted:
        notes.append(f"not run: {', '.join(plan.omitted)} (the paper prints no figure for {plan.dataset})")
    for row in plan.rows:
        if row.skipped:
            notes.append(f"{row.label} cannot run here: {row.skipped}")
    notes.extend(plan.notes)
    return notes


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
