"""The paper's figures as PNG files: learned alpha over training (``alpha``, Figure 3), per-modality scores and the
modality gap (``gap``, a Figure 2 analogue), validation curves (``curves``) and the modality gap made visible
(``embeddings``, Figure 2: each run's test embeddings projected to 2-D, and the gap distance per epoch), and the
critical-difference diagram (``cd``): the rows of the main table (method, strategy) ranked on each dataset by
their mean ``metric`` over seeds, Friedman's test across the datasets and Nemenyi's critical difference
(:func:`dmgl_cli.stats.friedman_nemenyi`), over the rows that have a score on every dataset.

Every figure shows the spread over seeds: lines are the mean over seeds with a shaded band of ± one (sample)
standard deviation, bars carry ± std error bars. Cells are grouped as the tables group them
(:func:`~dmgl_cli.report.selection.group_runs`: runs of different settings are refused unless ``allow_mixed``).
Per-epoch metric histories are read from the tracker only for the figures that draw them (alpha trajectories,
validation curves, the gap per epoch), and only for the runs those figures show; ``gap`` needs nothing beyond the
runs' final metrics. ``embeddings`` also rebuilds one seed per cell from its best checkpoint and runs it on the split
(:mod:`~dmgl_cli.report.embeddings`): the seed with the best validation score.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dmgl_cli.errors import DmglError
from dmgl_cli.over_seeds import mean_std
from dmgl_cli.report.labels import method_label, row_label, row_order
from dmgl_cli.report.selection import Group, SeedRun, group_runs
from dmgl_cli.report.tables import METRIC_NAMES

if TYPE_CHECKING:
    from dmgl_cli.report.embeddings import EmbeddingPanel
    from dmgl_cli.tracking import Tracker

PLOTS = ("alpha", "gap", "curves", "embeddings", "cd")


def _safe_file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def seed_band(
    series: list[list[tuple[int, float]]], shared_only: bool = False
) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, mean - std, mean + std) over the seeds' histories, step by step (std 0 where one seed has it).
    ``shared_only``: only the steps every seed has, for sparse histories (test is scored at each seed's own new
    best epochs), where a step's mean would otherwise be over whichever seeds happened to score it."""
    by_step: dict[int, list[float]] = {}
    for history in series:
        for step, value in history:
            by_step.setdefault(step, []).append(value)
    steps = sorted(s for s in by_step if not shared_only or len(by_step[s]) == len(series))
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
    projection: str = "pca",
) -> list[tuple[str, Any]]:
    """The requested figures as (file name, matplotlib figure); ``tracker`` reads the metric histories of the runs
    shown (and, for ``embeddings``, their checkpoints). ``projection`` (``pca`` or ``umap``) is the 2-D projection
    of the ``embeddings`` figure. The caller saves (:func:`write_plots`) or closes them."""
    from dmgl_cli import plots  # matplotlib loads only when a figure is asked for

    unknown = [k for k in kinds if k not in PLOTS]
    if unknown:
        raise DmglError(f"unknown plot {', '.join(unknown)}; valid: {', '.join(PLOTS)}")
    if "embeddings" in kinds:
        from dmgl_cli.report.embeddings import check_projection

        check_projection(projection)
    groups = group_runs(runs, note, allow_mixed=allow_mixed)
    figures: list[tuple[str, Any]] = []
    try:
        _draw(kinds, groups, split, metric, tracker, warn, labels, figures, projection)
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
    projection: str = "pca",
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
    if "cd" in kinds:
        figures.append(("cd.png", cd_diagram(groups, split, metric, labels, warn)))
    if "embeddings" in kinds:
        from dmgl_cli.report.embeddings import best_seed, run_panel

        for dataset in sorted({g.dataset for g in groups}):
            mine = [g for g in ordered([g for g in groups if g.dataset == dataset]) if len(g.modalities) > 1]
            if not mine:
                raise DmglError(f"--plot embeddings needs runs with two or more modalities; {dataset} has none")
            panels = []
            for group in mine:
                chosen = best_seed(group.runs)
                panels.append(run_panel(tracker, chosen, f"{label(group)}, seed {chosen.seed}", split, projection))
            # The gap per epoch of ``split``; test scores are logged per epoch only with train.test_curves, so
            # without them it is validation's (said on the axis and in a warning).
            histories = {
                curve_split: {
                    id(g): [
                        s
                        for s in (tracker.metric_history(r.run_id, f"{curve_split}_modality_gap") for r in g.runs)
                        if s
                    ]
                    for g in mine
                }
                for curve_split in dict.fromkeys([split, "val"])
            }
            curve_split = split if any(histories[split].values()) else "val"
            if curve_split != split and warn:
                warn(
                    f"{dataset}: no run logged {split}_modality_gap per epoch (train.test_curves=false); "
                    "the embeddings figure draws val_modality_gap per epoch instead"
                )
            curves, bands, seed_points = {}, {}, {}
            for group in mine:
                series = histories[curve_split][id(group)]
                if not series:
                    if warn:
                        warn(f"{dataset} / {label(group)}: no run recorded {curve_split}_modality_gap per epoch")
                    continue
                steps, mean, low, high = seed_band(series, shared_only=True)
                name = f"{label(group)}, {_seeds(len(series))}"
                curves[name] = (steps, mean)
                seed_points[name] = series
                if len(series) > 1:
                    bands[name] = (low, high)
            figure = embeddings_figure(
                panels,
                curves,
                bands,
                title=f"{dataset}: L2-normalised {split} embeddings per modality ({projection.upper()}), best "
                f"checkpoint of the seed best on validation; {curve_split} modality gap per epoch",
                split=curve_split,
                seed_points=seed_points,
            )
            figures.append((f"embeddings-{_safe_file_part(dataset)}.png", figure))


