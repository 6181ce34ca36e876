"""The training loop — Algorithm 1 of the paper, one loop for every method and strategy.

Per optimiser step (the inner loop of Algorithm 1)::

    output = model(inputs)
    L_tot  = (1 - alpha) * L_CLS + alpha * L_MM + method's extra terms
    outer step: before_backward(losses)          # a learnt alpha takes g_MM - g_CLS here, if this step is sampled
    backward, method's gradient hooks, outer step: after_backward, optimiser step, outer step: after_optimizer_step

Per epoch: the strategy sets alpha (schedules: heuristic 1 - exp(-1/t), stepwise h(p), linear, constant; Ours-LB:
its outer step's ``epoch_end`` moves it from the epoch's hypergradient, :mod:`dmgl_cli.strategies.outer_step`), the
model is scored on the validation split (every ``train.eval_every`` epochs and at the last), the best epoch is
chosen on validation only, the test split is scored at each new best epoch (the reported figure) and at the last
epoch (every validated epoch with ``train.test_curves``), and a checkpoint with everything needed for an exact
resume is written. The trainer never asks which strategy it runs (it calls the outer step's hooks, or none), and
never talks to MLflow: it hands metrics and checkpoints to a :class:`RunSink`. A run whose alpha is 0 throughout
does not compute L_MM. What it checks and builds before the first step is :mod:`dmgl_cli.train_setup`'s; scoring
a split, :mod:`dmgl_cli.evaluation`'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from dmgl_cli.checkpoint import capture_rng, load_model_state, restore_rng
from dmgl_cli.config import Config
from dmgl_cli.data.loader import ArraySplit, EpochBatchSampler, eval_loader, hold_out, make_loader, make_splits
from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.data.transforms import build_transforms, model_input_specs
from dmgl_cli.device import autocast, configure_determinism, pick_device, seed_everything, to_device
from dmgl_cli.distributed import SINGLE_PROCESS, DistributedContext, batch_rows_of, device_for_rank
from dmgl_cli.errors import DmglError, Interrupted
from dmgl_cli.evaluation import evaluate
from dmgl_cli.imbalance import Coalition, coalitions_from_state, coalitions_to_state, evaluate_with_coalitions
from dmgl_cli.losses import total_loss
from dmgl_cli.methods import build_method
from dmgl_cli.objective import compute_losses
from dmgl_cli.strategies import AlphaStrategy, strategy_from_config
from dmgl_cli.strategies.estimators import outer_step_for
from dmgl_cli.train_setup import (
    build_optimizer,
    build_scheduler,
    check_against_dataset,
    check_data_parallel,
    holds_out,
    place_model,
)

__all__ = [
    "RunSink",
    "TrainResult",
    "Trainer",
    "check_against_dataset",
    "check_data_parallel",
    "compute_losses",
    "evaluate",
    "holds_out",
]

LOG = logging.getLogger("dmgl")


class RunSink(Protocol):
    """Where a training run's records go (the MLflow run, in practice)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    best_epoch: int
    final: dict[str, float]  # val_* and test_* at the best (validation-selected) epoch
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch metrics, epoch 1..T
    # v(S) of every modality coalition on the test split at the best epoch, scored with its test scores
    # (imbalance.evaluate_with_coalitions); None where they were not (see Trainer.scores_coalitions)
    test_coalitions: dict[Coalition, float] | None = None


@dataclass
class EpochTally:
    """A training epoch's running sums of the losses (on the device: no host sync per step), the samples seen and
    when it started; what a mid-epoch checkpoint records of them, and back."""

    sums: dict[str, Tensor]
    seen: int
    started: float  # time.perf_counter(), less the seconds trained before an interruption

    @classmethod
    def resumed(cls, position: dict[str, Any], device: torch.device) -> EpochTally:
        """The tally of a fresh epoch, or of one resumed at ``position`` (from :meth:`position`)."""
        sums = {k: torch.tensor(v, device=device) for k, v in position.get("sums", {}).items()}
        return cls(sums, position.get("seen", 0), time.perf_counter() - position.get("seconds", 0.0))

    def add(self, values: dict[str, Tensor], size: int) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float() * size
        self.seen += size

    def position(self) -> dict[str, Any]:
        return {
            "sums": {k: float(v) for k, v in self.sums.items()},
            "seen": self.seen,
            "seconds": time.perf_counter() - self.started,
        }


