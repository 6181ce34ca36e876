"""Tables as data, and their renderers: aligned text (optionally ANSI bold / underline), markdown, LaTeX
(booktabs), and CSV / JSON with raw fractions for other programs. Shared by ``dmgl report`` and ``dmgl sweep``;
nothing here knows about runs or MLflow.

A :class:`Cell` is a mean ± std over seeds (shown in percent with two decimals, or as a number or an integer) or a
piece of text; :func:`mark_best` marks the best value bold and the second best underlined.

Seed counts. In a table of means over seeds (``Table.seeds``) every cell knows its ``n``; the table's usual n (the
most common one) is written once in its notes (LaTeX: its caption), and a cell over another number of seeds carries
its own: ``[n=2]`` in text, ``<sup>n=2</sup>`` in markdown, ``$^{n=2}$`` in LaTeX; CSV and JSON give every cell's
``n``. A cell over one seed has no std.

LaTeX fits the text width: no ``%`` in the cells (the caption says the unit), a small ``±`` std, short headers
(``Table.latex_columns``), long text columns wrapped, a narrower column gap, and a table still wider than
``\textwidth`` is scaled down to it (never up). :data:`LATEX_PREAMBLE` names the packages.
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
    seeds: bool = False  # cells are means over seeds: write the usual n once and mark the cells that differ
    latex_columns: list[str] | None = None  # shorter headers (stub + value columns) for LaTeX
    latex_hoist: bool = False  # LaTeX: a text column with one value in every row moves into the caption


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


def _odd_n(table: Table, cell: Cell, usual: int | None) -> int | None:
    """The cell's n when it must be shown beside the cell (a mean over seeds, not the table's usual n)."""
    if not table.seeds or usual is None or cell.kind == "text" or cell.mean is None:
        return None
    return cell.n if cell.n != usual else None


def _seed_counts(table: Table) -> tuple[int | None, list[int]]:
    """(the usual n, the other n that cells show beside them)."""
    usual = usual_n(table) if table.seeds else None
    odd = sorted({n for r in table.rows for c in r.cells if (n := _odd_n(table, c, usual)) is not None})
    return usual, odd


def seed_note(table: Table, marker: str | None = "[n=k]") -> str | None:
    """The table's seed-count convention in one sentence (``marker`` shows how a differing n is written; None: each
    cell's ``n`` field says it, as in JSON)."""
    usual, odd = _seed_counts(table)
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


def _with_n(text: str, n: int | None, before: str, after: str) -> str:
    return text if n is None else f"{text}{before}{n}{after}"


def render_text(table: Table, color: bool = False) -> str:
    style = _ANSI if color else _PLAIN
    header = table.stub_columns + table.columns
    usual = usual_n(table)
    body = [
        row.stub + [_with_n(_display(c, style), _odd_n(table, c, usual), " [n=", "]") for c in row.cells]
        for row in table.rows
    ]
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
    counts = seed_note(table)
    lines.extend(f"note: {n}" for n in ([counts] if counts else []) + table.notes)
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
    usual = usual_n(table)
    for row in table.rows:
        values = [_markdown_escape(s) for s in row.stub] + [
            _with_n(_markdown_escape(_display(c, _MARKDOWN)), _odd_n(table, c, usual), "<sup>n=", "</sup>")
            for c in row.cells
        ]
        lines.append("| " + " | ".join(values) + " |")
    legend = _legend(table, "**bold**:", "<u>underlined</u>:")
    if legend:
        lines += ["", legend]
    counts = seed_note(table, "<sup>n=k</sup>")
    lines.extend(f"\nNote: {_markdown_escape(n)}" for n in ([counts] if counts else []) + table.notes)
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


_WRAP = 20  # text columns with longer entries are wrapped (p{} columns)...
_WRAP_EM = 8  # ...this wide: about 16 characters (half an em each), e.g. half of an MLflow run id
_CHUNK = 8  # a long unbroken run of letters/digits (a run id) may break every this many characters


def _breakable(text: str) -> str:
    """LaTeX for ``text`` with break points after - _ . / : and inside long unbroken runs (ids)."""
    out, run = [], 0
    for ch in text:
        out.append(latex_escape(ch))
        run = 0 if not ch.isalnum() else run + 1
        if ch in "-_./:" or run == _CHUNK:
            out.append(r"\allowbreak{}")
            run = 0
    return "".join(out)


