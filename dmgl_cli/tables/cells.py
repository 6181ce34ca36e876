"""What every renderer writes of a cell: its marks (best, second, tied), the seed count, the interval, the
paired difference of ``--stats`` (the Δ line), and the notes under a table."""

from __future__ import annotations

import re

from dmgl_cli.tables.model import Cell, Row, Table, intervals_note, seed_note

ANSI_MARKS = {"best": ("\033[1m", "\033[0m"), "second": ("\033[4m", "\033[0m")}
PLAIN_MARKS = {"best": ("*", "*"), "second": ("_", "_")}
MARKDOWN_MARKS = {"best": ("**", "**"), "second": ("<u>", "</u>")}
LATEX_MARKS = {"best": (r"\textbf{", "}"), "second": (r"\underline{", "}")}
for _style in (ANSI_MARKS, PLAIN_MARKS, MARKDOWN_MARKS, LATEX_MARKS):
    _style["tied"] = _style["best"]  # --stats: not significantly worse than the best looks like the best
ANSI_CODE = re.compile(r"\033\[[0-9;]*m")


def display_cell(cell: Cell, style: dict[str, tuple[str, str]], pm: str = " ± ") -> str:
    mean, std = cell.parts()
    text = mean if std is None else f"{mean}{pm}{std}"
    if cell.mark and cell.mark in style:
        before, after = style[cell.mark]
        text = f"{before}{text}{after}"
    return text


def visible_width(text: str) -> int:
    return len(ANSI_CODE.sub("", text))


def marks_legend(table: Table, best: str, second: str) -> str | None:
    if not any(c.mark for r in table.rows for c in r.cells):
        return None
    if table.significance:
        return (
            f"{best} best, or tied with it: not significantly worse than the best ({table.significance}) "
            f"per {table.marks or 'column'}"
        )
    return f"{best} best, {second} second best per {table.marks or 'column'}"


def with_n(text: str, n: int | None, before: str, after: str) -> str:
    return text if n is None else f"{text}{before}{n}{after}"


def with_interval(text: str, cell: Cell) -> str:
    interval = cell.interval_text()
    return text if interval is None else f"{text} ({interval})"


def table_notes(table: Table, marker: str | None) -> list[str]:
    """The table's notes in order: seeds, intervals, the --stats note, then its own."""
    said = [seed_note(table, marker), intervals_note(table), table.stats_note or None]
    return [n for n in said if n] + table.notes


def format_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"={p:.3f}"


def delta_parts(cell: Cell) -> tuple[str, str, str, str] | None:
    """(difference, low, high, p) of a compared cell as displayed (points for a percent cell); ("ref", ...) for
    the reference; None when the cell is not compared."""
    comparison = cell.comparison
    if comparison is None:
        return None
    if comparison.is_reference:
        return "ref", "", "", ""
    difference = comparison.difference
    if difference is None or difference.mean is None:
        return "-", "", "", ""
    scale, digits = (100.0, 2) if cell.kind == "percent" else (1.0, 3)
    low = high = ""
    if difference.low is not None and difference.high is not None:
        low, high = f"{difference.low * scale:+.{digits}f}", f"{difference.high * scale:+.{digits}f}"
    p = format_p(comparison.p_holm) if comparison.p_holm is not None else ""
    return f"{difference.mean * scale:+.{digits}f}", low, high, p


def delta_text(cell: Cell) -> str:
    parts = delta_parts(cell)
    if parts is None:
        return ""
    mean, low, high, p = parts
    text = mean + (f" [{low}, {high}]" if low else "") + (f" p{p}" if p else "")
    comparison = cell.comparison
    if comparison and comparison.difference and comparison.difference.n == 1 and not comparison.is_reference:
        text += " (1 seed)"
    return text


def delta_label(row: Row) -> str | None:
    """``Δ vs REF`` for the line under ``row``, or None when the row has nothing compared to another cell."""
    compared = [c.comparison for c in row.cells if c.comparison is not None]
    if not any(not c.is_reference for c in compared):
        return None
    references = {c.reference for c in compared}
    return f"Δ vs {references.pop()}" if len(references) == 1 else "Δ vs best"


def delta_stub(table: Table, label: str) -> list[str]:
    """The Δ line's stub: its label in the last stub column (the one naming the row), the others empty."""
    return [""] * (len(table.stub_columns) - 1) + [f"  {label}"]
