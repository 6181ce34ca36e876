"""``dmgl report --stats``: whether the differences in a table are real (:mod:`dmgl_cli.stats` does the numbers).

What is compared. The marks of a table already say what competes: the rows of each column (``main``: methods;
``ablation``: strategies) or the columns of each row (``strategies``: the integration strategies). Along each such
line every valued cell is compared with a reference cell: ``baseline`` (a row label, or a strategy's label in a
strategies table; matched without regard to case) or, by default, the line's best cell (highest mean; lowest for
the gap). A comparison pairs the two cells' runs by seed (the ``dmgl.seed`` tag): one seed fixes a run's initial
weights and batch order whatever its strategy, so the difference seed by seed removes the seed-to-seed noise both
share. Only seeds both cells have are paired; the table's note names the cells with seeds on one side only.

What is shown. Each cell's paired difference to the reference (points), its 95% t-interval and its p-value from
the named test, Holm-adjusted across the cells of the line (:class:`dmgl_cli.tables.Comparison`). The marks become
"best" (the best mean) and "tied" (drawn bold too): a cell that the best does not significantly beat (Holm-adjusted
p >= alpha, or a difference in its favour). The note names the test, the correction, the number of pairs and the
power: how many seeds a paired t-test needs to detect a 1-point difference 80% of the time, with the paired std
observed in this table (pooled over its comparisons).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from dmgl_cli.errors import DmglError
from dmgl_cli.stats import ALPHA, TESTS, PairedDifference, holm, paired_difference, seeds_for_power
from dmgl_cli.tables import Cell, Comparison, Table

STATS_TABLES = ("main", "strategies", "ablation")
MAX_LISTED = 6  # cells named in one note before "and N more"


@dataclass
class _Line:
    """Cells that compete with each other: a column's rows, or a row's columns."""

    name: str  # the column (``crema-d ACC``) or the row (``Multi``)
    cells: list[Cell]
    lower_is_better: bool


def _column_names(table: Table) -> list[str]:
    names: list[str] = []
    for label, span in table.groups or []:
        names += [f"{label} {column}" for column in table.columns[len(names) : len(names) + span]]
    return names + table.columns[len(names) :]


def entries(table: Table) -> list[str]:
    """The labels of what the table compares: its rows, or its columns when the marks are per row."""
    if table.marks == "row":
        return list(table.column_labels or table.columns)
    return [row.stub[-1] for row in table.rows]


def _lines(table: Table) -> list[_Line]:
    if table.marks == "row":
        return [_Line(row.stub[-1], row.cells, i in table.lower_better) for i, row in enumerate(table.rows)]
    return [
        _Line(name, [row.cells[j] for row in table.rows], j in table.lower_better)
        for j, name in enumerate(_column_names(table))
    ]


def _find(names: Sequence[str], wanted: str) -> int | None:
    wanted = wanted.strip().lower()
    return next((i for i, name in enumerate(names) if name.strip().lower() == wanted), None)


def compare_tables(tables: Sequence[Table], baseline: str | None = None, test: str = "t", alpha: float = ALPHA) -> None:
    """Add the comparisons of the module docstring to every table of :data:`STATS_TABLES` kinds among ``tables``.
    Raises DmglError when none is of those kinds, or when ``baseline`` names nothing any of them compares."""
    if test not in TESTS:
        raise DmglError(f"unknown test {test!r}; valid: {', '.join(TESTS)}")
    compared = [t for t in tables if t.kind in STATS_TABLES]
    if not compared:
        kinds = ", ".join(sorted({t.kind for t in tables})) or "none"
        raise DmglError(f"--stats compares the rows of the {', '.join(STATS_TABLES)} tables, not {kinds}")
    if baseline is not None and not any(_find(entries(t), baseline) is not None for t in compared):
        valid = list(dict.fromkeys(name for t in compared for name in entries(t)))
        raise DmglError(f"--baseline {baseline!r} names no row of the table; valid: {', '.join(valid)}")
    for table in compared:
        compare_table(table, baseline, test, alpha)


def _best(cells: list[Cell], valued: list[int], lower: bool) -> int:
    values = {i: cells[i].rounded() for i in valued}
    return (min if lower else max)(valued, key=lambda i: values[i] or 0.0)


def _compare(cells: list[Cell], reference: int, others: list[int], test: str):
    differences = {i: paired_difference(cells[i].by_seed, cells[reference].by_seed, test) for i in others}
    adjusted = holm([differences[i].p_value for i in others])
    return differences, dict(zip(others, adjusted, strict=True))


def _direction(difference: PairedDifference, p_holm: float | None, alpha: float) -> int:
    """+1 when the cell is significantly above its reference (cell minus reference > 0, Holm-adjusted p < alpha),
    -1 when significantly below, 0 otherwise."""
    if p_holm is None or difference.mean is None or p_holm >= alpha or difference.mean == 0:
        return 0
    return 1 if difference.mean > 0 else -1


def compare_table(table: Table, baseline: str | None = None, test: str = "t", alpha: float = ALPHA) -> None:
    """Comparisons, marks and the note for one table (see the module docstring)."""
    names = entries(table)
    chosen = _find(names, baseline) if baseline is not None else None
    axis = "row" if table.marks == "row" else "column"
    shown: list[PairedDifference] = []
    unpaired: list[str] = []
    fallbacks = 0
    baseline_missing = baseline is not None and chosen is None
    for line in _lines(table):
        cells = line.cells
        valued = [i for i, c in enumerate(cells) if c.kind != "text" and c.mean is not None and math.isfinite(c.mean)]
        for i in valued:
            cells[i].mark = ""
        if not valued:
            continue
        best = _best(cells, valued, line.lower_is_better)
        reference = chosen if chosen is not None and chosen in valued else best
        baseline_missing |= chosen is not None and chosen not in valued
        others = [i for i in valued if i != reference]
        differences, adjusted = _compare(cells, reference, others, test)
        cells[reference].comparison = Comparison(names[reference], is_reference=True)
        for i in others:
            cells[i].comparison = Comparison(names[reference], False, differences[i], adjusted[i])
            difference = differences[i]
            shown.append(difference)
            fallbacks += test == "wilcoxon" and difference.test == "t"
            if difference.only_first or difference.only_second:
                unpaired.append(_unpaired(line.name, names[i], names[reference], difference))
        if len(valued) < 2:  # as mark_best: one value is nobody's best
            continue
        if reference != best:
            differences, adjusted = _compare(cells, best, [i for i in valued if i != best], test)
        worse = 1 if line.lower_is_better else -1  # the direction of a significantly worse cell
        directions = {i: _direction(d, adjusted[i], alpha) for i, d in differences.items()}
        beaten = any(direction == -worse for direction in directions.values())  # a cell significantly better
        cells[best].mark = "" if beaten else "best"
        top = cells[best].rounded()
        for i, direction in directions.items():
            if cells[i].rounded() == top and not beaten:
                cells[i].mark = "best"
            elif direction != worse:
                cells[i].mark = "tied"
    table.significance = f"{TESTS[test]} on shared seeds, Holm-adjusted p ≥ {alpha:g}"
    if not shown:
        table.stats_note = f"Δ: nothing to compare (no {axis} has two or more values)"
    else:
        table.stats_note = _note(
            table, shown, unpaired, fallbacks, names[chosen] if chosen is not None else None, test, alpha
        )
    if baseline_missing:
        table.notes.append(
            f"--baseline {baseline!r} has no value in some {axis}s of this table: compared with the best"
        )


def _seeds(seeds: Sequence[int]) -> str:
    return f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}"


def _unpaired(line: str, cell: str, reference: str, difference: PairedDifference) -> str:
    parts = []
    if difference.only_first:
        parts.append(f"{_seeds(difference.only_first)} only in {cell}")
    if difference.only_second:
        parts.append(f"{_seeds(difference.only_second)} only in {reference}")
    return f"{line} / {cell}: {' and '.join(parts)}"


def power_sentence(differences: Sequence[PairedDifference], effect: float = 0.01) -> str:
    """``a 1-point difference needs N seeds at 80% power (...)``, from the pooled std of ``differences``."""
    variances = [d.std**2 for d in differences if d.std is not None and math.isfinite(d.std)]
    if not variances:
        return "the power cannot be estimated (no comparison has 2 or more paired seeds)"
    pooled = math.sqrt(sum(variances) / len(variances))
    needed = seeds_for_power(pooled, effect)
    points = f"{100 * effect:g}-point"
    basis = (
        f"(paired t-test, two-sided alpha 0.05, paired std {100 * pooled:.2f} points pooled over this table's "
        "comparisons; noncentral t)"
    )
    if needed is None:
        return f"a {points} difference needs more than 100000 seeds at 80% power {basis}"
    return f"a {points} difference needs {needed} seeds at 80% power {basis}"


def _note(
    table: Table,
    shown: Sequence[PairedDifference],
    unpaired: Sequence[str],
    fallbacks: int,
    baseline: str | None,
    test: str,
    alpha: float,
) -> str:
    axis, other = ("row", "column") if table.marks == "row" else ("column", "row")
    reference = baseline or f"the best {other} of each {axis}"
    pairs = Counter(d.n for d in shown)
    if pairs:
        usual = max(pairs, key=lambda n: (pairs[n], n))
        odd = sorted(n for n in pairs if n != usual)
        counted = f"{usual} paired seeds" + (f"; {', '.join(map(str, odd))} for some" if odd else "")
    else:
        counted = "no pairs"
    parts = [
        f"Δ: paired difference to {reference} in points over the seeds both cells have ({counted}), with its 95% "
        f"t-interval; p: {TESTS[test]}, Holm-adjusted across the {other}s of each {axis} (alpha = {alpha:g})",
        power_sentence(shown),
    ]
    if fallbacks:
        parts.append(
            f"the Wilcoxon test needs 6 or more pairs with a non-zero difference: the paired t-test stood in for "
            f"{fallbacks} comparison(s)"
        )
    if unpaired:
        listed = "; ".join(unpaired[:MAX_LISTED]) + (
            f"; and {len(unpaired) - MAX_LISTED} more" if len(unpaired) > MAX_LISTED else ""
        )
        parts.append(f"seeds left unpaired (on one side only): {listed}")
    return "; ".join(parts)
