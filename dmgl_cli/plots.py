"""Figures drawn from recorded metrics (matplotlib, headless).

Functions take plain numbers (no MLflow objects) and return a matplotlib figure; :func:`save_png` writes it
atomically. Every figure carries a title, axis labels with units and a legend, so it reads without the code.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def heuristic_alpha(epoch: int) -> float:
    """omega(t) = 1 - exp(-1/t), t the 1-based epoch (§3.3)."""
    return 1.0 - math.exp(-1.0 / epoch)


def alpha_figure(
    trajectories: dict[str, list[float]],
    title: str = "alpha during training",
    bands: dict[str, tuple[list[float], list[float]]] | None = None,
):
    """Alpha per epoch against x = epoch / total epochs, with the heuristic omega(t) for reference (Figure 3).

    ``bands`` optionally shades a (low, high) range per trajectory, e.g. the spread over seeds."""
    figure, axis = plt.subplots(figsize=(5.5, 3.6), dpi=120)
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
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def gap_figure(
    scores: dict[str, dict[str, float | None]], distances: dict[str, float | None], title: str, metric: str = "ACC"
):
    """Figure 2 analogue: per method, the fused and per-modality scores (%) with the gap between the modalities
    written above them (left), and the modality-gap distance between the modalities' embeddings (right)."""
    methods = list(scores)
    series = sorted({name for values in scores.values() for name in values}, key=lambda n: (n != "fused", n))
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(max(7.0, 1.3 * len(methods) + 4.5), 4.0), dpi=120, gridspec_kw={"width_ratios": [2.2, 1]}
    )
    width = 0.8 / max(1, len(series))
    for index, name in enumerate(series):
        xs = [m + (index - (len(series) - 1) / 2) * width for m in range(len(methods))]
        heights = [100 * v if v is not None else 0.0 for v in (scores[method].get(name) for method in methods)]
        left.bar(xs, heights, width=width, label=name)
    for position, method in enumerate(methods):
        modal = [v for k, v in scores[method].items() if k != "fused" and v is not None]
        if len(modal) > 1:
            top = max(100 * v for v in scores[method].values() if v is not None)
            left.annotate(
                f"gap {100 * (max(modal) - min(modal)):.1f}",
                (position, top),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    left.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
    left.set_ylabel(f"{metric} (%)")
    left.set_ylim(0, 105)
    left.set_title("fused and per-modality scores")
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3)
    heights = [distances.get(m) or 0.0 for m in methods]
    right.bar(range(len(methods)), heights, color="tab:purple")
    right.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
    right.set_ylabel("distance between modality centroids")
    right.set_title("modality gap")
    right.grid(axis="y", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def curves_figure(panels: dict[str, dict[str, tuple[list[int], list[float]]]], title: str, metric: str = "ACC"):
    """One panel per method: validation score per epoch for the fused prediction and each modality's head."""
    count = max(1, len(panels))
    columns = min(3, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), dpi=110, squeeze=False, sharey=True)
    for axis, (label, curves) in zip(list(axes.flat)[: len(panels)], panels.items(), strict=True):
        for name, (epochs, values) in curves.items():
            axis.plot(
                epochs,
                [100 * v for v in values],
                marker="o",
                markersize=2,
                linewidth=2.0 if name == "fused" else 1.2,
                label=name,
            )
        axis.set_title(label, fontsize=9)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epoch")
        axis.set_ylabel(f"validation {metric} (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
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
    plt.close(figure)
