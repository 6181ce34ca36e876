"""Tables as data, and their renderers: aligned text (optionally ANSI bold / underline), markdown, LaTeX
(booktabs), and CSV / JSON with raw fractions for other programs. Shared by ``dmgl report`` and ``dmgl sweep``;
nothing here knows about runs or MLflow.

A :class:`Cell` is a mean ± std over seeds (shown in percent with two decimals, or as a number or an integer) or a
piece of text; :func:`mark_best` marks the best value bold and the second best underlined.

Seed counts. In a table of means over seeds (``Table.seeds``) every cell knows its ``n``; the table's usual n (the
most common one) is written once in its notes (LaTeX: its caption), and a cell over another number of seeds carries
its own: ``[n=2]`` in text, ``<sup>n=2</sup>`` in markdown, ``$^{n=2}$`` in LaTeX; CSV and JSON give every cell's
``n``. A cell over one seed has no std.

Intervals and comparisons (:mod:`dmgl_cli.stats`). A cell over several seeds carries the 95% t-interval of its mean
(``ci``), written after it: ``(62.51, 66.39)`` in text and markdown, small in LaTeX, ``ci_low``/``ci_high`` in CSV,
``ci`` in JSON. A table compared by ``dmgl report --stats`` (:mod:`dmgl_cli.report.significance`) also carries
per cell its paired difference to a reference cell (:class:`Comparison`): text, markdown and LaTeX show it on a
``Δ vs REF`` line under each row (difference in points, its 95% interval, the Holm-adjusted p-value), CSV and
JSON in fields of the cell; ``Table.stats_note`` names the test, the correction, the pairs and the power (LaTeX: in
the caption), and the mark ``tied`` (drawn as ``best``) is a cell not significantly worse than the best.

Modules: :mod:`~dmgl_cli.tables.model` the cells, rows and tables; :mod:`~dmgl_cli.tables.cells` what every
renderer writes of a cell (marks, n, interval, Δ line, notes); :mod:`~dmgl_cli.tables.text` text and markdown;
:mod:`~dmgl_cli.tables.latex`; :mod:`~dmgl_cli.tables.data` CSV and JSON. Everything is importable from here.

LaTeX fits the text width: no ``%`` in the cells (the caption says the unit), a small ``±`` std, short headers
(``Table.latex_columns``), long text columns wrapped, a narrower column gap, and a table still wider than
``\textwidth`` is scaled down to it (never up). :data:`LATEX_PREAMBLE` names the packages.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmgl_cli.errors import DmglError
from dmgl_cli.tables.cells import format_p
from dmgl_cli.tables.data import CSV_COLUMNS, render_csv, render_json
from dmgl_cli.tables.latex import LATEX_PREAMBLE, latex_escape, render_latex
from dmgl_cli.tables.model import (
    CHECK,
    CROSS,
    Cell,
    Comparison,
    Row,
    Table,
    intervals_note,
    mark_best,
    mark_columns,
    seed_note,
    usual_n,
)
from dmgl_cli.tables.text import render_markdown, render_text

__all__ = [
    "CHECK",
    "CROSS",
    "CSV_COLUMNS",
    "FORMATS",
    "LATEX_PREAMBLE",
    "Cell",
    "Comparison",
    "Row",
    "Table",
    "format_p",
    "intervals_note",
    "latex_escape",
    "mark_best",
    "mark_columns",
    "render",
    "render_csv",
    "render_json",
    "render_latex",
    "render_markdown",
    "render_text",
    "seed_note",
    "usual_n",
]

FORMATS = ("text", "markdown", "latex", "csv", "json")


def render(tables: Sequence[Table], fmt: str, warnings: Sequence[str] = (), color: bool = False) -> str:
    """All ``tables`` in one of :data:`FORMATS`; JSON also carries ``warnings``, text is ANSI-marked if ``color``."""
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
