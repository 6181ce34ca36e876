"""What ``dmgl train`` / ``dmgl train --resume`` / ``dmgl eval`` do, as importable functions.

One ``dmgl train`` = one MLflow parent run + one child run per seed. Each child records its resolved config
(``config.yaml``), so resume and eval rebuild exactly the run that was recorded, whatever the recipe says today.
Every function takes the command's :class:`~dmgl_cli.tracking.Tracker` and works in terms of
:class:`~dmgl_cli.tracking.RunRecord`.

Runs are named METHOD-STRATEGY with the strategy's setting (``concat-constant-0.5``, ``concat-stepwise-0.95``,
``concat-lb``), seeds ``...-seed0``; params are the settings that apply (``config.recorded_params``); each run
records the prepared dataset as its input, each seed its best checkpoint as a logged model (which :func:`register`
puts in the Model Registry), and the parent a markdown description: the mean ± std table and the alpha plot.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dmgl_cli import __version__
from dmgl_cli.checkpoint import load_model_state
from dmgl_cli.config import Config, config_from_yaml, recorded_params, with_seed
from dmgl_cli.data.loader import eval_loader
from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.data.transforms import model_input_specs
from dmgl_cli.device import device_in_use, pick_device
from dmgl_cli.distributed import SINGLE_PROCESS, DistributedContext
from dmgl_cli.errors import DmglError, Interrupted, Stopped
from dmgl_cli.imbalance import cost_metrics, peak_memory_mib, reset_peak_memory, shapley_metrics
from dmgl_cli.methods import METHODS, build_method
from dmgl_cli.metrics import mean_std, summarise_over_seeds
from dmgl_cli.models import check_tokenisation
from dmgl_cli.paths import safe_name
from dmgl_cli.plots import alpha_figure, close
from dmgl_cli.run_names import default_run_name, seed_run_name
from dmgl_cli.strategies import spec_from_params
from dmgl_cli.tables import Cell, Row, Table, render_markdown
from dmgl_cli.tracking import DatasetRecord, RunRecord, RunRecorder, Tracker
from dmgl_cli.train import Trainer, TrainResult, check_against_dataset, evaluate

if TYPE_CHECKING:
    import torch

    from dmgl_cli.methods.base import Method
    from dmgl_cli.models import MultimodalModel

# progress(seed, epoch, total_epochs, metrics), after each epoch
Progress = Callable[[int, int, int, dict[str, float]], None]
# step_progress(seed, epoch, batch, batches), after each training batch (a progress bar)
StepProgress = Callable[[int, int, int, int], None]
FINAL_PREFIX = "final_"
logger = logging.getLogger("dmgl")


__all__ = [  # Stopped: raised by progress callbacks
    "Stopped",
    "train",
    "resume",
    "follow",
    "evaluate_run",
    "reconcile",
    "register",
    "Registration",
    "default_run_name",
]


@contextmanager
def _graceful_stop(holder: dict[str, Trainer]) -> Iterator[None]:
    """SIGTERM and Ctrl-C ask the trainer to stop after the current optimiser step and checkpoint that exact
    position; a second request (or one before training started) stops at once, leaving the previous checkpoint."""

    def handler(signum, frame):
        trainer = holder.get("trainer")
        if trainer is None or trainer.stop_requested:
            raise Interrupted()
        trainer.stop_requested = True

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class SeedOutcome:
    seed: int
    run_id: str
    final: dict[str, float]


@dataclass
class TrainOutcome:
    parent_run_id: str
    experiment: str
    experiment_id: str
    seeds: list[SeedOutcome] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)


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


def _dataset_record(config: Config, dataset: PreparedDataset) -> DatasetRecord:
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
        dataset=_dataset_record(config, dataset),
    )
    tracker.end_run(run_id, "FINISHED")


def _imbalance_and_cost(tracker: Tracker, run_id: str, trainer: Trainer, result: TrainResult) -> dict[str, float]:
    """A finished seed's Shapley values of test accuracy, imbalance degree and cost (:mod:`dmgl_cli.imbalance`),
    measured once on the best checkpoint's weights over the whole test split; they select nothing, only report.
    The weights go into a fresh, uncompiled model (as ``dmgl eval`` scores a checkpoint) driven by the trainer's method
    in its end-of-training state; the peak memory is read first, so that it is training's and evaluation's. Tags
    the run with where that peak was read (``dmgl.peak_memory``)."""
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
    # the whole test split in its order: the trainer's own test loader holds only this rank's share when data-parallel
    loader = eval_loader(dataset, config, trainer.splits.test, num_workers=config.data.num_workers)
    metrics = shapley_metrics(model, trainer.method, config, loader, device, sorted(dataset.modalities))
    metrics.update(cost_metrics(model, trainer.method, config, loader, device, result.history))
    metrics["peak_memory_mib"] = peak
    tracker.set_tags(run_id, {"dmgl.peak_memory": peak_source})
    return metrics


def _train_seed(
    tracker: Tracker,
    run_id: str,
    config: Config,
    dataset: PreparedDataset,
    progress: Progress | None,
    resume_state: dict[str, Any] | None = None,
    step_progress: StepProgress | None = None,
    distributed: DistributedContext = SINGLE_PROCESS,
) -> SeedOutcome:
    seed = config.train.seed
    recorder = RunRecorder(tracker, run_id, tracker.logged_steps(run_id) if resume_state else ())
    epoch_progress = (lambda e, t, m: progress(seed, e, t, m)) if progress else None
    batch_progress = (lambda e, b, n: step_progress(seed, e, b, n)) if step_progress else None
    holder: dict[str, Trainer] = {}
    with tracker.run(run_id), _graceful_stop(holder):
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
    return SeedOutcome(seed=seed, run_id=run_id, final=result.final)


_SCORES = ("acc", "map", "f1")
DESCRIPTION_LIMIT = 8000  # the longest tag value MLflow stores; many seeds' rows leave the table at its mean row


def _description(config: Config, experiment_id: str, outcomes: list[SeedOutcome], alpha_png: str | None) -> str:
    """The parent run's markdown description: test scores at each seed's validation-selected epoch, mean ± std over
    the seeds and per seed (each linked to its run), and the seeds' alpha plot (``alpha_png``, its link)."""
    split, finals = "test", [o.final for o in outcomes]
    prefix = f"{split}_acc_"
    modalities = sorted(set.intersection(*({k[len(prefix) :] for k in f if k.startswith(prefix)} for f in finals)))
    keys = [f"{split}_{m}" for m in _SCORES] + [f"{prefix}{m}" for m in modalities]
    columns = [m.upper() for m in _SCORES] + [f"ACC {m}" for m in modalities]
    if len(modalities) > 1:
        keys.append(f"{split}_gap_acc")
        columns.append("Gap ACC")

    def cell(values: list[float]) -> Cell:
        return Cell(*mean_std(values), len(values)) if values else Cell()

    seeds = f"{len(outcomes)} seed{'s' if len(outcomes) != 1 else ''}"
    mean_row = Row([f"mean ± std ({seeds})"], [cell([f[k] for f in finals if k in f]) for k in keys])
    seed_rows = [
        Row(
            [f"[seed {o.seed}](#/experiments/{experiment_id}/runs/{o.run_id})"],
            [cell([o.final[k]]) if k in o.final else Cell() for k in keys],
        )
        for o in outcomes
    ]
    spec = spec_from_params({k: str(v) for k, v in recorded_params(config).items()})
    strategy = spec.label if spec is not None else config.strategy.name
    plot = (
        f"\n**alpha per epoch**, one line per seed:\n\n![alpha per epoch]({alpha_png})\n\n"
        "(`alpha.png` in this run's artifacts; the per-epoch values are each seed's `alpha/value` metric.)\n"
        if alpha_png is not None
        else "\nalpha is 0 throughout: no matching loss was computed.\n"
    )
    note = (
        f"each seed's scores are at its best epoch on validation {config.train.select_metric} (never chosen on test); "
        "mean ± std is the sample std over seeds; Gap ACC = max − min of the per-modality ACC"
    )
    imbalance = _imbalance_table(config, strategy, finals, cell)
    for rows, notes in (([mean_row, *seed_rows], [note]), ([mean_row], [note, "the seeds' rows are in their runs"])):
        table = Table(
            kind="summary",
            title=f"{config.method.name} · {strategy} on {config.dataset}: test scores",
            stub_columns=[""],
            columns=columns,
            rows=rows,
            notes=notes,
        )
        # padded: the UI draws a description's table cells with no padding of their own
        text = (
            render_markdown(table, padded=True)
            + (f"\n{render_markdown(imbalance, padded=True)}" if imbalance else "")
            + plot
        )
        if len(text) <= DESCRIPTION_LIMIT:
            break
    return text


