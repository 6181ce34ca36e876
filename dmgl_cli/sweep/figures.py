"""Optuna's own views of a finished study, drawn headless for the sweep run's artifacts.

Per strategy that has tuned settings (``--tune``) and at least :data:`MIN_TRIALS` complete trials: the
hyperparameter importances (Optuna's default evaluator, fANOVA over the complete trials' validation objective) and
the parallel-coordinate plot (each trial a line across its settings and objective). A study's parameters are named
``NAME@STRATEGY`` (each strategy tunes its own range), so each strategy's trials are copied into an in-memory study
whose parameters are plain ``NAME``: that is the space the figures are about. Strategies without tuned settings
have no space to draw; the summary table compares them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.distributions import BaseDistribution  # noqa: E402
from optuna.trial import FrozenTrial, TrialState, create_trial  # noqa: E402

from dmgl_cli.sweep.storage import quiet  # noqa: E402

MIN_TRIALS = 3  # fewer complete trials than this say nothing about which setting matters


@dataclass
class StudyFigure:
    artifact_file: str  # where it goes in the sweep run: optuna/<strategy>-importance.png ...
    figure: object  # a matplotlib Figure


def _strategy_of(trial: FrozenTrial) -> str:
    return str(trial.params.get("strategy") or trial.system_attrs.get("fixed_params", {}).get("strategy", ""))


def strategy_study(
    trials: Sequence[FrozenTrial], strategy: str, direction: Literal["maximize", "minimize"] = "maximize"
) -> optuna.Study | None:
    """The complete trials of ``strategy`` in an in-memory study over their tuned settings (``lr@lb`` -> ``lr``),
    or None when they have no tuned setting or are fewer than :data:`MIN_TRIALS`."""
    copied = []
    for trial in trials:
        if trial.state != TrialState.COMPLETE or trial.value is None or _strategy_of(trial) != strategy:
            continue
        params: dict[str, float] = {}
        distributions: dict[str, BaseDistribution] = {}
        for key, value in trial.params.items():
            if "@" in key:
                name = key.split("@")[0]
                params[name] = value
                distributions[name] = trial.distributions[key]
        if params:
            copied.append(create_trial(params=params, distributions=distributions, value=trial.value))
    if len(copied) < MIN_TRIALS:
        return None
    with quiet():
        study = optuna.create_study(direction=direction, study_name=f"{strategy} (copy)")
    study.add_trials(copied)
    return study


def study_figures(
    trials: Sequence[FrozenTrial], metric: str, direction: Literal["maximize", "minimize"] = "maximize"
) -> list[StudyFigure]:
    """The importance and parallel-coordinate figures of every strategy with a tuned space (see module doc)."""
    from optuna.visualization.matplotlib import plot_parallel_coordinate, plot_param_importances

    figures: list[StudyFigure] = []
    strategies = sorted({_strategy_of(t) for t in trials if _strategy_of(t)})
    for strategy in strategies:
        study = strategy_study(trials, strategy, direction)
        if study is None:
            continue
        safe = strategy.replace(":", "-")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
            names = list(study.trials[0].params)
            if len(names) > 1:  # one setting is all of the importance: nothing to draw
                axes = plot_param_importances(study)
                axes.set_title(f"{strategy}: importance of the tuned settings for val {metric} (fANOVA)", loc="left")
                legend = axes.get_legend()
                if legend is not None:
                    legend.remove()  # one objective: its legend names nothing
                figures.append(StudyFigure(f"optuna/{safe}-importance.png", axes.figure))
            axes = plot_parallel_coordinate(study, target_name=f"val {metric}")
            axes.set_title(f"{strategy}: tuned settings of {len(study.trials)} trials against val {metric}", loc="left")
            figures.append(StudyFigure(f"optuna/{safe}-parallel-coordinate.png", axes.figure))
    for item in figures:
        item.figure.set_size_inches(9, 5)  # type: ignore[attr-defined]  # room for the titles and long names
    return figures


def close(figures: Sequence[StudyFigure]) -> None:
    for item in figures:
        plt.close(item.figure)  # type: ignore[arg-type]
