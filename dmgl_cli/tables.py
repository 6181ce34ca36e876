"""Tables as data, and their renderers: aligned text (optionally ANSI bold / underline), markdown, LaTeX
(booktabs), and CSV / JSON with raw fractions for other programs. Shared by ``dmgl report`` and ``dmgl sweep``;
nothing here knows about runs or MLflow.

A :class:`Cell` is a mean ± std over seeds (shown in percent with two decimals, or as a number or an integer) or a
piece of text; :func:`mark_best` marks the best value bold and the second best underlined.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dmgl_cli.errors import DmglError

FORMATS = ("text", "markdown", "latex", "csv", "json")
CHECK, CROSS = "✓", "×"

# ------------------------------------------------------------------------------------------------- model


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
            width = sum(widths[index : index + span]) + 2 * (span - 1)
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
        header += [f"{label} {column}" for column in table.columns[index : index + span]]
        index += span
    header += table.columns[index:]
    align = [":--"] * len(table.stub_columns) + ["--:"] * len(table.columns)
    lines = [
        f"**{_markdown_escape(table.title)}**",
        "",
        "| " + " | ".join(map(_markdown_escape, header)) + " |",
        "| " + " | ".join(align) + " |",
    ]
    for row in table.rows:
        values = [_markdown_escape(s) for s in row.stub] + [_markdown_escape(_display(c, _MARKDOWN)) for c in row.cells]
        lines.append("| " + " | ".join(values) + " |")
    legend = _legend(table, "**bold**:", "<u>underlined</u>:")
    if legend:
        lines += ["", legend]
    lines.extend(f"\nNote: {_markdown_escape(n)}" for n in table.notes)
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    CHECK: r"\checkmark",
    CROSS: r"$\times$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_label(table: Table) -> str:
    parts = ["tab:dmgl", table.kind] + [p for p in (table.dataset, table.method) if p]
    return re.sub(r"[^A-Za-z0-9:.-]+", "-", "-".join(parts))


_WIDE = 6  # value columns beyond which a table is scaled to the line width


def render_latex(table: Table) -> str:
    stub, count = len(table.stub_columns), len(table.columns)
    tabular = f"\\begin{{tabular}}{{{'l' * stub}{'c' * count}}}"
    lines = [
        r"\begin{table}[t]",
        r"  \centering",
        f"  \\caption{{{latex_escape(table.title)}}}",
        f"  \\label{{{_latex_label(table)}}}",
        f"  \\resizebox{{\\linewidth}}{{!}}{{{tabular}" if count > _WIDE else f"  {tabular}",
        r"    \toprule",
    ]
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


LATEX_PREAMBLE = (
    "% generated by `dmgl report`; needs \\usepackage{booktabs} (graphicx for \\resizebox, amssymb for \\checkmark)\n"
)


def _cell_json(cell: Cell) -> dict[str, Any]:
    if cell.kind == "text":
        return {"text": cell.text}
    return {
        "mean": cell.mean,
        "std": cell.std if cell.n > 1 else None,
        "n": cell.n,
        "mark": cell.mark or None,
        "runs": list(cell.runs),
    }


def render_json(tables: Sequence[Table], warnings: Sequence[str] = ()) -> str:
    data = {
        "tables": [
            {
                "kind": t.kind,
                "title": t.title,
                "dataset": t.dataset or None,
                "method": t.method or None,
                "stub_columns": t.stub_columns,
                "columns": t.columns,
                "column_groups": [list(g) for g in t.groups] if t.groups else None,
                "marks": t.marks or None,
                "rows": [{"stub": r.stub, "cells": [_cell_json(c) for c in r.cells]} for r in t.rows],
                "notes": t.notes,
            }
            for t in tables
        ],
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
                writer.writerow(
                    [
                        table.kind,
                        table.dataset,
                        table.method,
                        " / ".join(row.stub),
                        group,
                        column,
                        cell.text if not numeric else "",
                        "" if not numeric or cell.mean is None else repr(cell.mean),
                        "" if not numeric or cell.std is None or cell.n < 2 else repr(cell.std),
                        cell.n if numeric else "",
                        cell.mark,
                    ]
                )
    return out.getvalue()


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
