"""The paper's figures as PNG files: learned alpha over training (``alpha``, Figure 3), per-modality scores and the
modality gap (``gap``, a Figure 2 analogue) and validation curves (``curves``).

Per-epoch metric histories are read from the tracker only for the figures that draw them (alpha trajectories,
validation curves), and only for the runs those figures show; ``gap`` needs nothing beyond the runs' final metrics.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dmgl_cli.errors import DmglError
from dmgl_cli.report.selection import SeedRun, group_runs
from dmgl_cli.report.tables import METRIC_NAMES

if TYPE_CHECKING:
    from dmgl_cli.tracking import Tracker

PLOTS = ("alpha", "gap", "curves")


def _safe_file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def _mean_trajectory(series: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for history in series:
        for step, value in history:
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


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
) -> list[Path]:
    """Write the requested figures as PNG under ``out_dir``; returns the files written. ``tracker`` reads the
    metric histories of the runs shown."""
    from dmgl_cli import plots  # matplotlib loads only when a figure is asked for

    unknown = [k for k in kinds if k not in PLOTS]
    if unknown:
        raise DmglError(f"unknown plot {', '.join(unknown)}; valid: {', '.join(PLOTS)}")
    groups = group_runs(runs, note)
    written: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)
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
            _, mean = _mean_trajectory(series)
            label = f"{group.dataset} ({group.method}, {len(series)} seed{'s' if len(series) > 1 else ''})"
            trajectories[label] = mean
            if len(series) > 1:
                length = min(len(s) for s in series)
                bands[label] = (
                    [min(s[i][1] for s in series) for i in range(length)],
                    [max(s[i][1] for s in series) for i in range(length)],
                )
        figure = plots.alpha_figure(
            trajectories, bands=bands, title="Learned alpha during training (mean over seeds; band: min-max)"
        )
        written.append(plots.save_png(figure, out_dir / "alpha.png"))
    if "gap" in kinds:
        for dataset in sorted({g.dataset for g in groups}):
            mine = [g for g in groups if g.dataset == dataset]
            modalities = sorted({m for g in mine for m in g.modalities})
            scores, distances = {}, {}
            for group in mine:
                values = {"fused": group.stat(f"final_{split}_{metric}", warn).mean}
                values.update({m: group.stat(f"final_{split}_{metric}_{m}", warn).mean for m in modalities})
                scores[group.label] = values
                distances[group.label] = group.stat(f"final_{split}_modality_gap", warn).mean
            figure = plots.gap_figure(
                scores,
                distances,
                title=f"{dataset}: per-modality {split} {METRIC_NAMES[metric]} and modality gap",
                metric=METRIC_NAMES[metric],
            )
            written.append(plots.save_png(figure, out_dir / f"gap-{_safe_file_part(dataset)}.png"))
    if "curves" in kinds:
        for dataset in sorted({g.dataset for g in groups}):
            panels = {}
            for group in (g for g in groups if g.dataset == dataset):
                keys = [f"val_{metric}"] + [f"val_{metric}_{m}" for m in group.modalities]
                curves = {}
                for key in keys:
                    series = [s for s in (tracker.metric_history(r.run_id, key) for r in group.runs) if s]
                    if series:
                        curves["fused" if key == f"val_{metric}" else key.rsplit("_", 1)[-1]] = _mean_trajectory(series)
                panels[group.label] = curves
            figure = plots.curves_figure(
                panels,
                title=f"{dataset}: validation {METRIC_NAMES[metric]} per epoch (mean over seeds)",
                metric=METRIC_NAMES[metric],
            )
            written.append(plots.save_png(figure, out_dir / f"curves-{_safe_file_part(dataset)}.png"))
    return written