def cd_diagram(
    groups: Sequence[Group], split: str, metric: str, labels: str = "code", warn: Callable[[str], None] | None = None
):
    """The ``cd`` figure (see the module docstring). Raises DmglError with fewer than 2 datasets or 3 rows that
    have a score on every dataset."""
    from dmgl_cli import plots
    from dmgl_cli.stats import friedman_nemenyi

    key = f"final_{split}_{metric}"
    datasets = sorted({g.dataset for g in groups})
    if len(datasets) < 2:
        raise DmglError(
            f"--plot cd ranks the rows across datasets and needs runs on 2 or more; the selection has "
            f"{len(datasets)} ({', '.join(datasets) or 'none'})"
        )
    scores: dict[str, dict[str, float]] = {}
    for group in sorted(groups, key=lambda g: row_order(g.method, g.spec, g.variant, labels)):
        mean = group.stat(key).mean
        if mean is not None:
            scores.setdefault(row_label(group.method, group.spec, group.variant, labels), {})[group.dataset] = mean
    complete = [name for name, by_dataset in scores.items() if set(by_dataset) == set(datasets)]
    if len(complete) < 3:
        raise DmglError(
            f"--plot cd needs 3 or more rows (method, strategy) with a {split} {METRIC_NAMES[metric]} on every "
            f"dataset ({', '.join(datasets)}); {len(complete)} have one ({', '.join(complete) or 'none'})"
        )
    left_out = [name for name in scores if name not in complete]
    if left_out and warn:
        warn(f"--plot cd leaves out the rows without a score on every dataset: {', '.join(left_out)}")
    result = friedman_nemenyi([[scores[name][d] for name in complete] for d in datasets])
    ranks = dict(zip(complete, result.ranks, strict=True))
    title = (
        f"{split} {METRIC_NAMES[metric]}: average rank over {len(datasets)} datasets (1 = best); Friedman "
        f"chi2 = {result.statistic:.2f}, p = {result.p_value:.3g}; Nemenyi CD = {result.cd:.2f} (alpha 0.05); "
        "bars join rows not significantly different"
    )
    return plots.cd_figure(ranks, result.cd, [[complete[i] for i in clique] for clique in result.cliques], title)


def _wrap(text: str, figure, fontsize: float, share: float = 1.0) -> str:
    """``text`` broken into lines that fit ``share`` of the figure's width (about half an em per character)."""
    width = figure.get_figwidth() * 72 * share
    return "\n".join(textwrap.wrap(text, max(20, int(width / (0.55 * fontsize))))) or text


