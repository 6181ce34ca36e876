"""Continue an interrupted ``dmgl train`` in the same MLflow runs (``dmgl train --resume``): a seed from its last
checkpoint, a parent's every seed; each rebuilt from its recorded ``config.yaml``."""

from __future__ import annotations

import json

from dmgl_cli.config import config_from_yaml, with_seed
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.device import device_in_use
from dmgl_cli.distributed import SINGLE_PROCESS, DistributedContext
from dmgl_cli.errors import DmglError
from dmgl_cli.recorded import check_dataset_unchanged
from dmgl_cli.run.outcomes import FINAL_PREFIX, Progress, SeedOutcome, StepProgress, TrainOutcome
from dmgl_cli.run.summary import finish_parent
from dmgl_cli.run.training import start_seed_run, train_seed
from dmgl_cli.tracking import RunRecord, Tracker


def _history(tracker: Tracker, run: RunRecord) -> list[dict[str, float]]:
    """A finished seed's per-epoch metrics, read back from its run (epoch 1..its last), for the parent's curves."""
    by_epoch: dict[int, dict[str, float]] = {}
    for key in run.metrics:
        if not key.startswith(FINAL_PREFIX):
            for step, value in tracker.metric_history(run.run_id, key):
                by_epoch.setdefault(step, {})[key] = value
    return [by_epoch.get(epoch, {}) for epoch in range(1, max(by_epoch, default=0) + 1)]


def _resume_seed(
    tracker: Tracker,
    run: RunRecord,
    progress: Progress | None,
    step_progress: StepProgress | None = None,
    distributed: DistributedContext = SINGLE_PROCESS,
) -> SeedOutcome:
    run_id = run.run_id
    config = config_from_yaml(tracker.read_text(run_id, "config.yaml"))
    dataset = open_dataset(config.dataset)
    check_dataset_unchanged(config, dataset, run.tags)
    if run.status == "FINISHED":
        final = json.loads(tracker.read_text(run_id, "final_metrics.json"))
        return SeedOutcome(seed=config.train.seed, run_id=run_id, final=final, history=_history(tracker, run))
    try:
        state = tracker.load_checkpoint(run_id, "last")
    except DmglError as exc:
        if "has no checkpoint" not in str(exc):
            raise
        state = None  # stopped before its first epoch ended: train from the start, in the same run
    tracker.mark_running(run_id)
    tracker.set_tags(run_id, {"dmgl.device": device_in_use(config.train.device)})  # resumed here, maybe elsewhere
    return train_seed(
        tracker,
        run_id,
        config,
        dataset,
        progress,
        resume_state=state,
        step_progress=step_progress,
        distributed=distributed,
    )


def resume(
    run_id: str,
    *,
    tracker: Tracker,
    progress: Progress | None = None,
    step_progress: StepProgress | None = None,
    distributed: DistributedContext = SINGLE_PROCESS,
) -> TrainOutcome:
    """Continue an interrupted ``dmgl train`` in the same MLflow runs: a seed run from its last checkpoint, or —
    given the parent run — every seed it asked for (finished seeds are kept, unfinished ones resumed, seeds that
    never started are started). The parent gets its mean/std once all its seeds are finished. The checkpoint does
    not depend on the number of processes: a run started with ``--nproc 2`` resumes with any other. ``run_id`` may
    be a unique prefix or name (:meth:`Tracker.find_run`)."""
    run = tracker.find_run(run_id)
    run_id = run.run_id
    role = run.role
    if role not in ("parent", "seed"):
        raise DmglError(f"run {run_id} was not made by `dmgl train` (no dmgl.role tag); nothing to resume")
    parent_id = run_id if role == "parent" else run.tags["mlflow.parentRunId"]
    parent = tracker.get_run(parent_id)
    tracker.warn_stale([parent.experiment_id])
    parent_config = config_from_yaml(tracker.read_text(parent_id, "config.yaml"))
    wanted = [int(s) for s in parent.tags.get("dmgl.seeds", "").split(",") if s]
    tracker.mark_running(parent_id)
    outcomes: dict[int, SeedOutcome] = {}
    with tracker.run(parent_id):
        children = {int(c.tags["dmgl.seed"]): c for c in tracker.children(parent_id)}
        for seed in wanted:
            child = children.get(seed)
            if role == "seed" and child is not None and child.run_id != run_id and child.status != "FINISHED":
                continue  # only the seed run that was named is resumed
            if child is not None:
                outcomes[seed] = _resume_seed(tracker, child, progress, step_progress, distributed)
            elif role == "parent":
                dataset = open_dataset(parent_config.dataset)
                seeded = with_seed(parent_config, seed)
                child_id = start_seed_run(tracker, parent.experiment_id, parent_id, seeded, dataset, parent.name)
                outcomes[seed] = train_seed(
                    tracker, child_id, seeded, dataset, progress, step_progress=step_progress, distributed=distributed
                )
    distributed.release_followers()  # no more seeds: the other ranks stop following
    ordered = [outcomes[s] for s in sorted(outcomes)]
    experiment = tracker.experiment_name(parent.experiment_id)
    if all(s in outcomes for s in wanted):
        summary = finish_parent(tracker, parent_id, ordered, parent_config, parent.experiment_id)
    else:
        summary = {}
        tracker.end_run(parent_id, "KILLED")  # other seeds are unfinished: `dmgl train --resume PARENT` ends them
    return TrainOutcome(
        parent_run_id=parent_id,
        experiment=experiment,
        experiment_id=parent.experiment_id,
        seeds=ordered,
        summary=summary,
    )
