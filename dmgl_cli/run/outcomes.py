"""What training a configuration returns, and the progress callbacks it takes (no torch, no MLflow)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# progress(seed, epoch, total_epochs, metrics), after each epoch
Progress = Callable[[int, int, int, dict[str, float]], None]
# step_progress(seed, epoch, batch, batches), after each training batch (a progress bar)
StepProgress = Callable[[int, int, int, int], None]
FINAL_PREFIX = "final_"  # a run's final metrics (a seed's at its best epoch; a parent's: their mean, and `_std`)


@dataclass
class SeedOutcome:
    """One seed run: its seed, run id, final metrics (at its best epoch on validation) and per-epoch metrics
    (epoch 1..T; the parent's curves are their mean and std over seeds)."""

    seed: int
    run_id: str
    final: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainOutcome:
    """One ``dmgl train``: its parent run, experiment, seeds and (once every seed finished) mean/std summary."""

    parent_run_id: str
    experiment: str
    experiment_id: str
    seeds: list[SeedOutcome] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