def _imbalance_table(
    config: Config, strategy: str, finals: list[dict[str, float]], cell: Callable[[list[float]], Cell]
) -> Table | None:
    """The description's second table: mean ± std over the seeds of the Shapley values of test accuracy, the
    imbalance degree and the cost (:mod:`dmgl_cli.imbalance`); None when no seed recorded them."""
    prefix = "test_shapley_"
    modalities = sorted({k[len(prefix) :] for f in finals for k in f if k.startswith(prefix)})
    if not modalities:
        return None
    shown = [(f"{prefix}{m}", f"Shapley {m}", "percent") for m in modalities] + [
        ("test_imbalance_degree", "Imbalance", "percent"),
        ("params", "Params", "integer"),
        ("flops_per_sample", "FLOPs/sample", "integer"),
        ("seconds_per_epoch", "s/epoch", "number"),
        ("peak_memory_mib", "Peak MiB", "number"),
    ]
    cells = []
    for key, _, kind in shown:
        value = cell([f[key] for f in finals if key in f])
        value.kind = kind
        cells.append(value)
    return Table(
        kind="summary",
        title=f"{config.method.name} · {strategy} on {config.dataset}: modality imbalance and cost",
        stub_columns=[""],
        columns=[label for _, label, _ in shown],
        rows=[Row([f"mean ± std ({len(finals)} seed{'s' if len(finals) != 1 else ''})"], cells)],
        notes=[
            "Shapley value of test accuracy per modality (an absent modality's input is zeroed; they add up to "
            "ACC minus the accuracy with every input zeroed); Imbalance = max − min Shapley; FLOPs per sample of one "
            "evaluation forward; s/epoch = mean training seconds per epoch; Peak MiB: CUDA max_memory_allocated, "
            "or the process's peak RSS on the CPU (run tag dmgl.peak_memory)"
        ],
    )


