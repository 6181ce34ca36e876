"""Figures drawn from recorded metrics (matplotlib, headless).

Functions take plain numbers (no MLflow objects) and return a matplotlib figure; :func:`save_png` writes it
atomically. Every figure carries a title, axis labels with units and a legend, so it reads without the code; the
layout is constrained (nothing clipped), titles wrap, legends sit outside the plots, and spreads over seeds are
drawn as shaded bands (lines) or error bars (bars).
"""

from __future__ import annotations

import math
import os
import tempfile
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

# Figures are made as matplotlib.figure.Figure objects on an Agg canvas, not through pyplot: pyplot's import (its
# backend machinery, ~0.17 s) is left out of every `dmgl train` exit.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def new_figure(
    figsize: tuple[float, float], dpi: int, layout: Literal["constrained", "compressed", "tight"] | None = None
) -> Figure:
    """``pyplot.figure`` without pyplot: a new figure on an Agg canvas (headless)."""
    figure = Figure(figsize=figsize, dpi=dpi, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def subplots(
    *grid: int,
    figsize: tuple[float, float],
    dpi: int,
    layout: Literal["constrained", "compressed", "tight"] | None = None,
    **options,
) -> tuple[Figure, Any]:
    """``pyplot.subplots`` without pyplot: a new figure and its axes (one Axes, or an array of them, as asked)."""
    figure = new_figure(figsize, dpi, layout)
    return figure, figure.subplots(*grid, **options)


def heuristic_alpha(epoch: int) -> float:
    """omega(t) = 1 - exp(-1/t), t the 1-based epoch (§3.3)."""
    return 1.0 - math.exp(-1.0 / epoch)


def _wrapped(text: str, figure, fontsize: float = 12.0, share: float = 1.0) -> str:
    """``text`` broken into lines that fit ``share`` of the figure's width (about half an em per character)."""
    width_pt = figure.get_figwidth() * 72 * share
    return "\n".join(textwrap.wrap(text, max(20, int(width_pt / (0.55 * fontsize))))) or text


def _legend_below(figure, axes, columns: int = 3, fontsize: float = 8) -> None:
    """One legend for ``axes`` (labels deduplicated) below the plots, outside them: it hides no data or text."""
    handles, labels, seen = [], [], set()
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            if label not in seen and not label.startswith("_"):
                seen.add(label)
                handles.append(handle)
                labels.append(label)
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(columns, len(labels)), fontsize=fontsize)


