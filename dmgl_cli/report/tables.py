"""The paper's tables, built from grouped seed runs (:mod:`dmgl_cli.report.selection`).

``main`` (Table 1 / A1): rows method (strategy), columns dataset x (ACC, MAP) for audio-video data or (ACC, macro-F1)
for text-image data; best bold, second best underlined per column. ``strategies`` (Table 4 / A3): fused and
per-modality rows (plus their gap) x strategies, marks per row. ``ablation`` (Table 3 / A2): matching loss on/off x
dynamic integration on/off with per-modality scores and their gap. ``runs``: one line per seed run. ``imbalance``:
Shapley values, imbalance degree and cost (:mod:`~dmgl_cli.report.imbalance_table`). Cells are
percentages over seeds, each with its n; :mod:`dmgl_cli.tables` renders them. Rows are named in ``code`` or
``paper`` style (:mod:`~dmgl_cli.report.labels`). When the cells of one table come from runs whose settings differ
beyond the compared axes (e.g. a 20-epoch row beside 5-epoch rows), the table says which in a note.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from dmgl_cli.errors import DmglError
from dmgl_cli.report.imbalance_table import imbalance_tables
from dmgl_cli.report.labels import check_labels, method_label, row_label, row_order
from dmgl_cli.report.selection import (
    Group,
    SeedRun,
    Stat,
    describe_differences,
    group_runs,
    setting_differences,
    validation_score,
)
from dmgl_cli.tables import CHECK, CROSS, Cell, Row, Table, mark_best, mark_columns

# Primary metrics per dataset as in the paper: audio-video (ACC, MAP), text-image and NVGesture (ACC, macro-F1).
DATASET_METRICS: dict[str, tuple[str, str]] = {
    "kinetics-sounds": ("acc", "map"),
    "crema-d": ("acc", "map"),
    "sarcasm": ("acc", "f1"),
    "twitter2015": ("acc", "f1"),
    "nvgesture": ("acc", "f1"),
}
METRIC_NAMES = {"acc": "ACC", "map": "MAP", "f1": "F1"}
TABLES = ("main", "strategies", "ablation", "runs", "imbalance")


def dataset_metrics(dataset: str, modalities: Iterable[str]) -> tuple[str, str]:
    """The two metrics the paper shows for ``dataset``; an unknown one with text or image data gets ACC and F1."""
    if dataset.lower() in DATASET_METRICS:
        return DATASET_METRICS[dataset.lower()]
    return ("acc", "f1") if {"text", "image"} & {m.lower() for m in modalities} else ("acc", "map")


def _cell(stat: Stat) -> Cell:
    """A percent cell showing a group's mean ± std over its n seeds (with the 95% t-interval of the mean), naming
    the runs it came from and keeping their values by seed for ``--stats``' paired tests."""
    return Cell.over_seeds(stat.mean, stat.std, stat.n, runs=stat.runs, by_seed=stat.by_seed)


# Settings that a table compares on purpose, so differences in them are not worth a note.
_COMPARED = {"main": ("strategy.", "method."), "cells": ("strategy.",)}


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])} and {len(names) - 2} more"


def differences_note(scope: str, members: dict[str, Group], compared: Sequence[str]) -> str | None:
    """A note naming the settings that differ between the runs behind different cells of one table."""
    found = setting_differences({label: g.settings for label, g in members.items()}, compared)
    if not found:
        return None
    return (
        f"{scope}: the runs behind these cells differ in settings beyond the compared ones: "
        f"{describe_differences(found, _names)}"
    )


def main_table(
    groups: Sequence[Group], split: str = "test", warn: Callable[[str], None] | None = None, labels: str = "code"
) -> Table:
    """Table 1 / A1: method (strategy) x dataset (ACC, MAP or ACC, F1), mean ± std over seeds."""
    datasets = sorted({g.dataset for g in groups})
    metrics = {d: dataset_metrics(d, {m for g in groups if g.dataset == d for m in g.modalities}) for d in datasets}
    rows = sorted({(g.method, g.variant, g.spec) for g in groups}, key=lambda r: row_order(r[0], r[2], r[1], labels))
    by_key = {(g.dataset, g.method, g.variant, g.spec): g for g in groups}
    table = Table(
        "main",
        f"Comparison of methods: {split} scores",
        ["Method"],
        [METRIC_NAMES[m] for d in datasets for m in metrics[d]],
        groups=[(d, 2) for d in datasets],
        seeds=True,
    )
    for method, variant, spec in rows:
        cells = []
        for dataset in datasets:
            group = by_key.get((dataset, method, variant, spec))
            for metric in metrics[dataset]:
                cells.append(_cell(group.stat(f"final_{split}_{metric}", warn)) if group else Cell())
        table.rows.append(Row([row_label(method, spec, variant, labels)], cells))
    mark_columns(table)
    for dataset in datasets:
        members = {
            row_label(g.method, g.spec, g.variant, labels): g
            for g in sorted(groups, key=lambda g: row_order(g.method, g.spec, g.variant, labels))
            if g.dataset == dataset
        }
        note = differences_note(dataset, members, _COMPARED["main"])
        if note:
            table.notes.append(note)
    return table


