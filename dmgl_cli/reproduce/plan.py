"""The plan of a reproduction: the table's rows x seeds, each row's configuration resolved once, and which seeds
are reused (recorded with the same configuration key) or still to train (see :mod:`dmgl_cli.reproduce`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dmgl_cli.config import Config, parse_seeds, recipe_path, recorded_params, resolve
from dmgl_cli.errors import DmglError
from dmgl_cli.report.labels import method_label, row_label
from dmgl_cli.report.selection import Group, SeedRun, Selection, group_runs, select_runs
from dmgl_cli.report.tables import dataset_metrics
from dmgl_cli.reproduce.paper import Column, PaperRow, PaperTable, paper_datasets, paper_tables
from dmgl_cli.strategies import parse_strategy, spec_from_params

if TYPE_CHECKING:
    from dmgl_cli.data.prepared import PreparedDataset
    from dmgl_cli.tracking import Tracker

REPRODUCE_TAG = "dmgl.reproduce"  # on the runs a reproduction trains: the table they were trained for
METRIC_LABELS = {"acc": "ACC", "map": "MAP", "f1": "F1"}


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


def check_table(table: str) -> PaperTable:
    tables = paper_tables()
    if table not in tables:
        raise DmglError(f"unknown table {table!r}; valid: {', '.join(tables)}")
    return tables[table]


def recipe_for(paper: PaperTable, dataset: str, recipe: str | None) -> tuple[str, str | None]:
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
    """The :attr:`SeedRun.config_key` that ``run.training.train`` would record for ``config`` on data with ``checksum``:
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


def matching_group(runs: Sequence[SeedRun], key: str, seeds: Sequence[int]) -> Group | None:
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

    paper = check_table(table)
    parse_seeds(seeds, 0)  # its form, before any config resolves
    chosen_recipe, cite = recipe_for(paper, dataset, recipe)
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
        group = matching_group(existing, row.config_key, seed_list)
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
