"""Train a configuration over seeds: one MLflow parent run + one child run per seed (``dmgl train``).

Each child records its resolved config (``config.yaml``), so resume and eval rebuild exactly the run that was
recorded, whatever the recipe says today. Runs are named METHOD-STRATEGY with the strategy's setting
(``concat-constant-0.5``, ``concat-stepwise-0.95``, ``concat-lb``), seeds ``...-seed0``; params are the settings that
apply (``config.recorded_params``); each run records the prepared dataset as its input, each seed its best checkpoint
as a logged model (which :func:`dmgl_cli.run.scoring.register` puts in the Model Registry), and the parent its
summary (:mod:`dmgl_cli.run.summary`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from dmgl_cli import __version__
from dmgl_cli.catalogue import METHODS
from dmgl_cli.checkpoint import load_model_state
from dmgl_cli.config import Config, recorded_params, with_seed
from dmgl_cli.data.loader import ArraySplit, eval_loader
from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.data.transforms import model_input_specs
from dmgl_cli.device import device_in_use
from dmgl_cli.distributed import SINGLE_PROCESS, DistributedContext
from dmgl_cli.errors import DmglError, Interrupted, signals_handled
from dmgl_cli.imbalance import (
    cost_metrics,
    peak_memory_mib,
    reset_peak_memory,
    score_coalitions,
    shapley_metrics_of,
)
from dmgl_cli.models import check_tokenisation
from dmgl_cli.paths import safe_name
from dmgl_cli.run.outcomes import FINAL_PREFIX, Progress, SeedOutcome, StepProgress, TrainOutcome
from dmgl_cli.run.summary import finish_parent
from dmgl_cli.run_names import default_run_name, seed_run_name
from dmgl_cli.tracking import DatasetRecord, RunRecorder, Tracker
from dmgl_cli.train import Trainer, TrainResult
from dmgl_cli.train_setup import check_against_dataset

logger = logging.getLogger("dmgl")


@contextmanager
def graceful_stop(holder: dict[str, Trainer]) -> Iterator[None]:
    """SIGTERM and Ctrl-C ask the trainer to stop after the current optimiser step and checkpoint that exact
    position; a second request (or one before training started) stops at once, leaving the previous checkpoint."""

    def handler(signum, frame):
        trainer = holder.get("trainer")
        if trainer is None or trainer.stop_requested:
            raise Interrupted()
        trainer.stop_requested = True

    with signals_handled(handler, (signal.SIGTERM, signal.SIGINT)):
        yield


def _tags(config: Config, dataset: PreparedDataset, role: str) -> dict[str, str]:
    return {
        "dmgl.role": role,
        "dmgl.dataset": config.dataset,
        "dmgl.dataset_checksum": dataset.checksum,
        "dmgl.method": config.method.name,
        # Where the per-modality scores come from: head-split (Concat), the method's own outputs, or probes.
        "dmgl.per_modality_scores": METHODS[config.method.name].per_modality_source,
        "dmgl.strategy": config.strategy.name,
        "dmgl.recipe": config.recipe,
        "dmgl.version": __version__,
        # the device it trains on; the param train.device keeps the setting (auto), which resume resolves again
        "dmgl.device": device_in_use(config.train.device),
    }


def dataset_record(config: Config, dataset: PreparedDataset) -> DatasetRecord:
    return DatasetRecord(
        name=config.dataset,
        folder=dataset.path,
        checksum=dataset.checksum,
        modalities=dataset.modalities,
        profile={
            "classes": dataset.num_classes,
            "modalities": {m: spec["kind"] for m, spec in dataset.modalities.items()},
            "splits": dataset.manifest.get("splits", {}),
            "checksum": dataset.checksum,
        },
    )


def _alpha_csv(history: list[dict[str, float]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["epoch", "epoch_fraction", "alpha", "alpha_hypergradient"])
    total = len(history)
    for epoch, metrics in enumerate(history, start=1):
        writer.writerow([epoch, epoch / total, metrics["alpha"], metrics.get("alpha_hypergradient", "")])
    return out.getvalue()


def _finish_seed(tracker: Tracker, run_id: str, result: TrainResult, config: Config, dataset: PreparedDataset) -> None:
    seed = config.train.seed
    if all("alpha" in h for h in result.history):  # a run whose alpha is 0 throughout records none
        tracker.log_text(run_id, _alpha_csv(result.history), "alpha.csv")
        from dmgl_cli.plots import alpha_figure, close  # matplotlib at the end of a run, not before its first step

        figure = alpha_figure({f"seed {seed}": [h["alpha"] for h in result.history]})
        tracker.log_figure(run_id, figure, "alpha.png")
        close(figure)
    tracker.log_text(run_id, json.dumps(result.final, indent=2, sort_keys=True), "final_metrics.json")
    try:
        model_id = tracker.log_model(
            run_id,
            config_yaml=config.to_yaml(),
            modalities=dataset.modalities,
            classes=dataset.classes,
            step=result.best_epoch,
            tags={"dmgl.dataset": config.dataset, "dmgl.seed": str(seed), "dmgl.best_epoch": str(result.best_epoch)},
        )
    except DmglError as exc:  # the seed's results stand; only `dmgl register` needs the model
        logger.warning("%s; the seed's best checkpoint is still checkpoints/best.pt", exc)
        model_id = None
    # The scores at the best epoch, linked to the model that made them and the data they were measured on.
    tracker.log_metrics(
        run_id,
        {FINAL_PREFIX + k: v for k, v in result.final.items()},
        step=result.best_epoch,
        model_id=model_id,
        dataset=dataset_record(config, dataset),
    )
    tracker.end_run(run_id, "FINISHED")


def _imbalance_and_cost(tracker: Tracker, run_id: str, trainer: Trainer, result: TrainResult) -> dict[str, float]:
    """A finished seed's Shapley values of test accuracy, imbalance degree and cost (:mod:`dmgl_cli.imbalance`), on
    the best checkpoint's weights over the whole test split; they select nothing, only report.

    The coalitions' values are those the trainer scored with the best epoch's test scores (``result.test_coalitions``:
    the same weights, method state and batches as the reported ``test_acc``, so ``v(all)`` is that figure). Where it
    did not (data-parallel, ``train.compile``, a method whose scoring changes its state, a run resumed from a
    checkpoint that predates them), the weights go into a fresh, uncompiled model (as ``dmgl eval`` scores a
    checkpoint), driven by the trainer's method in its end-of-training state, and one pass scores them. The FLOPs are
    counted on that fresh model: over the first batch of that pass, or else on the test split's first sample alone.
    The peak memory is read first, so that it is training's and evaluation's. Tags the run with where that peak was
    read (``dmgl.peak_memory``)."""
    config, dataset, device = trainer.config, trainer.dataset, trainer.device
    peak, peak_source = peak_memory_mib(device)
    try:
        best = tracker.load_checkpoint(run_id, "best")
    except DmglError as exc:
        logger.warning("%s; the seed records no Shapley values or cost", exc)
        return {}
    model = trainer.method.build_model(model_input_specs(dataset.modalities, config), dataset.num_classes)
    load_model_state(model, best["model"], f"run {run_id} checkpoints/best.pt")
    model = model.to(device)
    modalities = sorted(dataset.modalities)
    if result.test_coalitions is not None:
        values = result.test_coalitions
        test = trainer.splits.test
        loader = eval_loader(dataset, config, ArraySplit(test.arrays, test.indices[:1]))  # FLOPs: one sample
        flops = None
    else:
        # the whole test split in its order: the trainer's test loader holds only this rank's share (data-parallel)
        loader = eval_loader(dataset, config, trainer.splits.test, num_workers=config.data.num_workers)
        scores = score_coalitions(model, trainer.method, config, loader, device, modalities, count_flops=True)
        values, flops = scores.values, scores.flops_per_sample
    metrics = shapley_metrics_of(values, modalities)
    metrics.update(cost_metrics(model, trainer.method, config, loader, device, result.history, flops))
    metrics["peak_memory_mib"] = peak
    tracker.set_tags(run_id, {"dmgl.peak_memory": peak_source})
    return metrics


def train_seed(
    tracker: Tracker,
    run_id: str,
    config: Config,
    dataset: PreparedDataset,
    progress: Progress | None,
    resume_state: dict[str, Any] | None = None,
    step_progress: StepProgress | None = None,
    distributed: DistributedContext = SINGLE_PROCESS,
) -> SeedOutcome:
    """Train one seed in its recorded run ``run_id`` (from ``resume_state``, a ``last`` checkpoint, if given), then
    record its final metrics, alpha, model and imbalance measures and end the run."""
    seed = config.train.seed
    recorder = RunRecorder(tracker, run_id, tracker.logged_steps(run_id) if resume_state else ())
    epoch_progress = (lambda e, t, m: progress(seed, e, t, m)) if progress else None
    batch_progress = (lambda e, b, n: step_progress(seed, e, b, n)) if step_progress else None
    holder: dict[str, Trainer] = {}
    with tracker.run(run_id), graceful_stop(holder):
        # data-parallel: the other ranks train the same seed from the same state (:func:`follow`)
        distributed.broadcast_object(
            {"config": config.to_yaml(), "state": resume_state, "dataset_checksum": dataset.checksum}
        )
        trainer = holder["trainer"] = Trainer(
            config, dataset, seed, recorder, epoch_progress, batch_progress, distributed=distributed
        )
        if resume_state is not None:
            trainer.load_state_dict(resume_state, f"run {run_id} checkpoints/last.pt")
        reset_peak_memory(trainer.device)  # this seed's peak, not an earlier seed's in the same process
        result = trainer.fit()
        result.final.update(_imbalance_and_cost(tracker, run_id, trainer, result))
    _finish_seed(tracker, run_id, result, config, dataset)
    return SeedOutcome(seed=seed, run_id=run_id, final=result.final, history=result.history)


def start_seed_run(
    tracker: Tracker,
    experiment_id: str,
    parent_id: str,
    config: Config,
    dataset: PreparedDataset,
    run_name: str,
    extra_tags: dict[str, str] | None = None,
    status: str = "RUNNING",
) -> str:
    """Record a seed's child run under ``parent_id``: its tags, params, ``config.yaml`` and dataset; its run id."""
    seed = config.train.seed
    run_id = tracker.start_run(
        experiment_id,
        seed_run_name(run_name, seed),
        {**_tags(config, dataset, "seed"), "dmgl.seed": str(seed), **(extra_tags or {})},
        parent_id=parent_id,
        status=status,
    )
    tracker.log_params(run_id, recorded_params(config))
    tracker.log_text(run_id, config.to_yaml(), "config.yaml")
    tracker.log_dataset(run_id, dataset_record(config, dataset))
    return run_id


