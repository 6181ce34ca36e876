"""Aligned text (optionally ANSI bold / underline) and markdown."""

from __future__ import annotations

from dmgl_cli.tables.cells import (
    ANSI_MARKS,
    MARKDOWN_MARKS,
    PLAIN_MARKS,
    delta_label,
    delta_stub,
    delta_text,
    display_cell,
    marks_legend,
    table_notes,
    visible_width,
    with_interval,
    with_n,
)
from dmgl_cli.tables.model import Table, odd_n, usual_n


def render_text(table: Table, color: bool = False) -> str:
    style = ANSI_MARKS if color else PLAIN_MARKS
    header = table.stub_columns + table.columns
    usual = usual_n(table)
    body = []
    for row in table.rows:
        body.append(
            row.stub
            + [with_interval(with_n(display_cell(c, style), odd_n(table, c, usual), " [n=", "]"), c) for c in row.cells]
        )
        label = delta_label(row)
        if label:
            body.append(delta_stub(table, label) + [delta_text(c) for c in row.cells])
    widths = [max([visible_width(h)] + [visible_width(line[i]) for line in body]) for i, h in enumerate(header)]
    stub = len(table.stub_columns)

    def line(values: list[str]) -> str:
        out = []
        for i, value in enumerate(values):
            pad = " " * (widths[i] - visible_width(value))
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
    legend = marks_legend(table, "bold" if color else "*x*", "underlined" if color else "_x_")
    if legend:
        lines.append(legend)
    lines.extend(f"note: {n}" for n in table_notes(table, "[n=k]"))
    return "\n".join(lines) + "\n"


def markdown_escape(text: str) -> str:
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
    body: list[list[str]] = [list(map(markdown_escape, header))]
    usual = usual_n(table)
    for row in table.rows:
        body.append(
            [markdown_escape(s) for s in row.stub]
            + [
                with_interval(
                    with_n(
                        markdown_escape(display_cell(c, MARKDOWN_MARKS)), odd_n(table, c, usual), "<sup>n=", "</sup>"
                    ),
                    c,
                )
                for c in row.cells
            ]
        )
        label = delta_label(row)
        if label:
            stub = [s.strip() and f"&emsp;{markdown_escape(s.strip())}" for s in delta_stub(table, label)]
            body.append(stub + [markdown_escape(delta_text(c)) for c in row.cells])
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
        f"**{markdown_escape(table.title)}**",
        "",
        "| " + " | ".join(body[0]) + " |",
        "| " + " | ".join(align) + " |",
    ]
    lines += ["| " + " | ".join(values) + " |" for values in body[1:]]
    legend = marks_legend(table, "**bold**:", "<u>underlined</u>:")
    if legend:
        lines += ["", legend]
    lines.extend(f"\nNote: {markdown_escape(n)}" for n in table_notes(table, "<sup>n=k</sup>"))
    return "\n".join(lines) + "\n"
