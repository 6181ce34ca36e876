"""LaTeX (booktabs), fitted to the text width (see :mod:`dmgl_cli.tables`)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from dmgl_cli.tables.cells import LATEX_MARKS, delta_label, delta_parts, delta_stub
from dmgl_cli.tables.model import CHECK, CROSS, Cell, Table, intervals_note, odd_n, seed_counts, usual_n

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
    if cell.mark in LATEX_MARKS:
        before, after = LATEX_MARKS[cell.mark]
        text = f"{before}{text}{after}"
    text = text if odd is None else f"{text}$^{{n={odd}}}$"
    interval = cell.interval_text()
    return text if interval is None else f"{text} {{\\scriptsize({interval})}}"


def _latex_delta(cell: Cell) -> str:
    parts = delta_parts(cell)
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
    usual, odd = seed_counts(table)
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
    deltas = {id(row): label for row in table.rows if (label := delta_label(row))}
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
        cells = [_latex_cell(c, odd_n(table, c, usual)) for c in row.cells]
        lines.append("    " + " & ".join(stubs + cells) + r" \\")
        if id(row) in deltas:
            labels = delta_stub(table, deltas[id(row)])
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