def _per_method(groups: Sequence[Group]) -> list[tuple[str, str, str, list[Group]]]:
    """(dataset, method, variant, its groups in strategy order), one per table of the strategies / ablation kinds."""
    keys = sorted({(g.dataset, g.method, g.variant) for g in groups})
    return [
        (
            d,
            m,
            v,
            sorted(
                (g for g in groups if (g.dataset, g.method, g.variant) == (d, m, v)), key=lambda g: g.spec.sort_key()
            ),
        )
        for d, m, v in keys
    ]


def strategies_tables(
    groups: Sequence[Group],
    split: str = "test",
    metric: str = "acc",
    warn: Callable[[str], None] | None = None,
    labels: str = "code",
) -> list[Table]:
    """Table 4 / A3: fused, per-modality and gap rows x integration strategies; one table per dataset and method."""
    tables = []
    for dataset, method, variant, mine in _per_method(groups):
        modalities = sorted({m for g in mine for m in g.modalities})
        spans: list[tuple[str, int]] = []
        for group in mine:
            if spans and spans[-1][0] == group.spec.group:
                spans[-1] = (group.spec.group, spans[-1][1] + 1)
            else:
                spans.append((group.spec.group, 1))
        name = METRIC_NAMES[metric]
        table = Table(
            "strategies",
            f"Integration strategies on {dataset} ({method_label(method, variant, labels)}): {split} {name}",
            ["Modality"],
            [g.spec.short for g in mine],
            groups=spans,
            dataset=dataset,
            method=method_label(method, variant),
            marks="row",
            seeds=True,
            column_labels=[g.spec.label for g in mine],
        )
        rows = [("Multi", f"final_{split}_{metric}")] + [(m, f"final_{split}_{metric}_{m}") for m in modalities]
        if len(modalities) > 1:
            rows.append(("Gap", f"final_{split}_gap_{metric}"))
            table.lower_better = (len(rows) - 1,)
        for label, key in rows:
            cells = [_cell(g.stat(key, warn)) for g in mine]
            mark_best(cells, higher_is_better=label != "Gap")
            table.rows.append(Row([label], cells))
        note = differences_note(
            f"{dataset} / {table.method} (strategies)", {g.spec.label: g for g in mine}, _COMPARED["cells"]
        )
        if note:
            table.notes.append(note)
        tables.append(table)
    return tables


def ablation_tables(
    groups: Sequence[Group],
    split: str = "test",
    metric: str | None = None,
    warn: Callable[[str], None] | None = None,
    labels: str = "code",
) -> list[Table]:
    """Table 3 / A2: matching loss (CL) and dynamic integration (DI) on/off.

    CL×/DI× is ``constant:0`` (classification only); CL✓/DI× the constant 0 < alpha < 1 with the best validation
    score; CL✓/DI✓ the dynamic strategies (heuristic, then learning-based). Default metric: the dataset's second
    one (MAP or F1), as in the paper."""
    tables = []
    for dataset, method, variant, mine in _per_method(groups):
        modalities = sorted({m for g in mine for m in g.modalities})
        chosen_metric = metric or dataset_metrics(dataset, modalities)[1]
        by_spec = {g.spec.key: g for g in mine}
        constants = [g for g in mine if g.spec.name == "constant" and 0.0 < (g.spec.value or 0.0) < 1.0]
        rows: list[tuple[str, str, Group]] = []
        if "constant:0" in by_spec:
            rows.append((CROSS, CROSS, by_spec["constant:0"]))
        if constants:
            rows.append((CHECK, CROSS, max(constants, key=lambda g: validation_score(g.runs))))
        rows += [(CHECK, CHECK, by_spec[k]) for k in ("heuristic", "lb") if k in by_spec]
        if not rows:
            if warn:
                warn(
                    f"no ablation table for {dataset} / {method_label(method, variant)}: it needs constant:0, a "
                    "constant 0<alpha<1, heuristic or lb runs"
                )
            continue
        name = METRIC_NAMES[chosen_metric]
        columns = ["Multi", *modalities] + (["GAP"] if len(modalities) > 1 else [])
        table = Table(
            "ablation",
            f"Ablation on {dataset} ({method_label(method, variant, labels)}): {split} {name}; CL = matching loss, "
            "DI = dynamic integration",
            ["CL", "DI", "Strategy"],
            columns,
            groups=[(name, len(columns))],
            dataset=dataset,
            method=method_label(method, variant),
            seeds=True,
        )
        for cl, di, group in rows:
            keys = [f"final_{split}_{chosen_metric}"] + [f"final_{split}_{chosen_metric}_{m}" for m in modalities]
            if len(modalities) > 1:
                keys.append(f"final_{split}_gap_{chosen_metric}")
            table.rows.append(Row([cl, di, group.spec.label], [_cell(group.stat(k, warn)) for k in keys]))
        mark_columns(table, lower_is_better=[len(columns) - 1] if len(modalities) > 1 else [])
        shown = {group.spec.label: group for _, _, group in rows}
        note = differences_note(f"{dataset} / {table.method} (ablation)", shown, _COMPARED["cells"])
        if note:
            table.notes.append(note)
        tables.append(table)
    return tables


