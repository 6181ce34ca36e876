"""``dmgl report --table imbalance``: what BalanceBenchmark reports beyond accuracy, one table per dataset.

One row per (method, strategy) cell; columns: each modality's Shapley value of test accuracy, the imbalance degree
(max - min of them), parameters, FLOPs per sample, training seconds per epoch and peak memory, mean ± std over the
seeds (``final_test_shapley_<modality>``, ``final_test_imbalance_degree``, ``final_params``,
``final_flops_per_sample``, ``final_seconds_per_epoch``, ``final_peak_memory_mib``, which run.training records once
per seed: :mod:`dmgl_cli.imbalance` says how each is measured). The imbalance degree and the costs are marked best
(lowest) and second; Shapley values are not ranked (a larger one is no better in itself). They are measured on the
test split only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dmgl_cli.errors import DmglError
from dmgl_cli.report.labels import row_label, row_order
from dmgl_cli.report.selection import Group
from dmgl_cli.tables import Cell, Row, Table, mark_best

SHAPLEY_PREFIX = "final_test_shapley_"
# (metric key, column, cell kind, scale): the cost columns after the Shapley values, lower is better in each
COST_COLUMNS: tuple[tuple[str, str, str, float], ...] = (
    ("final_test_imbalance_degree", "Imbalance", "percent", 1.0),
    ("final_params", "Params", "integer", 1.0),
    ("final_flops_per_sample", "MFLOPs/sample", "number", 1e-6),
    ("final_seconds_per_epoch", "s/epoch", "number", 1.0),
    ("final_peak_memory_mib", "Peak MiB", "number", 1.0),
)
NOTE = (
    "Shapley value of test accuracy per modality: exact over all modality coalitions, an absent modality's input "
    "replaced by zeros, the empty coalition scored with every input zeroed, so a row's values add up to its ACC minus "
    "that empty-coalition accuracy; Imbalance = max − min Shapley; Params: all of the model's parameters; "
    "MFLOPs/sample: one evaluation forward as torch's FlopCounterMode counts it; s/epoch: mean training seconds per "
    "epoch; Peak MiB: CUDA max_memory_allocated on a GPU, the process's peak RSS on the CPU (run tag dmgl.peak_memory)"
)


def _scaled_cell(group: Group, key: str, kind: str, scale: float, warn: Callable[[str], None] | None) -> Cell:
    stat = group.stat(key, warn)
    mean = None if stat.mean is None else stat.mean * scale
    std = None if stat.std is None else stat.std * scale
    return Cell(mean, std, stat.n, kind, runs=stat.runs)


def imbalance_tables(
    groups: Sequence[Group], split: str = "test", warn: Callable[[str], None] | None = None, labels: str = "code"
) -> list[Table]:
    """One table per dataset: a row per (method, strategy) cell of ``groups``, mean ± std over its seeds."""
    if split != "test":
        raise DmglError("the imbalance table is measured on the test split only; leave out --split val")
    tables = []
    for dataset in sorted({g.dataset for g in groups}):
        mine = sorted(
            (g for g in groups if g.dataset == dataset), key=lambda g: row_order(g.method, g.spec, g.variant, labels)
        )
        modalities = sorted(
            {k[len(SHAPLEY_PREFIX) :] for g in mine for r in g.runs for k in r.metrics if k.startswith(SHAPLEY_PREFIX)}
        )
        if not modalities:
            if warn:
                warn(
                    f"no run on {dataset} recorded Shapley values (final_test_shapley_*): runs trained before "
                    "dmgl recorded them have none; its imbalance table shows only the cost columns"
                )
            modalities = sorted({m for g in mine for m in g.modalities})
        table = Table(
            "imbalance",
            f"Modality imbalance and cost on {dataset}: Shapley values of test accuracy",
            ["Method"],
            [*modalities] + [column for _, column, _, _ in COST_COLUMNS],
            groups=[("Shapley", len(modalities))] if modalities else None,
            dataset=dataset,
            seeds=True,
            notes=[NOTE],
            latex_columns=["Method", *modalities, "Imb.", "Params", "MFLOPs", "s/ep.", "MiB"],
        )
        for group in mine:
            cells = [_scaled_cell(group, f"{SHAPLEY_PREFIX}{m}", "percent", 1.0, warn) for m in modalities]
            cells += [_scaled_cell(group, key, kind, scale, warn) for key, _, kind, scale in COST_COLUMNS]
            table.rows.append(Row([row_label(group.method, group.spec, group.variant, labels)], cells))
        for index in range(len(modalities), len(table.columns)):
            mark_best([row.cells[index] for row in table.rows], higher_is_better=False)
        table.marks = "column"
        tables.append(table)
    return tables