def train(
    config: Config,
    seeds: list[int],
    *,
    tracker: Tracker,
    progress: Progress | None = None,
    step_progress: StepProgress | None = None,
    run_name: str | None = None,
    on_parent: Callable[[str], None] | None = None,
    sweep_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    distributed: DistributedContext = SINGLE_PROCESS,
) -> TrainOutcome:
    """Train ``config`` once per seed under one parent run; returns run ids and the mean/std summary.

    ``sweep_run_id`` nests the parent run under a ``dmgl sweep`` run (``mlflow.parentRunId``); ``extra_tags`` go on
    the parent and on every seed run (e.g. ``dmgl.sweep``, ``dmgl.trial``). Data-parallel (``distributed``), this
    runs on rank 0, the only rank that records anything; the other ranks run :func:`follow`."""
    if not seeds:
        raise DmglError("at least one seed is needed")
    run_name = safe_name(run_name or default_run_name(config), "run name")
    dataset = open_checked_dataset(config)
    experiment = config.experiment or config.dataset
    experiment_id = tracker.experiment_id(experiment)
    tracker.warn_stale([experiment_id])
    parent_id = tracker.start_run(
        experiment_id,
        run_name,
        {**_tags(config, dataset, "parent"), "dmgl.seeds": ",".join(map(str, seeds)), **(extra_tags or {})},
        parent_id=sweep_run_id,
    )
    outcomes = []
    with tracker.run(parent_id):  # from its creation on: a stop while its params are written ends it KILLED
        if on_parent:
            on_parent(parent_id)
        tracker.log_params(parent_id, {**recorded_params(config), "seeds": ",".join(map(str, seeds))})
        tracker.log_text(parent_id, config.to_yaml(), "config.yaml")
        tracker.log_dataset(parent_id, dataset_record(config, dataset))
        # A tracking server may be away when a later seed starts: its run is made now, SCHEDULED (journaled stores).
        ahead = {
            seed: start_seed_run(
                tracker, experiment_id, parent_id, with_seed(config, seed), dataset, run_name, extra_tags, "SCHEDULED"
            )
            for seed in (seeds if tracker.journaled else [])
        }
        for seed in seeds:
            seeded = with_seed(config, seed)
            if seed in ahead:
                run_id = ahead[seed]
                tracker.mark_running(run_id)
            else:
                run_id = start_seed_run(tracker, experiment_id, parent_id, seeded, dataset, run_name, extra_tags)
            outcomes.append(
                train_seed(
                    tracker, run_id, seeded, dataset, progress, step_progress=step_progress, distributed=distributed
                )
            )
    distributed.release_followers()  # no more seeds: the other ranks stop following
    summary = finish_parent(tracker, parent_id, outcomes, config, experiment_id)
    return TrainOutcome(
        parent_run_id=parent_id, experiment=experiment, experiment_id=experiment_id, seeds=outcomes, summary=summary
    )


def open_checked_dataset(config: Config) -> PreparedDataset:
    """The run's prepared dataset, once it is known to fit ``config``: refused before any run is recorded (or any
    data-parallel process started) when it is missing, when settings do not fit it, or when the text encoder does not
    read its tokens."""
    dataset = open_dataset(config.dataset)
    check_against_dataset(config, dataset)
    check_tokenisation(config, dataset.manifest)
    return dataset