def runs_table(runs: Sequence[SeedRun], split: str = "test", warn: Callable[[str], None] | None = None) -> Table:
    """One line per seed run, any status."""
    table = Table(
        "runs",
        f"Seed runs: {split} scores at the validation-selected epoch",
        ["Run", "Parent", "Dataset", "Method", "Strategy", "Seed", "Status"],
        ["Best epoch", "Val (select)", f"{split} ACC", f"{split} MAP", f"{split} F1", "Modality gap"],
        latex_columns=["Run", "Parent", "Dataset", "Method", "Strategy", "Seed", "Status"]
        + ["Epoch", "Val", "ACC", "MAP", "F1", "Gap"],
        latex_hoist=True,
    )
    ordered = sorted(
        runs, key=lambda r: (r.dataset, r.method, r.spec.sort_key() if r.spec else (9,), r.seed or 0, r.start_time)
    )
    for run in ordered:
        keys = ["final_best_epoch", f"final_val_{run.select_metric}"]
        keys += [f"final_{split}_{m}" for m in ("acc", "map", "f1")]
        missing = [k for k in keys if k not in run.metrics]
        if missing and run.status == "FINISHED" and warn:
            warn(f"run {run.run_id} ({run.dataset} / {run.method}) has no metric {', '.join(missing)}; shown as -")
        cells = [Cell(run.metrics.get(keys[0]), None, 1, "integer")]
        cells += [Cell(run.metrics.get(k), None, 1) for k in keys[1:]]
        cells.append(Cell(run.metrics.get(f"final_{split}_modality_gap"), None, 1, "number"))
        table.rows.append(
            Row(
                [
                    run.run_id,
                    run.parent_id[:12],
                    run.dataset,
                    method_label(run.method, run.variant),
                    run.spec.label if run.spec else run.tags.get("dmgl.strategy", "?"),
                    "" if run.seed is None else str(run.seed),
                    run.status,
                ],
                cells,
            )
        )
    return table


def attach_notes(tables: Sequence[Table], notes: Sequence[str]) -> None:
    """Give each table the grouping notes about its own cells (notes read "DATASET / METHOD (STRATEGY): ..."),
    before the table's own notes."""
    for table in tables:
        prefix = f"{table.dataset} / {table.method} (" if table.dataset else ""
        table.notes[:0] = [n for n in notes if n.startswith(prefix) and n not in table.notes]


def build_tables(
    kind: str,
    runs: Sequence[SeedRun],
    split: str = "test",
    metric: str | None = None,
    warn: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
    *,
    labels: str = "code",
    allow_mixed: bool = False,
) -> list[Table]:
    """The ``kind`` table(s) of ``runs``; ``warn`` hears of missing metrics, ``note`` of cells chosen among several
    configurations. Rows are named in ``labels`` style; ``allow_mixed`` lets a cell hold runs of different settings
    (the best on validation is shown) instead of refusing."""
    if kind not in TABLES:
        raise DmglError(f"unknown table {kind!r}; valid: {', '.join(TABLES)}")
    if split not in ("val", "test"):
        raise DmglError(f"--split must be val or test, got {split!r}")
    if metric is not None and metric not in METRIC_NAMES:
        raise DmglError(f"unknown metric {metric!r}; valid: {', '.join(METRIC_NAMES)}")
    check_labels(labels)
    if kind == "runs":
        return [runs_table(runs, split, warn)]
    groups = group_runs(runs, note, allow_mixed=allow_mixed)
    if kind == "main":
        return [main_table(groups, split, warn, labels)]
    if kind == "strategies":
        return strategies_tables(groups, split, metric or "acc", warn, labels)
    if kind == "imbalance":
        return imbalance_tables(groups, split, warn, labels)
    return ablation_tables(groups, split, metric, warn, labels)