class Trainer:
    """One seed of one configuration on one dataset."""

    def __init__(
        self,
        config: Config,
        dataset: PreparedDataset,
        seed: int,
        sink: RunSink,
        progress: Callable[[int, int, dict[str, float]], None] | None = None,
        step_progress: Callable[[int, int, int], None] | None = None,
        distributed: DistributedContext = SINGLE_PROCESS,
    ):
        """``progress(epoch, epochs, metrics)`` after each epoch; ``step_progress(epoch, batch, batches)`` after
        each training batch (a progress bar; it must not synchronise with the device). ``distributed``: this
        process's rank in a data-parallel run (:mod:`dmgl_cli.distributed`); every rank builds the same trainer."""
        self.config, self.dataset, self.seed, self.sink = config, dataset, seed, sink
        self.progress = progress or (lambda epoch, total, metrics: None)
        self.step_progress = step_progress
        self.distributed = distributed
        configure_determinism(config.train.deterministic)
        self.device = pick_device(device_for_rank(config.train.device, distributed))
        seed_everything(seed)

        self.splits = make_splits(dataset, config.data.val_fraction, config.data.split_seed)
        if len(self.splits.train) == 0 or len(self.splits.val) == 0 or len(self.splits.test) == 0:
            raise DmglError(
                f"dataset {dataset.name} has an empty split (train {len(self.splits.train)}, "
                f"val {len(self.splits.val)}, test {len(self.splits.test)}); prepare more samples"
            )
        # Frame sampling and augmentation from data.options: random (seeded per batch) in training only.
        self.splits.train.transform = build_transforms(dataset.modalities, config, training=True)
        self.splits.val.transform = self.splits.test.transform = build_transforms(
            dataset.modalities, config, training=False
        )
        self.strategy: AlphaStrategy = strategy_from_config(config.strategy, seed)
        # strategy.lb.outer_data=holdout: training samples set aside for the outer step, never trained on.
        self.holdout: ArraySplit | None = None
        if holds_out(config):
            self.splits.train, self.holdout = hold_out(
                self.splits.train, config.strategy.lb.holdout, config.data.split_seed, self.splits.val.transform
            )
        if distributed.active:
            check_data_parallel(config, distributed.world)
        pin = self.device.type == "cuda"
        workers = config.data.num_workers
        self.train_loader = make_loader(
            self.this_ranks_part(self.splits.train, config.train.batch_size),
            config.train.batch_size,
            shuffle=True,
            seed=seed,
            drop_last=True,
            num_workers=workers,
            pin_memory=pin,
            persistent=True,
        )
        shard = (distributed.rank, distributed.world) if distributed.active else None  # batch i on rank i mod N
        self.eval_loaders = {
            name: eval_loader(dataset, config, split, num_workers=workers, pin_memory=pin, batch_shard=shard)
            for name, split in (("val", self.splits.val), ("test", self.splits.test))
        }

        self.method = build_method(config)
        self.model = self.method.build_model(model_input_specs(dataset.modalities, config), dataset.num_classes)
        self.model, self._broadcast_buffers = place_model(self.model, config, self.device, distributed)
        self._warned_uncompiled = False
        self.optimizer = build_optimizer(config, self.method, self.model)
        self.scheduler = build_scheduler(config, self.optimizer)
        # The strategy's hooks when it learns alpha (Ours-LB), None for a schedule; alpha 0 throughout: no L_MM.
        self.outer_step = outer_step_for(self.strategy, self)
        self.computes_matching = not self.strategy.always_zero

        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.best_scores: dict[str, float] = {}
        self.best_coalitions: dict[Coalition, float] | None = None
        self._test_coalitions: dict[Coalition, float] | None = None  # of the last test scoring, if it scored them
        # The best epoch's test scoring also scores the modality coalitions for the seed's Shapley values, sharing
        # its encoders' work, so that the end of the seed needs no pass of its own over the test split: in one
        # process (a rank holds a share of the batches), on the eager model (the coalitions swap the encoders'
        # forward, which a compiled graph does not see), for a method whose scoring leaves its state alone.
        self.scores_coalitions = not (distributed.active or config.train.compile or self.method.scoring_changes_state)
        self.history: list[dict[str, float]] = []
        # A stop request (set from a signal handler) is honoured between two optimiser steps, never inside one,
        # so the checkpoint written on the way out is consistent and resumes at the exact batch.
        self.stop_requested = False
        self._epoch_position: dict[str, Any] = {}  # mid-epoch progress restored from an interrupted run
        self.method.attach(self)

    # ------------------------------------------------------------------------------------------------ building
    def this_ranks_part(self, split: ArraySplit, batch_size: int) -> ArraySplit:
        """What this rank reads of ``split``'s batches: its slice of each (data-parallel), or all of it. A view: the
        split itself stays whole for the methods' own passes over it, which every rank makes in full."""
        if not self.distributed.active:
            return split
        smallest = min(batch_size, len(split))
        if smallest < self.distributed.world:
            raise DmglError(
                f"{self.distributed.world} processes need batches of at least {self.distributed.world} samples, "
                f"this run's are {smallest}; raise train.batch_size or use fewer processes"
            )
        part = ArraySplit(split.arrays, split.indices, split.transform)
        part.shard = (self.distributed.rank, self.distributed.world)
        return part

    @contextlib.contextmanager
    def uncompiled(self, needed: bool = True) -> Iterator[None]:
        """Under ``train.compile``, the forwards made inside run the uncompiled model (the same module and
        parameters). A compiled graph's backward (AOTAutograd) runs once: no double backward, which the
        Hessian-vector products of ``strategy.lb.approx`` neumann, cg and official take, and no ``retain_graph``
        (donated buffers), which every approximation's ``g_MM - g_CLS`` takes before the step's backward. Warns
        once per run."""
        if not (needed and self.config.train.compile):
            yield
            return
        if not self._warned_uncompiled:
            self._warned_uncompiled = True
            LOG.warning(
                "train.compile: the steps that take alpha's hypergradient (strategy.lb.approx=%s) run their forward "
                "uncompiled: they differentiate it more than once (retained graph%s), which torch.compile's graphs "
                "do not support",
                self.config.strategy.lb.approx,
                "" if self.config.strategy.lb.approx == "identity" else ", Hessian-vector products",
            )
        with torch.compiler.set_stance("force_eager"):
            yield

    def _train_epoch(self) -> dict[str, float]:
        """One epoch of Algorithm 1's inner loop; the hooks, in order, are listed in ARCHITECTURE.md."""
        config, model, method, strategy, outer = self.config, self.model, self.method, self.strategy, self.outer_step
        sampler, batches, passes, tally = self._start_epoch()
        stop_agreed = False
        for index, batch in enumerate(self.train_loader, start=sampler.skip):
            inputs, labels = to_device(batch, self.device)
            for number, pass_key in enumerate(passes):
                method.start_pass(pass_key)
                alpha = strategy.alpha
                step_info = {"epoch": self.epoch + 1, "global_step": self.global_step, "alpha": alpha}
                last_step = index == batches - 1 and number == len(passes) - 1
                takes_graph = outer is not None and outer.takes_graph(last_step)
                # the outer step differentiates this forward again: uncompiled under train.compile, and in fp32 when
                # curvature products follow (bf16 products are far off their fp32 values)
                full_precision = takes_graph and outer is not None and outer.needs_full_precision()
                with self.uncompiled(takes_graph), autocast(self.device, config.train.amp and not full_precision):
                    output = method.forward(model, inputs, training=True)
                # data-parallel: the whole global batch's output on every rank (distributed.py), labels included
                output, batch_labels = self.distributed.gather_output(output, labels, batch_rows_of(batch))
                cls_loss, mm_loss = compute_losses(method, config, output, batch_labels, self.computes_matching)
                extra = method.extra_losses(output, batch_labels, step_info)
                loss = method.objective_scale * total_loss(alpha, cls_loss, mm_loss) + sum(
                    extra.values(), cls_loss.new_zeros(())
                )
                if takes_graph and outer is not None:
                    outer.before_backward(output, batch_labels, cls_loss, mm_loss)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # the mean over ranks, before any method reads or rescales the gradients; the same all-reduce
                # settles whether any rank was asked to stop, so that every rank stops after this same step
                stop_agreed = self.distributed.average_gradients(list(model.parameters()), self.stop_requested)
                method.after_backward(model, output, batch_labels, step_info)
                if config.optim.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                if outer is not None:
                    outer.after_backward()
                self.optimizer.step()
                if self._broadcast_buffers:
                    self.distributed.broadcast_module(model, buffers_only=True)
                self.global_step += 1
                if outer is not None:
                    outer.after_optimizer_step()
                tally.add({"loss": loss, "cls_loss": cls_loss, "mm_loss": mm_loss, **extra}, int(batch_labels.shape[0]))
            if self.step_progress is not None:
                self.step_progress(self.epoch + 1, index + 1, batches)
            if stop_agreed and index < batches - 1:
                self._stop_mid_epoch(index + 1, tally)
        sampler.skip = 0
        return self._epoch_metrics(tally)

    def _start_epoch(self) -> tuple[EpochBatchSampler, int, tuple[Any, ...], EpochTally]:
        """The epoch's sampler (at its first batch not yet trained), its batch count, the method's passes per batch
        and the running sums: after an interruption mid-epoch, the batches already trained are skipped and the
        epoch's sums and outer-step state carried on, so that the epoch ends as an uninterrupted one."""
        self.model.train()
        sampler = self.train_loader.batch_sampler
        assert isinstance(sampler, EpochBatchSampler)  # make_loader's: shuffles from (seed, epoch), can skip ahead
        sampler.set_epoch(self.epoch)
        batches = len(self.train_loader)
        position, self._epoch_position = self._epoch_position, {}
        sampler.skip = position.get("batch", 0)
        passes = self.method.train_passes()  # optimiser steps per batch: one, or one per modality (MLA)
        if self.outer_step is not None:
            if position:
                self.outer_step.load_epoch_state(position.get("outer", {}))
            self.outer_step.epoch_start(batches * len(passes), resumed_mid_epoch=bool(position))
        return sampler, batches, passes, EpochTally.resumed(position, self.device)

    def _stop_mid_epoch(self, next_batch: int, tally: EpochTally) -> None:
        """Every rank agreed to stop after this step: checkpoint the exact position (``last``) and stop."""
        outer = self.outer_step.epoch_state() if self.outer_step is not None else {}
        self._epoch_position = {"batch": next_batch, "outer": outer, **tally.position()}
        self.sink.save_checkpoint("last", self.state_dict())
        raise Interrupted()

    def _epoch_metrics(self, tally: EpochTally) -> dict[str, float]:
        """The epoch's ``train_*`` means, alpha, learning rate, throughput and the outer step's diagnostics."""
        outer_metrics = self.outer_step.epoch_end() if self.outer_step is not None else {}  # an end-of-epoch update
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - tally.started
        metrics = {f"train_{name}": float(total) / max(tally.seen, 1) for name, total in tally.sums.items()}
        if not self.computes_matching:  # alpha is 0 throughout: nothing about it or L_MM to record
            metrics.pop("train_mm_loss", None)
        else:
            metrics["alpha"] = self.strategy.alpha
        metrics.update(
            lr=self.optimizer.param_groups[0]["lr"],
            train_samples_per_s=tally.seen / seconds if seconds > 0 else 0.0,
            epoch_seconds=seconds,
            **outer_metrics,
        )
        return metrics

    # ------------------------------------------------------------------------------------------------- epochs
    def fit(self) -> TrainResult:
        config, total = self.config, self.config.train.epochs
        # After a resume, records written before the interruption are offered again; the sink skips what it has.
        for number, metrics in enumerate(self.history, start=1):
            self.sink.log_metrics(metrics, step=number)
        while self.epoch < total:
            number = self.epoch + 1
            self.strategy.start_epoch(self.epoch, total)
            self.method.on_epoch_start(self.model, number)
            metrics = self._train_epoch()
            val, test = self._scores_of_epoch(number, total)
            metrics.update(val)
            metrics.update(test)
            metrics.update(self.method.on_epoch_end(self.model, number, val))
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if val:  # validated epochs only (train.eval_every): its patience counts validations
                    self.scheduler.step(val["val_cls_loss"])
            elif self.scheduler is not None:
                self.scheduler.step()
            if self._is_new_best(val):
                if not test:
                    test = self._score("test", coalitions=True)
                    metrics.update(test)
                self.best_metric, self.best_epoch = val[f"val_{config.train.select_metric}"], number
                self.best_scores = {**val, **test}
                self.best_coalitions = self._test_coalitions
                self.sink.save_checkpoint("best", self._best_state())
            if number == total and "test_acc" not in metrics:  # the last epoch's test score, for best-vs-last
                metrics.update(self._score("test"))
            metrics["best_epoch"] = float(self.best_epoch)
            # Every rank applies the same averaged gradients, so the weights agree; non-deterministic kernels (CUDA)
            # could still make them differ in the last bits: rank 0's weights and buffers are every rank's here.
            self.distributed.broadcast_module(self.model)
            self.history.append(metrics)
            self.epoch += 1
            self.sink.save_checkpoint("last", self.state_dict())
            self.sink.log_metrics(metrics, step=number)
            self.progress(number, total, metrics)
            if self.distributed.any(self.stop_requested) and self.epoch < total:
                raise Interrupted()  # the epoch-end checkpoint above is the resume point
        final = {"best_epoch": float(self.best_epoch), **self.best_scores}
        return TrainResult(
            best_epoch=self.best_epoch, final=final, history=list(self.history), test_coalitions=self.best_coalitions
        )

    def _is_new_best(self, val: dict[str, float]) -> bool:
        return bool(val) and val[f"val_{self.config.train.select_metric}"] > self.best_metric  # ties: the earlier

    def _score(self, split: str, coalitions: bool = False) -> dict[str, float]:
        """``split``'s scores; with ``coalitions`` (where :attr:`scores_coalitions`), the test split's coalition
        values too, kept until the next test scoring."""
        loader = self.eval_loaders[split]
        if split == "test":
            self._test_coalitions = None
            if coalitions and self.scores_coalitions:
                modalities = sorted(self.dataset.modalities)
                scores, self._test_coalitions = evaluate_with_coalitions(
                    self.model, self.method, self.config, loader, self.device, split, modalities
                )
                return scores
        return evaluate(self.model, self.method, self.config, loader, self.device, split, self.distributed)

    def _scores_of_epoch(self, number: int, total: int) -> tuple[dict[str, float], dict[str, float]]:
        """(validation, test) scores after epoch ``number``: validation every ``train.eval_every`` epochs and at the
        last; test here only for curves (``train.test_curves``, or a method whose scoring passes change its state,
        so that they run as in its released loop). Otherwise test is scored by :meth:`fit` at each new best epoch
        (the reported figure) and at the last epoch."""
        every = self.config.train.eval_every
        if number % every != 0 and number != total:
            return {}, {}
        val = self._score("val")
        curves = self.config.train.test_curves or self.method.scoring_changes_state
        return val, (self._score("test", coalitions=self._is_new_best(val)) if curves else {})

    # -------------------------------------------------------------------------------------------------- state
    def _best_state(self) -> dict[str, Any]:
        return {
            "kind": "best",
            "epoch": self.epoch + 1,
            "model": self.model.state_dict(),
            "metrics": dict(self.best_scores),
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "last",
            "epoch": self.epoch,
            "global_step": self.global_step,
            "seed": self.seed,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "strategy": self.strategy.state_dict(),
            "outer_step": self.outer_step.state_dict() if self.outer_step is not None else {},
            "method": self.method.state_dict(),
            "best": {
                "metric": self.best_metric,
                "epoch": self.best_epoch,
                "scores": dict(self.best_scores),
                "coalitions": coalitions_to_state(self.best_coalitions) if self.best_coalitions else None,
            },
            "history": [dict(h) for h in self.history],
            "epoch_position": dict(self._epoch_position),
            "rng": capture_rng(self.device),
        }

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        if state.get("kind") != "last" or "optimizer" not in state:
            raise DmglError(f"{source} is not a resumable checkpoint (resume needs checkpoints/last.pt)")
        load_model_state(self.model, state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.load_state_dict(state["strategy"])
        if self.outer_step is not None:
            self.outer_step.load_state_dict(state.get("outer_step") or {})
        self.method.load_state_dict(state["method"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        best = state["best"]
        self.best_metric, self.best_epoch, self.best_scores = (
            float(best["metric"]),
            int(best["epoch"]),
            dict(best["scores"]),
        )
        # a checkpoint written before the coalitions were kept (or without them): the seed's end scores them itself
        self.best_coalitions = coalitions_from_state(best["coalitions"]) if best.get("coalitions") else None
        self.history = [dict(h) for h in state["history"]]
        self._epoch_position = dict(state.get("epoch_position") or {})
        restore_rng(state["rng"], self.device)
