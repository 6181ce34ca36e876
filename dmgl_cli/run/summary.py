"""A parent run's summary once its seeds are finished: the mean ± std of their final metrics, the seeds' alpha plot
and the markdown description the MLflow UI shows (the test scores table and the imbalance/cost table)."""

from __future__ import annotations

import json
from collections.abc import Callable

from dmgl_cli.config import Config, recorded_params
from dmgl_cli.over_seeds import curves_over_seeds, mean_std, summarise_over_seeds
from dmgl_cli.run.outcomes import FINAL_PREFIX, SeedOutcome
from dmgl_cli.strategies import spec_from_params
from dmgl_cli.tables import Cell, Row, Table, render_markdown
from dmgl_cli.tracking import Tracker

_SCORES = ("acc", "map", "f1")
DESCRIPTION_LIMIT = 8000  # the longest tag value MLflow stores; many seeds' rows leave the table at its mean row


def parent_description(config: Config, experiment_id: str, outcomes: list[SeedOutcome], alpha_png: str | None) -> str:
    """The parent run's markdown description: test scores at each seed's validation-selected epoch, mean ± std over
    the seeds and per seed (each linked to its run), and the seeds' alpha plot (``alpha_png``, its link)."""
    split, finals = "test", [o.final for o in outcomes]
    prefix = f"{split}_acc_"
    modalities = sorted(set.intersection(*({k[len(prefix) :] for k in f if k.startswith(prefix)} for f in finals)))
    keys = [f"{split}_{m}" for m in _SCORES] + [f"{prefix}{m}" for m in modalities]
    columns = [m.upper() for m in _SCORES] + [f"ACC {m}" for m in modalities]
    if len(modalities) > 1:
        keys.append(f"{split}_gap_acc")
        columns.append("Gap ACC")

    def cell(values: list[float]) -> Cell:
        return Cell(*mean_std(values), len(values)) if values else Cell()

    seeds = f"{len(outcomes)} seed{'s' if len(outcomes) != 1 else ''}"
    mean_row = Row([f"mean ± std ({seeds})"], [cell([f[k] for f in finals if k in f]) for k in keys])
    seed_rows = [
        Row(
            [f"[seed {o.seed}](#/experiments/{experiment_id}/runs/{o.run_id})"],
            [cell([o.final[k]]) if k in o.final else Cell() for k in keys],
        )
        for o in outcomes
    ]
    spec = spec_from_params({k: str(v) for k, v in recorded_params(config).items()})
    strategy = spec.label if spec is not None else config.strategy.name
    plot = (
        f"\n**alpha per epoch**, one line per seed:\n\n![alpha per epoch]({alpha_png})\n\n"
        "(`alpha.png` in this run's artifacts; the per-epoch values are each seed's `alpha/value` metric.)\n"
        if alpha_png is not None
        else "\nalpha is 0 throughout: no matching loss was computed.\n"
    )
    note = (
        f"each seed's scores are at its best epoch on validation {config.train.select_metric} (never chosen on test); "
        "mean ± std is the sample std over seeds; Gap ACC = max − min of the per-modality ACC"
    )
    imbalance = imbalance_table(config, strategy, finals, cell)
    for rows, notes in (([mean_row, *seed_rows], [note]), ([mean_row], [note, "the seeds' rows are in their runs"])):
        table = Table(
            kind="summary",
            title=f"{config.method.name} · {strategy} on {config.dataset}: test scores",
            stub_columns=[""],
            columns=columns,
            rows=rows,
            notes=notes,
        )
        # padded: the UI draws a description's table cells with no padding of their own
        text = (
            render_markdown(table, padded=True)
            + (f"\n{render_markdown(imbalance, padded=True)}" if imbalance else "")
            + plot
        )
        if len(text) <= DESCRIPTION_LIMIT:
            break
    return text


def imbalance_table(
    config: Config, strategy: str, finals: list[dict[str, float]], cell: Callable[[list[float]], Cell]
) -> Table | None:
    """The description's second table: mean ± std over the seeds of the Shapley values of test accuracy, the
    imbalance degree and the cost (:mod:`dmgl_cli.imbalance`); None when no seed recorded them."""
    prefix = "test_shapley_"
    modalities = sorted({k[len(prefix) :] for f in finals for k in f if k.startswith(prefix)})
    if not modalities:
        return None
    shown = [(f"{prefix}{m}", f"Shapley {m}", "percent") for m in modalities] + [
        ("test_imbalance_degree", "Imbalance", "percent"),
        ("params", "Params", "integer"),
        ("flops_per_sample", "FLOPs/sample", "integer"),
        ("seconds_per_epoch", "s/epoch", "number"),
        ("peak_memory_mib", "Peak MiB", "number"),
    ]
    cells = []
    for key, _, kind in shown:
        value = cell([f[key] for f in finals if key in f])
        value.kind = kind
        cells.append(value)
    return Table(
        kind="summary",
        title=f"{config.method.name} · {strategy} on {config.dataset}: modality imbalance and cost",
        stub_columns=[""],
        columns=[label for _, label, _ in shown],
        rows=[Row([f"mean ± std ({len(finals)} seed{'s' if len(finals) != 1 else ''})"], cells)],
        notes=[
            "Shapley value of test accuracy per modality (an absent modality's input is zeroed; they add up to "
            "ACC minus the accuracy with every input zeroed); Imbalance = max − min Shapley; FLOPs per sample of one "
            "evaluation forward; s/epoch = mean training seconds per epoch; Peak MiB: CUDA max_memory_allocated, "
            "or the process's peak RSS on the CPU (run tag dmgl.peak_memory)"
        ],
    )


def finish_parent(
    tracker: Tracker, parent_id: str, outcomes: list[SeedOutcome], config: Config, experiment_id: str
) -> dict[str, float]:
    finals = [o.final for o in outcomes]
    summary = summarise_over_seeds(finals)
    tracker.log_metrics(parent_id, {FINAL_PREFIX + k: v for k, v in summary.items()})
    # the seeds' curves as mean and std per epoch, under the seeds' names: one chart compares parents and seeds
    for epoch, point in enumerate(curves_over_seeds([o.history for o in outcomes]), start=1):
        tracker.log_metrics(parent_id, point, step=epoch)
    tracker.log_text(
        parent_id,
        json.dumps({"summary": summary, "per_seed": {o.seed: o.final for o in outcomes}}, indent=2, sort_keys=True),
        "final_metrics.json",
    )
    trajectories = {}
    for outcome in outcomes:
        trajectories[f"seed {outcome.seed}"] = [value for _, value in tracker.metric_history(outcome.run_id, "alpha")]
    alpha_png = None
    if any(trajectories.values()):  # a run whose alpha is 0 throughout records none
        from dmgl_cli.plots import alpha_figure, close  # matplotlib at the end of a run, not before its first step

        figure = alpha_figure(trajectories)
        tracker.log_figure(parent_id, figure, "alpha.png")
        close(figure)
        alpha_png = tracker.artifact_link(parent_id, "alpha.png")
    description = parent_description(config, experiment_id, outcomes, alpha_png)
    tracker.set_description(parent_id, description)
    tracker.end_run(parent_id, "FINISHED")
    return summary
