"""The paper's figures as PNG files: learned alpha over training (``alpha``, Figure 3), per-modality scores and the
modality gap (``gap``, a Figure 2 analogue) and validation curves (``curves``).

Every figure shows the spread over seeds: lines are the mean over seeds with a shaded band of ± one (sample)
standard deviation, bars carry ± std error bars. Cells are grouped as the tables group them
(:func:`~dmgl_cli.report.selection.group_runs`: runs of different settings are refused unless ``allow_mixed``).
Per-epoch metric histories are read from the tracker only for the figures that draw them (alpha trajectories,
validation curves), and only for the runs those figures show; ``gap`` needs nothing beyond the runs' final metrics.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmgl_cli.errors import DmglError
from dmgl_cli.metrics import mean_std
from dmgl_cli.report.labels import method_label, row_label, row_order
from dmgl_cli.report.selection import Group, SeedRun, group_runs
from dmgl_cli.report.tables import METRIC_NAMES

if TYPE_CHECKING:
    from dmgl_cli.tracking import Tracker

PLOTS = ("alpha", "gap", "curves")


def _safe_file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def seed_band(series: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, mean - std, mean + std) over the seeds' histories, step by step (std 0 where one seed has it)."""
    by_step: dict[int, list[float]] = {}
    for history in series:
        for step, value in history:
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    stats = [mean_std(by_step[s]) for s in steps]
    return steps, [m for m, _ in stats], [m - s for m, s in stats], [m + s for m, s in stats]


def _seeds(count: int) -> str:
    return f"{count} seed{'s' if count != 1 else ''}"


def make_figures(
    kinds: Sequence[str],
    runs: Sequence[SeedRun],
    split: str = "test",
    metric: str = "acc",
    *,
    tracker: Tracker,
    warn: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
    labels: str = "code",
    allow_mixed: bool = False,
) -> list[tuple[str, Any]]:
    """The requested figures as (file name, matplotlib figure); ``tracker`` reads the metric histories of the runs
    shown. The caller saves (:func:`write_plots`) or closes them."""
    from dmgl_cli import plots  # matplotlib loads only when a figure is asked for

    unknown = [k for k in kinds if k not in PLOTS]
    if unknown:
        raise DmglError(f"unknown plot {', '.join(unknown)}; valid: {', '.join(PLOTS)}")
    groups = group_runs(runs, note, allow_mixed=allow_mixed)
    figures: list[tuple[str, Any]] = []
    try:
        _draw(kinds, groups, split, metric, tracker, warn, labels, figures)
    except BaseException:
        for _, figure in figures:
            plots.close(figure)
        raise
    return figures


def _draw(
    kinds: Sequence[str],
    groups: list[Group],
    split: str,
    metric: str,
    tracker: Tracker,
    warn: Callable[[str], None] | None,
    labels: str,
    figures: list[tuple[str, Any]],
) -> None:
    """Append the figures of ``kinds`` to ``figures`` (so that the caller can close them if one fails)."""
    from dmgl_cli import plots

    def label(group: Group) -> str:
        return row_label(group.method, group.spec, group.variant, labels)

    def ordered(mine: list[Group]) -> list[Group]:
        return sorted(mine, key=lambda g: row_order(g.method, g.spec, g.variant, labels))

    if "alpha" in kinds:
        trajectories, bands = {}, {}
        lb = [g for g in groups if g.spec.name == "lb"]
        if not lb:
            raise DmglError("--plot alpha needs runs of the learning-based strategy (lb); none is selected")
        for group in lb:
            series = [tracker.metric_history(r.run_id, "alpha") for r in group.runs]
            series = [s for s in series if s]
            if not series:
                if warn:
                    warn(f"runs {', '.join(r.run_id for r in group.runs)} ({group.dataset}) recorded no alpha")
                continue
            _, mean, low, high = seed_band(series)
            name = f"{group.dataset} ({method_label(group.method, group.variant, labels)}, {_seeds(len(series))})"
            trajectories[name] = mean
            if len(series) > 1:
                bands[name] = (low, high)
        figure = plots.alpha_figure(
            trajectories, bands=bands, title="Learned alpha during training (mean ± std over seeds)"
        )
        figures.append(("alpha.png", figure))
    if "gap" in kinds:
        for dataset in sorted({g.dataset for g in groups}):
            mine = ordered([g for g in groups if g.dataset == dataset])
            modalities = sorted({m for g in mine for m in g.modalities})
            scores, errors, distances, distance_errors = {}, {}, {}, {}
            for group in mine:
                keys = {"fused": f"final_{split}_{metric}"}
                keys.update({m: f"final_{split}_{metric}_{m}" for m in modalities})
                stats = {name: group.stat(key, warn) for name, key in keys.items()}
                scores[label(group)] = {name: s.mean for name, s in stats.items()}
                errors[label(group)] = {name: s.std if s.n > 1 else None for name, s in stats.items()}
                gap = group.stat(f"final_{split}_modality_gap", warn)
                distances[label(group)] = gap.mean
                distance_errors[label(group)] = gap.std if gap.n > 1 else None
            figure = plots.gap_figure(
                scores,
                distances,
                title=f"{dataset}: per-modality {split} {METRIC_NAMES[metric]} and modality gap "
                "(mean ± std over seeds)",
                metric=METRIC_NAMES[metric],
                errors=errors,
                distance_errors=distance_errors,
            )
            figures.append((f"gap-{_safe_file_part(dataset)}.png", figure))
    if "curves" in kinds:
        for dataset in sorted({g.dataset for g in groups}):
            panels, bands = {}, {}
            for group in ordered([g for g in groups if g.dataset == dataset]):
                keys = [f"val_{metric}"] + [f"val_{metric}_{m}" for m in group.modalities]
                curves, spread = {}, {}
                count = 0
                for key in keys:
                    series = [s for s in (tracker.metric_history(r.run_id, key) for r in group.runs) if s]
                    if series:
                        name = "fused" if key == f"val_{metric}" else key.rsplit("_", 1)[-1]
                        steps, mean, low, high = seed_band(series)
                        curves[name] = (steps, mean)
                        count = max(count, len(series))
                        if len(series) > 1:
                            spread[name] = (low, high)
                panel = f"{label(group)}, {_seeds(count)}"
                panels[panel], bands[panel] = curves, spread
            figure = plots.curves_figure(
                panels,
                title=f"{dataset}: validation {METRIC_NAMES[metric]} per epoch (mean ± std over seeds)",
                metric=METRIC_NAMES[metric],
                bands=bands,
            )
            figures.append((f"curves-{_safe_file_part(dataset)}.png", figure))


def write_plots(
    kinds: Sequence[str],
    runs: Sequence[SeedRun],
    out_dir: Path,
    split: str = "test",
    metric: str = "acc",
    *,
    tracker: Tracker,
    warn: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
    labels: str = "code",
    allow_mixed: bool = False,
) -> list[Path]:
    """Write the requested figures (:func:`make_figures`) as PNG under ``out_dir``; returns the files written."""
    from dmgl_cli import plots

    figures = make_figures(
        kinds, runs, split, metric, tracker=tracker, warn=warn, note=note, labels=labels, allow_mixed=allow_mixed
    )
    written = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        while figures:
            name, figure = figures.pop(0)
            written.append(plots.save_png(figure, out_dir / name))  # closes the figure
    finally:
        for _, figure in figures:
            plots.close(figure)
    return written