def alpha_figure(
    trajectories: dict[str, list[float]],
    title: str = "alpha during training",
    bands: dict[str, tuple[list[float], list[float]]] | None = None,
):
    """Alpha per epoch against x = epoch / total epochs, with the heuristic omega(t) for reference (Figure 3).

    ``bands`` optionally shades a (low, high) range per trajectory, e.g. mean ± std over seeds. The layout is
    constrained, the title wrapped and the legend below the axes, so nothing is clipped or hidden."""
    figure, axis = subplots(figsize=(5.5, 3.9), dpi=120, layout="constrained")
    longest = 1
    for label, values in trajectories.items():
        total = len(values)
        longest = max(longest, total)
        xs = [(e + 1) / total for e in range(total)]
        (line,) = axis.plot(xs, values, marker="o", markersize=3, label=label)
        if bands and label in bands:
            low, high = bands[label]
            axis.fill_between(xs[: len(low)], low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    reference = [heuristic_alpha(e) for e in range(1, longest + 1)]
    axis.plot(
        [(e + 1) / longest for e in range(longest)],
        reference,
        linestyle="--",
        color="gray",
        label=r"heuristic $\omega(t)=1-e^{-1/t}$",
    )
    axis.set_xlabel("epoch / total epochs")
    axis.set_ylabel(r"$\alpha$ (weight of the matching loss)")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(_wrapped(title, figure, 12))
    axis.grid(alpha=0.3)
    _legend_below(figure, [axis], columns=2)
    return figure


def gap_figure(
    scores: Mapping[str, Mapping[str, float | None]],
    distances: Mapping[str, float | None],
    title: str,
    metric: str = "ACC",
    errors: Mapping[str, Mapping[str, float | None]] | None = None,
    distance_errors: Mapping[str, float | None] | None = None,
):
    """Figure 2 analogue: per method, the fused and per-modality scores (%) with the gap between the modalities
    written above them (left), and the modality-gap distance between the modalities' embeddings (right).

    ``errors`` / ``distance_errors`` (same keys, std over seeds) draw error bars. The legend sits below the
    plots, so it never covers a bar or a gap label."""
    methods = list(scores)
    series = sorted({name for values in scores.values() for name in values}, key=lambda n: (n != "fused", n))
    figure, (left, right) = subplots(
        1,
        2,
        figsize=(max(7.0, 1.3 * len(methods) + 4.5), 4.4),
        dpi=120,
        gridspec_kw={"width_ratios": [2.2, 1]},
        layout="constrained",
    )
    width = 0.8 / max(1, len(series))
    tops = [0.0] * len(methods)
    for index, name in enumerate(series):
        xs = [m + (index - (len(series) - 1) / 2) * width for m in range(len(methods))]
        values = [scores[method].get(name) for method in methods]
        heights = [100 * v if v is not None else 0.0 for v in values]
        spread = [100 * ((errors or {}).get(method, {}).get(name) or 0.0) for method in methods]
        left.bar(xs, heights, width=width, label=name, yerr=spread if any(spread) else None, capsize=2)
        tops = [max(t, h + e) for t, h, e in zip(tops, heights, spread, strict=True)]
    for position, method in enumerate(methods):
        modal = [v for k, v in scores[method].items() if k != "fused" and v is not None]
        if len(modal) > 1:
            left.annotate(
                f"gap {100 * (max(modal) - min(modal)):.1f}",
                (position, tops[position]),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    left.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
    left.set_ylabel(f"{metric} (%)")
    left.set_ylim(0, max(105.0, max(tops, default=0.0) + 8.0))  # room for the gap labels above the bars
    left.set_title("fused and per-modality scores", fontsize=10)
    left.grid(axis="y", alpha=0.3)
    heights = [distances.get(m) or 0.0 for m in methods]
    spread = [(distance_errors or {}).get(m) or 0.0 for m in methods]
    right.bar(range(len(methods)), heights, color="tab:purple", yerr=spread if any(spread) else None, capsize=2)
    right.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
    right.set_ylabel("distance between modality centroids", fontsize=9)
    right.set_title("modality gap", fontsize=10)
    right.grid(axis="y", alpha=0.3)
    figure.suptitle(_wrapped(title, figure, 12))
    _legend_below(figure, [left], columns=len(series))
    return figure


def curves_figure(
    panels: dict[str, dict[str, tuple[list[int], list[float]]]],
    title: str,
    metric: str = "ACC",
    bands: dict[str, dict[str, tuple[list[float], list[float]]]] | None = None,
):
    """One panel per method: validation score per epoch for the fused prediction and each modality's head.

    ``bands[panel][curve]`` optionally shades a (low, high) range per curve (fractions, like the values), e.g.
    mean ± std over seeds."""
    count = max(1, len(panels))
    columns = min(3, count)
    rows = math.ceil(count / columns)
    figure, axes = subplots(
        rows,
        columns,
        figsize=(4.2 * columns, 3.2 * rows + 0.6),
        dpi=110,
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for axis, (label, curves) in zip(list(axes.flat)[: len(panels)], panels.items(), strict=True):
        for name, (epochs, values) in curves.items():
            (line,) = axis.plot(
                epochs,
                [100 * v for v in values],
                marker="o",
                markersize=2,
                linewidth=2.0 if name == "fused" else 1.2,
                label=name,
            )
            band = (bands or {}).get(label, {}).get(name)
            if band:
                low, high = band
                axis.fill_between(
                    epochs[: len(low)],
                    [100 * v for v in low],
                    [100 * v for v in high],
                    color=line.get_color(),
                    alpha=0.2,
                    linewidth=0,
                )
        axis.set_title(_wrapped(label, figure, 9, 1 / columns), fontsize=9)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epoch")
        axis.set_ylabel(f"validation {metric} (%)")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(_wrapped(title, figure, 12))
    _legend_below(figure, list(axes.flat)[: len(panels)], columns=6)
    return figure


def cd_figure(ranks: Mapping[str, float], cd: float, cliques: list[list[str]], title: str):
    """Critical-difference diagram (Demšar 2006, Figure 1): the average rank of each method on an axis from 1 (best,
    left) to k, the better half labelled on the left and the rest on the right, a bar of length CD above the axis,
    and thick bars joining the methods no test tells apart (``cliques``)."""
    names = sorted(ranks, key=lambda name: ranks[name])
    k = len(names)
    left = names[: (k + 1) // 2]
    right = names[(k + 1) // 2 :][::-1]
    rows = max(len(left), len(right))
    figure, axis = subplots(figsize=(7.5, 1.9 + 0.28 * rows + 0.12 * len(cliques)), dpi=120, layout="constrained")
    axis.set_axis_off()
    clique_top = -0.18
    first_label = clique_top - 0.13 * len(cliques) - 0.15
    bottom = first_label - 0.28 * (rows - 1) - 0.2
    axis.set_xlim(1 - 0.12 * max(1, k - 1), k + 0.12 * max(1, k - 1))
    axis.set_ylim(bottom, 0.75)
    axis.plot([1, k], [0, 0], color="black", linewidth=1.2)
    for tick in range(1, k + 1):
        axis.plot([tick, tick], [0, 0.06], color="black", linewidth=1.0)
        axis.text(tick, 0.09, str(tick), ha="center", va="bottom", fontsize=9)
    axis.plot([1, 1 + cd], [0.5, 0.5], color="black", linewidth=1.5)
    for end in (1, 1 + cd):
        axis.plot([end, end], [0.46, 0.54], color="black", linewidth=1.5)
    axis.text(1 + cd / 2, 0.56, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9)
    for index, members in enumerate(cliques):
        low, high = min(ranks[m] for m in members), max(ranks[m] for m in members)
        height = clique_top - 0.13 * index
        axis.plot([low - 0.03, high + 0.03], [height, height], color="black", linewidth=3.5, solid_capstyle="round")
    for side, members in (("left", left), ("right", right)):
        edge = 1 - 0.05 * max(1, k - 1) if side == "left" else k + 0.05 * max(1, k - 1)
        for row, name in enumerate(members):
            height = first_label - 0.28 * row
            rank = ranks[name]
            axis.plot([rank, rank, edge], [0, height, height], color="dimgray", linewidth=0.9)
            axis.text(
                edge + (-0.03 if side == "left" else 0.03),
                height,
                f"{name} ({rank:.2f})" if side == "left" else f"({rank:.2f}) {name}",
                ha="right" if side == "left" else "left",
                va="center",
                fontsize=9,
            )
    axis.set_title(_wrapped(title, figure, 10), fontsize=10)
    return figure


def save_png(figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` as PNG atomically (temp file, then rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(tmp, format="png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a figure is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        close(figure)
    return path


def close(figure) -> None:
    """Release a figure's artists (no pyplot registry holds it)."""
    figure.clear()
