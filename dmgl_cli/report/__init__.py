"""Paper-style tables and figures regenerated from recorded runs (``dmgl report``).

:func:`make_report` selects the seed runs (:mod:`~dmgl_cli.report.selection`, which also groups them), builds the
paper's tables (:mod:`~dmgl_cli.report.tables`), renders them in text, markdown, LaTeX (booktabs), CSV or JSON
(:mod:`dmgl_cli.tables`) and writes the figures (:mod:`~dmgl_cli.report.figures`; the embeddings of ``--plot
embeddings`` come from :mod:`~dmgl_cli.report.embeddings`), all through one tracker. Rows
are named in ``code`` or ``paper`` style (:mod:`~dmgl_cli.report.labels`); a cell never silently holds runs of
different settings (``allow_mixed`` to show the best on validation among them instead of refusing). ``stats`` adds
each cell's paired difference to a reference row, its p-value and the marks of :mod:`~dmgl_cli.report.significance`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dmgl_cli.errors import DmglError
from dmgl_cli.report.figures import PLOTS, make_figures, write_plots
from dmgl_cli.report.labels import LABELS
from dmgl_cli.report.selection import Group, SeedRun, Selection, Stat, group_runs, select_runs
from dmgl_cli.report.significance import compare_tables
from dmgl_cli.report.tables import TABLES, attach_notes, build_tables
from dmgl_cli.tables import FORMATS, Table, render

if TYPE_CHECKING:
    from dmgl_cli.tracking import Tracker

__all__ = [
    "FORMATS",
    "LABELS",
    "PLOTS",
    "TABLES",
    "Group",
    "Report",
    "SeedRun",
    "Selection",
    "Stat",
    "attach_notes",
    "build_tables",
    "compare_tables",
    "group_runs",
    "make_figures",
    "make_report",
    "render",
    "select_runs",
    "shown_table",
    "write_plots",
]


@dataclass
class Report:
    text: str
    tables: list[Table]
    plots: list[Path]
    warnings: list[str]
    notes: list[str]
    runs: int


def shown_table(table: str | None, plot_kinds: Sequence[str], stats: bool, baseline: str | None) -> str | None:
    """The table ``dmgl report`` shows: the one asked for; else ``main``, unless only figures were asked for
    (``--stats`` and ``--baseline`` compare a table's cells, so they ask for one)."""
    if table is None and (not plot_kinds or stats or baseline is not None):
        return "main"
    return table


def make_report(
    selection: Selection,
    *,
    tracker: Tracker,
    table: str | None = "main",
    fmt: str = "text",
    split: str = "test",
    metric: str | None = None,
    plot_kinds: Sequence[str] = (),
    out_dir: Path | None = None,
    color: bool = False,
    labels: str = "code",
    allow_mixed: bool = False,
    projection: str = "pca",
    stats: bool = False,
    baseline: str | None = None,
    test: str = "t",
) -> Report:
    """Select runs through ``tracker``, build the table (if any) and write the figures (if any). ``labels`` names
    the rows (``code`` or ``paper``); ``allow_mixed`` lets a cell hold runs of different settings; ``projection``
    (``pca`` or ``umap``) is the 2-D projection of the ``embeddings`` figure. ``stats`` (implied by ``baseline``)
    compares each row with ``baseline`` (default: the best) by a paired ``test`` (``t`` or ``wilcoxon``)."""
    if table is not None and table not in TABLES:
        raise DmglError(f"unknown table {table!r}; valid: {', '.join(TABLES)}")
    if fmt not in FORMATS:
        raise DmglError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if labels not in LABELS:
        raise DmglError(f"unknown labels {labels!r}; valid: {', '.join(LABELS)}")
    warnings: list[str] = []
    notes: list[str] = []
    warn = _once(warnings)
    note = _once(notes)
    runs, searched = select_runs(selection, tracker)
    if not runs:
        raise DmglError(f"no seed runs match ({searched}); train or sweep first, or widen the selection")
    finished = [r for r in runs if r.status == "FINISHED"]
    if table not in (None, "runs") and not finished:
        raise DmglError(f"{len(runs)} seed run(s) match ({searched}) but none finished; `--table runs` lists them")
    tables = (
        build_tables(table, runs, split, metric, warn, note, labels=labels, allow_mixed=allow_mixed) if table else []
    )
    if (stats or baseline is not None) and table is not None:
        compare_tables(tables, baseline, test)
    attach_notes(tables, notes)
    for t in tables:  # the tables' own notes (settings that differ between their cells) for the caller too
        for table_note in ([t.stats_note] if t.stats_note else []) + t.notes:
            note(table_note)
    written = []
    if plot_kinds:
        written = write_plots(
            plot_kinds,
            runs,
            out_dir or Path("dmgl-report"),
            split,
            metric or "acc",
            tracker=tracker,
            warn=warn,
            note=note,
            labels=labels,
            allow_mixed=allow_mixed,
            projection=projection,
        )
    text = render(tables, fmt, warnings, color) if tables else ""
    return Report(text, tables, written, warnings, notes, len(runs))


def _once(sink: list[str]) -> Callable[[str], None]:
    """A callback that appends each distinct message to ``sink`` once (a warning repeats per cell otherwise)."""

    def add(message: str) -> None:
        if message not in sink:
            sink.append(message)

    return add
