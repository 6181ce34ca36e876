"""CSV and JSON with raw fractions, for other programs."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from dmgl_cli.tables.cells import display_cell, table_notes
from dmgl_cli.tables.model import Cell, Table, usual_n


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
                "notes": table_notes(t, None),
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
                        cell.text if not numeric else ("" if cell.mean is None else display_cell(cell, {})),
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