def gap_legend(panel: EmbeddingPanel) -> str:
    """The legend line of a panel's gap: ``modality gap ‖c_audio − c_visual‖ = 0.734``, or for more modalities
    the mean over pairs (the logged metric) followed by each pair's distance."""
    if len(panel.pair_gaps) == 1:
        (a, b), _ = next(iter(panel.pair_gaps.items()))
        return f"modality gap ‖c_{a} − c_{b}‖ = {panel.gap:.3f}"
    pairs = ", ".join(f"{a}–{b} {value:.3f}" for (a, b), value in panel.pair_gaps.items())
    return f"modality gap (mean over pairs) = {panel.gap:.3f} ({pairs})"


def embeddings_figure(
    panels: Sequence[EmbeddingPanel],
    curves: dict[str, tuple[list[int], list[float]]],
    bands: dict[str, tuple[list[float], list[float]]],
    title: str,
    split: str = "test",
    seed_points: dict[str, list[list[tuple[int, float]]]] | None = None,
):
    """Figure 2: one panel per run, side by side (each modality's projected points, its centroid as a large
    marker, the centroids joined by a line, the gap distance in the legend), and below them the gap distance per
    epoch for every cell: the mean over seeds at the epochs every seed scored (``curves``), a shaded band of ± one
    std (``bands``), and each seed's own scored epochs as dots (``seed_points``: test is scored only at a seed's new
    best epochs and its last, so the seeds' epochs differ and a mean over whichever seeds scored an epoch would
    mislead)."""
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    from dmgl_cli import plots

    count = max(1, len(panels))
    figure = plots.new_figure(figsize=(max(7.0, 3.6 * count), 7.4), dpi=110, layout="constrained")
    grid = figure.add_gridspec(2, count, height_ratios=[1.35, 1])
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, panel in enumerate(panels):
        axis = figure.add_subplot(grid[0, index])
        for number, (name, points) in enumerate(panel.points.items()):
            colour = colours[number % len(colours)]
            axis.scatter(points[:, 0], points[:, 1], s=6, alpha=0.35, color=colour, label=f"{name} (n={len(points)})")
        centres = np.array([panel.centroids[name] for name in panel.points])
        axis.plot(centres[:, 0], centres[:, 1], color="black", linewidth=1.2, label=gap_legend(panel))
        for number, name in enumerate(panel.points):
            axis.scatter(
                *panel.centroids[name],
                s=140,
                marker="X",
                color=colours[number % len(colours)],
                edgecolors="black",
                linewidths=1.0,
                zorder=3,
                label=f"centroid {name}",
            )
        axis.set_title(_wrap(f"{panel.title} ({panel.run_id[:8]})", figure, 9, 1 / count), fontsize=9)
        axis.set_xlabel(f"{panel.projection.upper()} 1", fontsize=8)
        axis.set_ylabel(f"{panel.projection.upper()} 2", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=1, frameon=False)
    over_epochs = figure.add_subplot(grid[1, :])
    for name, (steps, mean) in curves.items():
        (line,) = over_epochs.plot(steps, mean, marker="o", markersize=2, label=name)
        if name in bands:
            low, high = bands[name]
            over_epochs.fill_between(steps[: len(low)], low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        for history in (seed_points or {}).get(name, []):
            if history:
                epochs, values = zip(*history, strict=True)
                over_epochs.scatter(epochs, values, s=10, alpha=0.5, color=line.get_color(), linewidths=0)
    over_epochs.set_xlabel("epoch")
    over_epochs.set_ylabel(f"{split} modality gap\n(centroid distance)", fontsize=9)
    over_epochs.xaxis.set_major_locator(MaxNLocator(integer=True))
    over_epochs.grid(alpha=0.3)
    if curves:
        over_epochs.legend(fontsize=8, loc="best")
    over_epochs.set_title(
        f"{split} modality gap per epoch: line = mean ± std over seeds at the epochs every seed scored"
        + ("; dots = each seed's scored epochs" if seed_points else ""),
        fontsize=10,
    )
    figure.suptitle(_wrap(title, figure, 11), fontsize=11)
    return figure


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
    projection: str = "pca",
) -> list[Path]:
    """Write the requested figures (:func:`make_figures`) as PNG under ``out_dir``; returns the files written."""
    from dmgl_cli import plots

    figures = make_figures(
        kinds,
        runs,
        split,
        metric,
        tracker=tracker,
        warn=warn,
        note=note,
        labels=labels,
        allow_mixed=allow_mixed,
        projection=projection,
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