def _finish_parent(
    tracker: Tracker, parent_id: str, outcomes: list[SeedOutcome], config: Config, experiment_id: str
) -> dict[str, float]:
    finals = [o.final for o in outcomes]
    summary = summarise_over_seeds(finals)
    tracker.log_metrics(parent_id, {FINAL_PREFIX + k: v for k, v in summary.items()})
    tracker.log_text(
        parent_id,
        json.dumps({"summary": summary, "per_seed": {o.seed: o.final for o in outcomes}}, indent=2, sort_keys=True),
        "final_metrics.json",
    )
    trajectories = {}
    for outcome in outcomes:
        trajectories[f"seed {outcome.seed}"] = [value for _, value in tracker.metric_history(outcome.run_id, "alpha")]
    alpha_png = None
    if any(trajectories.values()):  # a run whose alpha is 0 throughout records none
        figure = alpha_figure(trajectories)
        tracker.log_figure(parent_id, figure, "alpha.png")
        close(figure)
        alpha_png = tracker.artifact_link(parent_id, "alpha.png")
    description = _description(config, experiment_id, outcomes, alpha_png)
    tracker.set_description(parent_id, description)
    tracker.end_run(parent_id, "FINISHED")
    return summary


def _start_seed_run(
    tracker: Tracker,
    experiment_id: str,
    parent_id: str,
    config: Config,
    dataset: PreparedDataset,
    run_name: str,
    extra_tags: dict[str, str] | None = None,
) -> str:
    seed = config.train.seed
    run_id = tracker.start_run(
        experiment_id,
        seed_run_name(run_name, seed),
        {**_tags(config, dataset, "seed"), "dmgl.seed": str(seed), **(extra_tags or {})},
        parent_id=parent_id,
    )
    tracker.log_params(run_id, recorded_params(config))
    tracker.log_text(run_id, config.to_yaml(), "config.yaml")
    tracker.log_dataset(run_id, _dataset_record(config, dataset))
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
    if on_parent:
        on_parent(parent_id)
    tracker.log_params(parent_id, {**recorded_params(config), "seeds": ",".join(map(str, seeds))})
    tracker.log_text(parent_id, config.to_yaml(), "config.yaml")
    tracker.log_dataset(parent_id, _dataset_record(config, dataset))
    outcomes = []
    with tracker.run(parent_id):
        for seed in seeds:
            seeded = with_seed(config, seed)
            run_id = _start_seed_run(tracker, experiment_id, parent_id, seeded, dataset, run_name, extra_tags)
            outcomes.append(
                _train_seed(
                    tracker, run_id, seeded, dataset, progress, step_progress=step_progress, distributed=distributed
                )
            )
    distributed.release_followers()  # no more seeds: the other ranks stop following
    summary = _finish_parent(tracker, parent_id, outcomes, config, experiment_id)
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


