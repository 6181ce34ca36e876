"""Tables as data: cells (a mean ± std over seeds, or text), rows, tables, their best/second marks and the
notes on seed counts and intervals (see :mod:`dmgl_cli.tables`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dmgl_cli.stats import PairedDifference

CHECK, CROSS = "✓", "×"


@dataclass
class Comparison:
    """A cell's paired difference to the reference cell of its column (or row): ``difference`` is cell minus
    reference over their shared seeds; ``p_holm`` its p-value after Holm's correction across the table's rows."""

    reference: str  # the reference row's (or column's) label
    is_reference: bool = False
    difference: PairedDifference | None = None
    p_holm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = self.difference
        return {
            "reference": self.reference,
            "is_reference": self.is_reference,
            "diff": None if d is None else d.mean,
            "diff_low": None if d is None else d.low,
            "diff_high": None if d is None else d.high,
            "p": None if d is None else d.p_value,
            "p_holm": self.p_holm,
            "test": None if d is None or not d.test else d.test,
            "pairs": 0 if d is None else d.n,
            "seeds": [] if d is None else list(d.seeds),
        }


@dataclass
class Cell:
    """A number (``mean``/``std`` over ``n`` seeds) or a piece of ``text``; ``mark`` is best / tied / second / ''.
    ``ci`` is the 95% t-interval of the mean, ``by_seed`` the values it came from (by seed, for paired tests)."""

    mean: float | None = None
    std: float | None = None
    n: int = 0
    kind: str = "percent"  # percent | number | integer | text
    text: str = ""
    mark: str = ""
    runs: tuple[str, ...] = ()
    ci: tuple[float, float] | None = None
    by_seed: dict[int, float] = field(default_factory=dict, repr=False)
    comparison: Comparison | None = None

    @classmethod
    def literal(cls, text: str) -> Cell:
        return cls(kind="text", text=text)

    @classmethod
    def over_seeds(
        cls,
        mean: float | None,
        std: float | None,
        n: int,
        runs: tuple[str, ...] = (),
        by_seed: dict[int, float] | None = None,
        kind: str = "percent",
    ) -> Cell:
        """A mean over ``n`` seeds with its 95% t-interval (none for one seed)."""
        from dmgl_cli.stats import t_interval  # scipy loads only where a table of means over seeds is made

        return cls(mean, std, n, kind, runs=runs, ci=t_interval(mean, std, n), by_seed=dict(by_seed or {}))

    def interval_text(self) -> str | None:
        """``62.51, 66.39``: the interval in the cell's unit (percent: points, no % sign)."""
        if self.ci is None or self.kind not in ("percent", "number"):
            return None
        scale, digits = (100.0, 2) if self.kind == "percent" else (1.0, 3)
        return f"{self.ci[0] * scale:.{digits}f}, {self.ci[1] * scale:.{digits}f}"

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
    seeds: bool = False  # cells are means over seeds: write the usual n once and mark the cells that differ
    latex_columns: list[str] | None = None  # shorter headers (stub + value columns) for LaTeX
    latex_hoist: bool = False  # LaTeX: a text column with one value in every row moves into the caption
    # What the marks compare, for --stats: the full labels of the columns when marks are per row (the headers may
    # be short), and which lines rank low values first (columns when marks are per column, rows when per row).
    column_labels: list[str] | None = None
    lower_better: tuple[int, ...] = ()
    significance: str = ""  # set by --stats: how "tied" was decided, for the legend
    stats_note: str = ""  # set by --stats: the test, the correction, the pairs and the power


def intervals_note(table: Table) -> str | None:
    """What the interval after a cell is, when a cell has one."""
    if not any(c.ci is not None for r in table.rows for c in r.cells):
        return None
    return "(a, b) after a cell: the 95% t-interval of its mean (Student's t, n - 1 degrees of freedom)"


def usual_n(table: Table) -> int | None:
    """The most common number of seeds among the table's valued cells (the larger one on a tie); None if none."""
    counts: dict[int, int] = {}
    for row in table.rows:
        for cell in row.cells:
            if cell.kind != "text" and cell.mean is not None and cell.n > 0:
                counts[cell.n] = counts.get(cell.n, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda n: (counts[n], n))


def odd_n(table: Table, cell: Cell, usual: int | None) -> int | None:
    """The cell's n when it must be shown beside the cell (a mean over seeds, not the table's usual n)."""
    if not table.seeds or usual is None or cell.kind == "text" or cell.mean is None:
        return None
    return cell.n if cell.n != usual else None


def seed_counts(table: Table) -> tuple[int | None, list[int]]:
    """(the usual n, the other n that cells show beside them)."""
    usual = usual_n(table) if table.seeds else None
    odd = sorted({n for r in table.rows for c in r.cells if (n := odd_n(table, c, usual)) is not None})
    return usual, odd


def seed_note(table: Table, marker: str | None = "[n=k]") -> str | None:
    """The table's seed-count convention in one sentence (``marker`` shows how a differing n is written; None: each
    cell's ``n`` field says it, as in JSON)."""
    usual, odd = seed_counts(table)
    if usual is None:
        return None
    text = "cells: one seed each (no std)" if usual == 1 else f"cells: mean ± std over n = {usual} seeds"
    if odd:
        ks = ", ".join(map(str, odd))
        text += (
            f"; {marker} marks a cell over k seeds instead (here k = {ks})"
            if marker
            else f"; some cells are over other numbers of seeds (k = {ks}), as their n says"
        )
        if 1 in odd:
            text += "; one seed has no std"
    return text


def mark_best(cells: Sequence[Cell], higher_is_better: bool = True) -> None:
    """Best value bold, second best underlined; equal displayed values share a mark; needs two valued cells."""
    valued = [(value, c) for c in cells if (value := c.rounded()) is not None]
    if len(valued) < 2:
        return
    distinct = sorted({v for v, _ in valued}, reverse=higher_is_better)
    for value, cell in valued:
        if value == distinct[0]:
            cell.mark = "best"
        elif len(distinct) > 1 and value == distinct[1]:
            cell.mark = "second"


def mark_columns(table: Table, lower_is_better: Iterable[int] = ()) -> None:
    """:func:`mark_best` down every column; columns listed in ``lower_is_better`` (by index) rank low values first."""
    lower = set(lower_is_better)
    for index in range(len(table.columns)):
        mark_best([row.cells[index] for row in table.rows], higher_is_better=index not in lower)
    table.marks = "column"
    table.lower_better = tuple(sorted(lower))
