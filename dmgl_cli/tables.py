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
from typing import TYPE_CHECKING, Any

from dmgl_cli.errors import DmglError

if TYPE_CHECKING:
    from dmgl_cli.stats import PairedDifference

FORMATS = ("text", "markdown", "latex", "csv", "json")
CHECK, CROSS = "✓", "×"

# ------------------------------------------------------------------------------------------------- model


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
    table.lower_better = tuple(sorted(lower))


# --------------------------------------------------------------------------------------------- rendering

_ANSI = {"best": ("\033[1m", "\033[0m"), "second": ("\033[4m", "\033[0m")}
_PLAIN = {"best": ("*", "*"), "second": ("_", "_")}
_MARKDOWN = {"best": ("**", "**"), "second": ("<u>", "</u>")}
_LATEX = {"best": (r"\textbf{", "}"), "second": (r"\underline{", "}")}
for _style in (_ANSI, _PLAIN, _MARKDOWN, _LATEX):
    _style["tied"] = _style["best"]  # --stats: not significantly worse than the best looks like the best
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
    if table.significance:
        return (
            f"{best} best, or tied with it: not significantly worse than the best ({table.significance}) "
            f"per {table.marks or 'column'}"
        )
    return f"{best} best, {second} second best per {table.marks or 'column'}"


def _with_n(text: str, n: int | None, before: str, after: str) -> str:
    return text if n is None else f"{text}{before}{n}{after}"


def _with_interval(text: str, cell: Cell) -> str:
    interval = cell.interval_text()
    return text if interval is None else f"{text} ({interval})"


def _notes(table: Table, marker: str | None) -> list[str]:
    """The table's notes in order: seeds, intervals, the --stats note, then its own."""
    said = [seed_note(table, marker), intervals_note(table), table.stats_note or None]
    return [n for n in said if n] + table.notes


def format_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"={p:.3f}"


def _delta_parts(cell: Cell) -> tuple[str, str, str, str] | None:
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


def _delta_text(cell: Cell) -> str:
    parts = _delta_parts(cell)
    if parts is None:
        return ""
    mean, low, high, p = parts
    text = mean + (f" [{low}, {high}]" if low else "") + (f" p{p}" if p else "")
    comparison = cell.comparison
    if comparison and comparison.difference and comparison.difference.n == 1 and not comparison.is_reference:
        text += " (1 seed)"
    return text


def _delta_label(row: Row) -> str | None:
    """``Δ vs REF`` for the line under ``row``, or None when the row has nothing compared to another cell."""
    compared = [c.comparison for c in row.cells if c.comparison is not None]
    if not any(not c.is_reference for c in compared):
        return None
    references = {c.reference for c in compared}
    return f"Δ vs {references.pop()}" if len(references) == 1 else "Δ vs best"


def _delta_stub(table: Table, label: str) -> list[str]:
    """The Δ line's stub: its label in the last stub column (the one naming the row), the others empty."""
    return [""] * (len(table.stub_columns) - 1) + [f"  {label}"]


def render_text(table: Table, color: bool = False) -> str:
    style = _ANSI if color else _PLAIN
    header = table.stub_columns + table.columns
    usual = usual_n(table)
    body = []
    for row in table.rows:
        body.append(
            row.stub
            + [_with_interval(_with_n(_display(c, style), _odd_n(table, c, usual), " [n=", "]"), c) for c in row.cells]
        )
        label = _delta_label(row)
        if label:
            body.append(_delta_stub(table, label) + [_delta_text(c) for c in row.cells])
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
    lines.extend(f"note: {n}" for n in _notes(table, "[n=k]"))
    return "\n".join(lines) + "\n"


def _markdown_escape(text: str) -> str:
    return text.replace("|", r"\|")


