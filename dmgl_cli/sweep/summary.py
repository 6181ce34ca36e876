"""The sweep's summary: per strategy its trials by state and its best trial (chosen on validation) with mean ± std
over seeds, and a note on which strategies the best one significantly beats, paired over seeds (paired t-test,
Holm-corrected across the other strategies; :mod:`dmgl_cli.stats`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmgl_cli.stats import ALPHA, holm, paired_difference
from dmgl_cli.tables import Cell, Row, Table, format_p, mark_best

if TYPE_CHECKING:
    from dmgl_cli.sweep.space import SweepSettings
    from dmgl_cli.sweep.worker import TrialRecord

STATE_NAMES = {
    "COMPLETE": "complete",
    "PRUNED": "pruned",
    "RUNNING": "running",
    "WAITING": "waiting",
    "FAIL": "failed",
}


def trial_value(record: TrialRecord) -> float:
    """The objective of a trial that has one (callers rank only completed trials with a value)."""
    assert record.value is not None
    return record.value


def summary_table(records: list[TrialRecord], settings: SweepSettings, study_name: str) -> Table:
    """Per strategy: trials by state and the best trial (by validation, the objective) with its test score."""
    metric = settings.metric.upper()
    table = Table(
        "sweep",
        f"Sweep {study_name}: best trial per strategy ({settings.trials_per_strategy} trial(s) "
        f"x {len(settings.seeds)} seed(s) each; chosen on validation {metric})",
        ["Strategy", "Trials"],
        [f"val {metric}", f"test {metric}", "params", "MLflow run"],
        marks="column",
    )
    for spec in settings.specs:
        mine = [r for r in records if r.strategy == spec.key]
        counts = {name: sum(r.state == state for r in mine) for state, name in STATE_NAMES.items()}
        state = ", ".join(f"{n} {name}" for name, n in counts.items() if n) or "none"
        done = [r for r in mine if r.state == "COMPLETE" and r.value is not None]
        best = max(done, key=trial_value) if done else None
        n = len(settings.seeds)
        cells = [
            Cell.over_seeds(best.value, best.value_std, n, by_seed=best.value_by_seed) if best else Cell(),
            Cell.over_seeds(best.test, best.test_std, n) if best and best.test is not None else Cell(),
            Cell.literal(" ".join(f"{k}={v:.3g}" for k, v in best.params.items()) if best else ""),
            Cell.literal(best.run_id or "" if best else ""),
        ]
        table.rows.append(Row([spec.label, state], cells))
    mark_best([row.cells[0] for row in table.rows])
    note = beaten_note(records, settings)
    if note:
        table.notes.append(note)
    return table


def beaten_note(records: list[TrialRecord], settings: SweepSettings, alpha: float = ALPHA) -> str | None:
    """Which strategies the best one (by its best trial's objective) significantly beats: each other strategy's
    best trial, paired with it seed by seed (paired t-test), Holm-corrected across those strategies."""
    metric = f"val {settings.metric.upper()}"
    best_per_strategy = {}
    for spec in settings.specs:
        done = [r for r in records if r.strategy == spec.key and r.state == "COMPLETE" and r.value is not None]
        if done:
            best_per_strategy[spec.label] = max(done, key=trial_value)
    if len(best_per_strategy) < 2:
        return None
    leader = max(best_per_strategy, key=lambda label: trial_value(best_per_strategy[label]))
    others = [label for label in best_per_strategy if label != leader]
    differences = {
        label: paired_difference(best_per_strategy[leader].value_by_seed, best_per_strategy[label].value_by_seed)
        for label in others
    }
    tested = [label for label in others if differences[label].p_value is not None]
    if not tested:
        return (
            f"{leader} is best on {metric}; no strategy is tested against it (a paired test needs 2 or more seeds "
            "that both trials recorded: sweep with --seeds 3 or more)"
        )
    adjusted = dict(zip(tested, holm([differences[label].p_value for label in tested]), strict=True))

    def said(label: str) -> str:
        difference = differences[label]
        assert difference.mean is not None
        return f"{label} ({100 * difference.mean:+.2f} points, p{format_p(adjusted[label] or 0.0)})"

    beaten = [label for label in tested if (adjusted[label] or 1.0) < alpha and (differences[label].mean or 0) > 0]
    kept = [label for label in tested if label not in beaten]
    untested = [label for label in others if label not in tested]
    parts = [
        f"{leader} (best on {metric}) significantly beats " + (", ".join(map(said, beaten)) if beaten else "none"),
    ]
    if kept:
        parts.append("not significantly: " + ", ".join(map(said, kept)))
    if untested:
        parts.append(f"not tested (fewer than 2 shared seeds): {', '.join(untested)}")
    return (
        "; ".join(parts)
        + f" (paired t-test over seeds, Holm-adjusted across the other strategies, alpha {alpha:g}; the best trial "
        "of each strategy)"
    )
