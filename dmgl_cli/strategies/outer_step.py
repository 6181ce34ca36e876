"""Ours-LB's outer step inside the training loop: the hooks through which a strategy that learns alpha takes
its hypergradient, and what they share (the outer split and batches, ``v`` over the whole outer set, applying an
estimate, the per-update diagnostics). What the hypergradient measures is the estimator's,
:mod:`dmgl_cli.strategies.estimators`.

The trainer calls the hooks of :class:`OuterStep` and never asks which strategy or estimator it runs:
``epoch_start`` before the epoch, ``takes_graph`` before each forward (whether this step's forward is
differentiated again: uncompiled, and in fp32 when curvature products follow), ``before_backward`` with the
step's losses, ``after_backward`` before the optimiser step, ``after_optimizer_step``, and ``epoch_end``, which
returns the epoch's diagnostics for its metrics. ``epoch_state`` / ``load_epoch_state`` carry an interrupted
epoch's accumulators into its resume, so that the update equals an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from dmgl_cli.data.loader import ArraySplit, sample_batch
from dmgl_cli.device import autocast, to_device
from dmgl_cli.distributed import batch_rows_of
from dmgl_cli.hypergradient import Hypergradient, coupled_weight_decay
from dmgl_cli.loop import MethodLoop

if TYPE_CHECKING:  # the strategy imports this module when it builds its outer step
    from dmgl_cli.methods.base import Method
    from dmgl_cli.models import ModelOutput, MultimodalModel
    from dmgl_cli.strategies.learning_based import LearningBasedStrategy


class TrainingLoop(MethodLoop, Protocol):
    """What an outer step reads of the training loop (:class:`dmgl_cli.train.Trainer` provides it): a method's
    view (:class:`~dmgl_cli.loop.MethodLoop`) and the model, the method, the step counters and the holdout."""

    model: MultimodalModel
    method: Method
    epoch: int  # completed epochs
    global_step: int  # optimiser steps taken
    holdout: ArraySplit | None

    def uncompiled(self, needed: bool = True) -> contextlib.AbstractContextManager[None]: ...


class OuterStep:
    """The hooks through which Ours-LB learns alpha (see the module docstring for the order of the calls)."""

    def __init__(self, strategy: LearningBasedStrategy, loop: TrainingLoop) -> None:
        self.strategy, self.loop = strategy, loop
        self.settings = strategy.settings
        self._outer_part: tuple[ArraySplit, ArraySplit] | None = None  # (outer split, this rank's view of it)
        self.records: list[Hypergradient] = []  # this epoch's hypergradients, summarised in its metrics
        self.step_in_epoch = 0
        self.steps_in_epoch = 0

    # ---------------------------------------------------------------------------------------------- hooks
    def epoch_start(self, steps: int, resumed_mid_epoch: bool) -> None:
        """Before an epoch of ``steps`` optimiser steps; ``resumed_mid_epoch``: it carries on an interrupted one
        (whose state :meth:`load_epoch_state` restored)."""
        self.steps_in_epoch = steps
        if not resumed_mid_epoch:
            self.step_in_epoch = 0
            self.records = []

    def takes_graph(self, last_step: bool) -> bool:
        """Whether the coming step's forward is differentiated by :meth:`before_backward`."""
        return False

    def needs_full_precision(self) -> bool:
        """Whether the coming step's forward must run in fp32 (curvature products under autocast)."""
        return False

    def before_backward(self, output: ModelOutput, labels: Tensor, cls_loss: Tensor, mm_loss: Tensor) -> None:
        """With the step's losses, their graphs alive (called when :meth:`takes_graph` said so)."""

    def after_backward(self) -> None:
        """After the step's backward (and the methods' gradient hooks), before the optimiser step."""

    def after_optimizer_step(self) -> None:
        self.step_in_epoch += 1

    def epoch_end(self) -> dict[str, float]:
        """After the epoch's last step: updates alpha if the estimator waits for the epoch; the epoch's
        diagnostics (``alpha_*`` metrics)."""
        return self._diagnostics()

    def epoch_state(self) -> dict[str, Any]:
        """What an epoch interrupted mid-way needs to resume with (its part of the trainer's epoch position)."""
        return {"step": self.step_in_epoch, "records": [dataclasses.asdict(r) for r in self.records]}

    def state_dict(self) -> dict[str, Any]:
        """What lives across epochs (in every checkpoint): nothing, unless the estimator carries it."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state (an empty dict: a fresh start)."""

    def load_epoch_state(self, state: dict[str, Any]) -> None:
        self.step_in_epoch = int(state.get("step", 0))
        self.records = [Hypergradient(**record) for record in state.get("records", [])]

    # ---------------------------------------------------------------------------------------------- shared
    def _apply(self, result: Hypergradient) -> None:
        self.records.append(result)
        self.strategy.remember_largest_eigenvalue(result.largest_eigenvalue)
        self.strategy.apply_hypergradient(result.value)

    def _diagnostics(self) -> dict[str, float]:
        """What the epoch's alpha updates measured and cost; only what applies to the estimator is logged."""
        metrics: dict[str, float] = {}
        if self.strategy.last_hypergradient is not None:
            metrics["alpha_hypergradient"] = float(self.strategy.last_hypergradient)
        records = self.records
        if not records:
            return metrics
        if any(r.snr is not None for r in records):
            metrics["alpha_hypergradient_snr"] = float(np.mean([r.snr for r in records if r.snr is not None]))
        if any(r.samples for r in records):
            metrics["alpha_mixed_samples"] = float(np.mean([r.samples for r in records]))
        if self.settings.approx in ("neumann", "cg", "ggn"):
            metrics["alpha_hessian_products"] = float(sum(r.hessian_products for r in records)) / len(records)
        if self.settings.approx in ("cg", "ggn"):
            metrics["alpha_cg_negative_curvature"] = sum(r.negative_curvature for r in records) / len(records)
            residuals = [r.relative_residual for r in records if r.relative_residual is not None]
            if residuals:
                metrics["alpha_cg_residual"] = float(np.mean(residuals))
            metrics["alpha_fallback"] = sum(r.fallback for r in records) / len(records)
        if self.strategy.largest_eigenvalue is not None:
            metrics["alpha_lambda_max"] = float(self.strategy.largest_eigenvalue)
        return metrics

    def hyper_parameters(self) -> list[Tensor]:
        """The parameters that enter the hypergradient (``strategy.lb.params``)."""
        model = self.loop.model
        if self.settings.params == "head":
            return [p for p in model.head_parameters() if p.requires_grad]
        if self.settings.params == "first":  # the official code differentiates its first tensor only
            return [next(p for p in model.parameters() if p.requires_grad)]
        return [p for p in model.parameters() if p.requires_grad]

    def look_ahead_step(self) -> float:
        """identity's scale: ``strategy.lb.scale``, or the optimiser's learning rate (the one-step look-ahead)."""
        scale = self.strategy.scale
        return scale if scale is not None else float(self.loop.optimizer.param_groups[0]["lr"])

    def outer_split(self) -> ArraySplit:
        loop = self.loop
        if loop.holdout is not None:
            return loop.holdout
        return loop.splits.val if self.settings.outer_data == "val" else loop.splits.train

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """The outer forward runs in eval mode: BatchNorm uses (and keeps) its running statistics and dropout is
        off, so it changes no state and ``v`` is the gradient of the loss the model is scored on."""
        model = self.loop.model
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)

    def outer_output(self) -> tuple[ModelOutput, Tensor]:
        """The model's output on one outer batch (this rank's slice, gathered), gradients flowing."""
        loop, settings = self.loop, self.settings
        split = self.outer_split()
        if self._outer_part is None or self._outer_part[0] is not split:
            self._outer_part = (split, loop.this_ranks_part(split, settings.outer_batch_size or self._batch_size()))
        part = self._outer_part[1]
        size = min(settings.outer_batch_size or self._batch_size(), len(part))
        if settings.outer_sampling == "fixed":  # the same samples every time, as the authors' code does
            batch = part.__getitems__(list(range(size)))
        else:
            batch = sample_batch(part, size, seed=loop.seed * 1_000_003 + loop.global_step)
        inputs, labels = to_device(batch, loop.device)
        with self._eval_mode(), autocast(loop.device, loop.config.train.amp):
            output = loop.method.forward(loop.model, inputs, training=False)
        return loop.distributed.gather_output(output, labels, batch_rows_of(batch))

    def whole_outer_gradient(self, params: list[Tensor]) -> list[Tensor]:
        """``v``: the gradient of the classification loss over the whole outer set, in eval mode, batch by batch.
        Every rank computes all of it (the outer set is small), so no collective is needed."""
        loop = self.loop
        split = self.outer_split()
        size = self.settings.outer_batch_size or self._batch_size()
        total = len(split)
        gradient = [torch.zeros_like(p) for p in params]
        with self._eval_mode():
            for start in range(0, total, size):
                positions = list(range(start, min(start + size, total)))
                inputs, labels = to_device(split.__getitems__(positions), loop.device)
                with autocast(loop.device, loop.config.train.amp):
                    output = loop.method.forward(loop.model, inputs, training=False)
                loss = loop.method.classification_loss(output, labels) * (len(positions) / total)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for accumulated, grad in zip(gradient, grads, strict=True):
                    if grad is not None:
                        accumulated.add_(grad)
        return gradient

    def _batch_size(self) -> int:
        return self.loop.config.train.batch_size

    def _weight_decay(self, params: list[Tensor]) -> list[float]:
        """The optimiser's coupled decay as it enters H of the *unscaled* inner loss: a method that trains on
        ``s * L_in`` (``objective_scale``, dmgl-official's 2) has ``H = s H_L + wd``, and Eq. 3 with the unscaled
        losses needs ``H_L + wd / s`` (the factor s cancels between g_MM - g_CLS and H)."""
        scale = self.loop.method.objective_scale
        return [wd / scale for wd in coupled_weight_decay(self.loop.optimizer, params)]