def _check_dataset(config: Config, dataset: PreparedDataset, run_tags: dict[str, str]) -> None:
    recorded = run_tags.get("dmgl.dataset_checksum")
    if recorded and recorded != dataset.checksum:
        raise DmglError(
            f"dataset {config.dataset!r} changed since this run was recorded (checksum {dataset.checksum[:12]} "
            f"!= {recorded[:12]}); prepare it again with the options the run used"
        )


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
    _check_dataset(config, dataset, run.tags)
    if run.status == "FINISHED":
        final = json.loads(tracker.read_text(run_id, "final_metrics.json"))
        return SeedOutcome(seed=config.train.seed, run_id=run_id, final=final)
    try:
        state = tracker.load_checkpoint(run_id, "last")
    except DmglError as exc:
        if "has no checkpoint" not in str(exc):
            raise
        state = None  # stopped before its first epoch ended: train from the start, in the same run
    tracker.mark_running(run_id)
    tracker.set_tags(run_id, {"dmgl.device": device_in_use(config.train.device)})  # resumed here, maybe elsewhere
    return _train_seed(
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
                child_id = _start_seed_run(tracker, parent.experiment_id, parent_id, seeded, dataset, parent.name)
                outcomes[seed] = _train_seed(
                    tracker, child_id, seeded, dataset, progress, step_progress=step_progress, distributed=distributed
                )
    distributed.release_followers()  # no more seeds: the other ranks stop following
    ordered = [outcomes[s] for s in sorted(outcomes)]
    experiment = tracker.experiment_name(parent.experiment_id)
    if all(s in outcomes for s in wanted):
        summary = _finish_parent(tracker, parent_id, ordered, parent_config, parent.experiment_id)
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


class _NoRecords:
    """The sink of ranks other than 0: they record nothing (rank 0 logs the metrics and writes the checkpoints)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> None:
        pass


def follow(distributed: DistributedContext) -> int:
    """A data-parallel rank other than 0: train each seed rank 0 announces (its config and the state it resumes
    from) until rank 0 says there are no more; returns the number of seeds trained. Never touches MLflow."""
    trained = 0
    while (job := distributed.broadcast_object()) is not None:
        config = config_from_yaml(job["config"])
        dataset = open_dataset(config.dataset)
        if dataset.checksum != job["dataset_checksum"]:  # another machine's copy, prepared differently
            raise DmglError(
                f"rank {distributed.rank}: dataset {config.dataset!r} here (checksum {dataset.checksum[:12]}) is not "
                f"rank 0's ({job['dataset_checksum'][:12]}); prepare it with the same options on every machine"
            )
        holder: dict[str, Trainer] = {}
        with _graceful_stop(holder):
            trainer = holder["trainer"] = Trainer(
                config, dataset, config.train.seed, _NoRecords(), distributed=distributed
            )
            if job["state"] is not None:
                trainer.load_state_dict(job["state"], "rank 0's checkpoint")
            trainer.fit()
        trained += 1
    return trained


@dataclass
class EvalOutcome:
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


@dataclass
class RecordedModel:
    """A seed run's model rebuilt from its ``config.yaml`` and a checkpoint (``state``), on its configured device."""

    config: Config
    dataset: PreparedDataset
    method: Method
    model: MultimodalModel
    device: torch.device
    state: dict[str, Any]


def load_recorded_model(tracker: Tracker, run: RunRecord, checkpoint: str) -> RecordedModel:
    """Rebuild a seed run's model as it was recorded (``dmgl eval``, ``dmgl explain``, the embeddings plot);
    refuses a dataset whose checksum changed since the run."""
    config = config_from_yaml(tracker.read_text(run.run_id, "config.yaml"))
    dataset = open_dataset(config.dataset)
    _check_dataset(config, dataset, run.tags)
    state = tracker.load_checkpoint(run.run_id, checkpoint)
    method = build_method(config)
    device = pick_device(config.train.device)
    model = method.build_model(model_input_specs(dataset.modalities, config), dataset.num_classes)
    load_model_state(model, state["model"], f"run {run.run_id} checkpoints/{checkpoint}.pt")
    return RecordedModel(config, dataset, method, model.to(device), device, state)


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


def best_seed_on_validation(tracker: Tracker, parent: RunRecord) -> tuple[RunRecord, list[RunRecord]]:
    """A parent run's finished seed with the best validation score (``final_val_<train.select_metric>``; never
    test; a tie goes to the lower seed), and every finished seed that has one."""
    key = f"final_val_{parent.params.get('train.select_metric', 'acc')}"
    scored = [
        c
        for c in tracker.children(parent.run_id)
        if c.status == "FINISHED" and math.isfinite(c.metrics.get(key, math.nan))
    ]
    if not scored:
        raise DmglError(
            f"parent run {parent.run_id} has no finished seed with a validation score ({key}); "
            "`dmgl train --resume` finishes its seeds"
        )
    return max(scored, key=lambda c: (c.metrics[key], -int(c.tags.get("dmgl.seed", 0)))), scored


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