def render_markdown(table: Table, padded: bool = False) -> str:
    """The table in GitHub markdown. ``padded``: every cell between en spaces (``&ensp;``), for renderers that draw
    table cells without padding (an MLflow run's description), and the source's columns aligned."""
    header = list(table.stub_columns)
    index = 0
    for label, span in table.groups or []:
        header += [f"{label} {column}" for column in table.columns[index : index + span]]
        index += span
    header += table.columns[index:]
    left = len(table.stub_columns)
    body: list[list[str]] = [list(map(_markdown_escape, header))]
    usual = usual_n(table)
    for row in table.rows:
        body.append(
            [_markdown_escape(s) for s in row.stub]
            + [
                _with_interval(
                    _with_n(_markdown_escape(_display(c, _MARKDOWN)), _odd_n(table, c, usual), "<sup>n=", "</sup>"),
                    c,
                )
                for c in row.cells
            ]
        )
        label = _delta_label(row)
        if label:
            stub = [s.strip() and f"&emsp;{_markdown_escape(s.strip())}" for s in _delta_stub(table, label)]
            body.append(stub + [_markdown_escape(_delta_text(c)) for c in row.cells])
    if padded:
        body = [[f"&ensp;{value}&ensp;" if value else value for value in values] for values in body]
        widths = [max(3, *(len(values[i]) for values in body if i < len(values))) for i in range(len(body[0]))]
        body = [
            [v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=False))]
            for values in body
        ]
        align = [":" + "-" * (w - 1) if i < left else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    else:
        align = [":--"] * left + ["--:"] * len(table.columns)
    lines = [
        f"**{_markdown_escape(table.title)}**",
        "",
        "| " + " | ".join(body[0]) + " |",
        "| " + " | ".join(align) + " |",
    ]
    lines += ["| " + " | ".join(values) + " |" for values in body[1:]]
    legend = _legend(table, "**bold**:", "<u>underlined</u>:")
    if legend:
        lines += ["", legend]
    lines.extend(f"\nNote: {_markdown_escape(n)}" for n in _notes(table, "<sup>n=k</sup>"))
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
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "α": r"$\alpha$",
    "≥": r"$\geq$",
    "−": "-",
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
    text = text if odd is None else f"{text}$^{{n={odd}}}$"
    interval = cell.interval_text()
    return text if interval is None else f"{text} {{\\scriptsize({interval})}}"


def _latex_delta(cell: Cell) -> str:
    parts = _delta_parts(cell)
    if parts is None:
        return ""
    mean, low, high, p = parts
    if mean in ("ref", "-"):
        return f"{{\\scriptsize {mean}}}"
    text = f"${mean}$" + (f" [${low}$, ${high}$]" if low else "") + (f" $p{p}$" if p else "")
    return f"{{\\scriptsize {text}}}"


def _latex_caption(table: Table, hoisted: Sequence[tuple[str, str]] = ()) -> str:
    """The title, then what the cells are: unit, seeds, and the mark of a cell over another number of seeds; then
    the columns hoisted out of the table (``Dataset: crema-d``); then what --stats added."""
    said = []
    kinds = {c.kind for r in table.rows for c in r.cells if c.kind != "text"}
    if "percent" in kinds:
        said.append(r"in \%" if kinds == {"percent"} else r"scores in \%")
    usual, odd = _seed_counts(table)
    if usual is not None:
        said.append("one seed per cell" if usual == 1 else f"mean $\\pm$ std over $n={usual}$ seeds")
        if odd:
            said.append(f"$^{{n=k}}$: over $k$ seeds ($k={', '.join(map(str, odd))}$)")
    if intervals_note(table):
        said.append(r"$(a, b)$: 95\% $t$-interval of the mean")
    caption = latex_escape(table.title) + (f" ({'; '.join(said)})" if said else "")
    if hoisted:
        caption += ". " + "; ".join(f"{latex_escape(h)}: {latex_escape(v)}" for h, v in hoisted)
    if table.significance and any(c.mark for r in table.rows for c in r.cells):
        caption += (
            f". Bold: best, or tied with it (not significantly worse than the best: {latex_escape(table.significance)})"
        )
    if table.stats_note:
        caption += ". " + latex_escape(table.stats_note)
    return caption


def render_latex(table: Table) -> str:
    stub = len(table.stub_columns)
    headers = table.latex_columns or table.stub_columns + table.columns
    keep = list(range(stub))
    if table.latex_hoist and len(table.rows) > 1:
        keep = [i for i in range(stub) if len({r.stub[i] for r in table.rows}) > 1 or not table.rows[0].stub[i]]
    hoisted = [(headers[i], table.rows[0].stub[i]) for i in range(stub) if i not in keep]
    spec = []
    deltas = {id(row): label for row in table.rows if (label := _delta_label(row))}
    for index in keep:
        longest = max([len(r.stub[index]) for r in table.rows] + [len(headers[index])])
        if index == stub - 1 and deltas:
            longest = max([longest] + [len(label) + 2 for label in deltas.values()])
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
        if id(row) in deltas:
            labels = _delta_stub(table, deltas[id(row)])
            delta_stubs = [
                f"\\quad {{\\scriptsize {latex_escape(labels[i].strip())}}}" if labels[i] else "" for i in keep
            ]
            lines.append("    " + " & ".join(delta_stubs + [_latex_delta(c) for c in row.cells]) + r" \\")
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
    data = {
        "mean": cell.mean,
        "std": cell.std if cell.n > 1 else None,
        "n": cell.n,
        "ci": list(cell.ci) if cell.ci is not None else None,
        "mark": cell.mark or None,
        "runs": list(cell.runs),
    }
    if cell.comparison is not None:
        data["comparison"] = cell.comparison.to_dict()
    return data


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
                "notes": _notes(t, None),
            }
            for t in tables
        ],
        "warnings": list(warnings),
    }
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


CSV_COLUMNS = [
    "table",
    "dataset",
    "method",
    "row",
    "group",
    "column",
    "text",
    "mean",
    "std",
    "n",
    "ci_low",
    "ci_high",
    "mark",
    "reference",
    "diff",
    "diff_low",
    "diff_high",
    "p",
    "p_holm",
    "test",
    "pairs",
]


def _number(value: float | None) -> str:
    return "" if value is None else repr(value)


def render_csv(tables: Sequence[Table]) -> str:
    """Tidy CSV: one line per cell, raw fractions (not percentages), for pandas & co. The --stats columns
    (reference ... pairs) are empty for a cell that was not compared; ``diff`` is cell minus reference."""
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
                compared: list[Any] = [""] * 8
                if cell.comparison is not None:
                    c = cell.comparison.to_dict()
                    compared = [
                        c["reference"] + (" (this cell)" if c["is_reference"] else ""),
                        *(_number(c[k]) for k in ("diff", "diff_low", "diff_high", "p", "p_holm")),
                        c["test"] or "",
                        c["pairs"],
                    ]
                writer.writerow(
                    [
                        table.kind,
                        table.dataset,
                        table.method,
                        " / ".join(row.stub),
                        group,
                        column,
                        # as the cell prints (a number's mean ± std; its mark is the `mark` column)
                        cell.text if not numeric else ("" if cell.mean is None else _display(cell, {})),
                        "" if not numeric or cell.mean is None else repr(cell.mean),
                        "" if not numeric or cell.std is None or cell.n < 2 else repr(cell.std),
                        cell.n if numeric else "",
                        "" if cell.ci is None else repr(cell.ci[0]),
                        "" if cell.ci is None else repr(cell.ci[1]),
                        cell.mark,
                        *compared,
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
