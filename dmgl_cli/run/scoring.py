"""``dmgl eval``, ``dmgl register`` and ``dmgl runs reconcile``: score a recorded checkpoint again, put a seed's
logged model in the Model Registry, mark runs whose process died KILLED."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dmgl_cli.data.loader import eval_loader
from dmgl_cli.errors import DmglError
from dmgl_cli.evaluation import evaluate
from dmgl_cli.recorded import best_seed_on_validation, load_recorded_model

if TYPE_CHECKING:
    from dmgl_cli.tracking import RunRecord, Tracker


@dataclass
class EvalOutcome:
    """One seed run's checkpoint scored again on a split, beside what training recorded for it."""

    run_id: str
    seed: int
    checkpoint: str
    split: str
    metrics: dict[str, float]
    logged: dict[str, float]  # what training recorded for the same checkpoint and split

    @property
    def max_abs_diff(self) -> float | None:
        shared = set(self.metrics) & set(self.logged)
        return max((abs(self.metrics[k] - self.logged[k]) for k in shared), default=None)


def evaluate_run(run_id: str, *, tracker: Tracker, checkpoint: str = "best", split: str = "test") -> list[EvalOutcome]:
    """Re-score a seed run's checkpoint (or every seed of a parent run) and record the result on the run."""
    if checkpoint not in ("best", "last"):
        raise DmglError(f"--checkpoint must be best or last, got {checkpoint!r}")
    if split not in ("val", "test"):
        raise DmglError(f"--split must be val or test, got {split!r}")
    run = tracker.find_run(run_id)  # an id, a unique prefix or a name
    run_id = run.run_id
    role = run.role
    if role == "parent":
        runs = tracker.children(run_id)
    elif role == "seed":
        runs = [run]
    else:
        raise DmglError(f"run {run_id} was not made by `dmgl train` (no dmgl.role tag)")
    return [_evaluate_seed(tracker, r, checkpoint, split) for r in runs]


def _evaluate_seed(tracker: Tracker, run: RunRecord, checkpoint: str, split: str) -> EvalOutcome:
    run_id = run.run_id
    recorded = load_recorded_model(tracker, run, checkpoint)
    config, state = recorded.config, recorded.state
    loader = eval_loader(recorded.dataset, config, split)
    metrics = evaluate(recorded.model, recorded.method, config, loader, recorded.device, split)
    if checkpoint == "best":
        logged = {k: v for k, v in state.get("metrics", {}).items() if k.startswith(f"{split}_")}
    else:
        history = state.get("history") or [{}]
        logged = {k: v for k, v in history[-1].items() if k.startswith(f"{split}_")}
    tracker.log_metrics(run_id, {f"eval_{checkpoint}_{k}": v for k, v in metrics.items()})
    tracker.log_text(
        run_id,
        json.dumps({"metrics": metrics, "logged": logged}, indent=2, sort_keys=True),
        f"eval/{checkpoint}-{split}.json",
    )
    return EvalOutcome(
        run_id=run_id, seed=config.train.seed, checkpoint=checkpoint, split=split, metrics=metrics, logged=logged
    )


@dataclass
class Registration:
    """A model version put in the Model Registry, and which seed run it came from (and why)."""

    name: str  # the registered model
    version: str
    model_uri: str  # models:/<model id> of the logged model registered
    run_id: str  # the seed run whose model it is
    seed: int
    parent_id: str | None = None  # given a parent run: the parent the seed was chosen from
    chosen_by: str = ""  # given a parent run: how the seed was chosen (validation only)

    @property
    def registry_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register(run_id: str, name: str, *, tracker: Tracker) -> Registration:
    """Put a seed run's logged model (its best checkpoint) in the Model Registry as a new version of ``name``.

    Given a parent run, the seed with the best validation score (``final_val_<train.select_metric>``; never test;
    a tie goes to the lower seed) is registered, and :attr:`Registration.chosen_by` says which and why."""
    if not name or not name.strip():
        raise DmglError("--name must name the registered model")
    run = tracker.find_run(run_id)  # an id, a unique prefix or a name
    run_id = run.run_id
    parent_id, chosen_by = None, ""
    if run.role == "seed":
        chosen = run
    elif run.role == "parent":
        parent_id = run_id
        metric = run.params.get("train.select_metric", "acc")
        key = f"final_val_{metric}"
        chosen, scored = best_seed_on_validation(tracker, run)
        others = ", ".join(f"seed {c.tags.get('dmgl.seed')} {c.metrics[key]:.4f}" for c in scored if c is not chosen)
        chosen_by = f"best validation {metric} of {len(scored)} finished seed(s): {chosen.metrics[key]:.4f}" + (
            f" (others: {others})" if others else ""
        )
    else:
        raise DmglError(f"run {run_id} was not made by `dmgl train` (no dmgl.role tag); give a seed or parent run")
    seed = int(chosen.tags.get("dmgl.seed", chosen.params.get("train.seed", 0)))
    tags = {
        "dmgl.run_id": chosen.run_id,
        "dmgl.seed": str(seed),
        **{k: chosen.tags[k] for k in ("dmgl.dataset", "dmgl.method", "dmgl.strategy") if k in chosen.tags},
    }
    if parent_id:
        tags["dmgl.parent_run_id"] = parent_id
        tags["dmgl.chosen_by"] = chosen_by
    description = f"Best checkpoint of run {chosen.name} ({chosen.run_id})" + (f"; {chosen_by}" if chosen_by else "")
    registered, version, uri = tracker.register_model(chosen.run_id, name, tags=tags, description=description)
    return Registration(
        name=registered,
        version=version,
        model_uri=uri,
        run_id=chosen.run_id,
        seed=seed,
        parent_id=parent_id,
        chosen_by=chosen_by,
    )


def reconcile(*, tracker: Tracker, experiment: str | None = None, older_than_minutes: float = 60.0) -> list[RunRecord]:
    """Mark stale RUNNING runs (their process died: SIGKILL, OOM, a lost machine) KILLED; returns them."""
    if experiment:
        experiment_ids = [tracker.experiment_id(experiment, create=False)]
    else:
        experiment_ids = list(tracker.experiments())
    stale = tracker.stale_runs(experiment_ids, older_than_minutes)
    for run in stale:
        tracker.end_run(run.run_id, "KILLED")
    return stale