def _latex_cell(cell: Cell, odd: int | None) -> str:
    if cell.kind == "text":
        return latex_escape(cell.text)
    mean, std = cell.parts()
    if cell.kind == "percent":  # the caption gives the unit
        mean, std = mean.rstrip("%"), std.rstrip("%") if std is not None else None
    text = latex_escape(mean)
    if std is not None:  # a small std keeps wide tables readable, as in most ML papers
        text += f" {{\\scriptsize$\\pm${latex_escape(std)}}}"
    if cell.mark in _LATEX:
        before, after = _LATEX[cell.mark]
        text = f"{before}{text}{after}"
    return text if odd is None else f"{text}$^{{n={odd}}}$"


def _latex_caption(table: Table, hoisted: Sequence[tuple[str, str]] = ()) -> str:
    """The title, then what the cells are: unit, seeds, and the mark of a cell over another number of seeds; then
    the columns hoisted out of the table (``Dataset: crema-d``)."""
    said = []
    kinds = {c.kind for r in table.rows for c in r.cells if c.kind != "text"}
    if "percent" in kinds:
        said.append(r"in \%" if kinds == {"percent"} else r"scores in \%")
    usual, odd = _seed_counts(table)
    if usual is not None:
        said.append("one seed per cell" if usual == 1 else f"mean $\\pm$ std over $n={usual}$ seeds")
        if odd:
            said.append(f"$^{{n=k}}$: over $k$ seeds ($k={', '.join(map(str, odd))}$)")
    caption = latex_escape(table.title) + (f" ({'; '.join(said)})" if said else "")
    if hoisted:
        caption += ". " + "; ".join(f"{latex_escape(h)}: {latex_escape(v)}" for h, v in hoisted)
    return caption


def render_latex(table: Table) -> str:
    stub = len(table.stub_columns)
    headers = table.latex_columns or table.stub_columns + table.columns
    keep = list(range(stub))
    if table.latex_hoist and len(table.rows) > 1:
        keep = [i for i in range(stub) if len({r.stub[i] for r in table.rows}) > 1 or not table.rows[0].stub[i]]
    hoisted = [(headers[i], table.rows[0].stub[i]) for i in range(stub) if i not in keep]
    spec = []
    for index in keep:
        longest = max([len(r.stub[index]) for r in table.rows] + [len(headers[index])])
        spec.append(f">{{\\raggedright\\arraybackslash}}p{{{_WRAP_EM}em}}" if longest > _WRAP else "l")
    wrapped = {i for i, s in zip(keep, spec, strict=True) if s != "l"}
    spec += ["c"] * len(table.columns)
    lines = [
        r"\begin{table}[t]",
        r"  \centering",
        f"  \\caption{{{_latex_caption(table, hoisted)}}}",
        f"  \\label{{{_latex_label(table)}}}",
        r"  \setlength{\tabcolsep}{4pt}",
        r"  \sbox0{%",
        f"  \\begin{{tabular}}{{{''.join(spec)}}}",
        r"    \toprule",
    ]
    if table.groups:
        heads, rules, index = [""] * len(keep), [], len(keep) + 1
        for label, span in table.groups:
            heads.append(f"\\multicolumn{{{span}}}{{c}}{{{latex_escape(label)}}}" if span > 1 else latex_escape(label))
            rules.append(f"\\cmidrule(lr){{{index}-{index + span - 1}}}")
            index += span
        lines.append("    " + " & ".join(heads) + r" \\")
        lines.append("    " + " ".join(rules))
    lines.append("    " + " & ".join(latex_escape(headers[i]) for i in keep + list(range(stub, len(headers)))) + r" \\")
    lines.append(r"    \midrule")
    usual = usual_n(table)
    for row in table.rows:
        stubs = [_breakable(row.stub[i]) if i in wrapped else latex_escape(row.stub[i]) for i in keep]
        cells = [_latex_cell(c, _odd_n(table, c, usual)) for c in row.cells]
        lines.append("    " + " & ".join(stubs + cells) + r" \\")
    lines += [
        r"    \bottomrule",
        r"  \end{tabular}}%",
        r"  \ifdim\wd0>\textwidth\resizebox{\textwidth}{!}{\usebox0}\else\usebox0\fi",
        r"\end{table}",
    ]
    return "".join(f"% note: {n}\n" for n in table.notes) + "\n".join(lines) + "\n"


LATEX_PREAMBLE = (
    "% generated by `dmgl report`; needs \\usepackage{booktabs,array,graphicx} (graphicx: a table wider than\n"
    "% \\textwidth is scaled down to it) and \\usepackage{amssymb} for the ablation table's \\checkmark\n"
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
                "n_usual": usual_n(t) if t.seeds else None,
                "notes": [n for n in [seed_note(t, None)] if n] + t.notes,
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
