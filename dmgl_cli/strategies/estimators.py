"""What Ours-LB's hypergradient measures and how it is taken: the estimators behind the hooks of
:class:`~dmgl_cli.strategies.outer_step.OuterStep`, and :func:`outer_step_of`, which picks one from the settings.

Alpha governs the steps until its next update. Its hypergradient should say what alpha did to the outer loss
(the classification loss on data held out from training) over those steps. ``strategy.lb.estimator`` picks how:

* ``epoch`` (forward mode along the epoch, Franceschi et al. 2017, first order). ``Z = d theta / d alpha`` is
  carried through the epoch's optimiser steps: each step's update depends on alpha through its gradient
  ``(1 - alpha) g_CLS + alpha g_MM``, whose derivative is ``d = g_MM - g_CLS``. The optimiser passes ``d`` on as it
  passes on gradients, so ``Z_T = -sum_s c_s P_s d_s`` with ``c_s`` the step sizes by which step ``s``'s gradient
  moves the weights until the epoch ends (SGD with momentum mu: ``lr (1 - mu^(T-s)) / (1 - mu)``; Adam:
  ``lr (1 - b1) sum_t b1^(t-s) / (1 - b1^n_t)`` with its bias corrections) and ``P_s`` Adam's diagonal
  preconditioner ``1 / (sqrt(v_hat) + eps)`` at step ``s`` (1 for SGD). The hypergradient is ``v^T Z_T`` with
  ``v`` the gradient of the classification loss over the *whole* outer set at the epoch's end. Approximated:
  the curvature term ``H Z`` (the loss Hessian and weight decay acting on ``Z``: later steps partly undo an
  earlier move) is dropped, and so are the derivatives of Adam's second moment and ``P`` within the epoch. ``d``
  costs one extra backward pass; it is taken at every ``mixed_every``-th step from a random offset (seeded) and
  weighted ``mixed_every``, an unbiased estimate of the sum.
* ``average``: the mean over the same sampled steps of the one-step look-ahead ``-lr d_s^T v``, ``v`` again over
  the whole outer set: today's estimate with its noise averaged away, without the optimiser's transfer.
* ``step``: one inner batch and one outer batch at the update step (v0.2's estimate; with ``approx`` identity,
  cg, neumann or ggn). ``update_every=N`` updates every N steps with it.

The sampled steps are split into ``SNR_GROUPS`` interleaved groups, each with its own ``Z``; their estimates'
spread gives the signal-to-noise ratio logged with each update (``alpha_hypergradient_snr``: the estimate over
its standard error).
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor

from dmgl_cli.data.loader import ArraySplit
from dmgl_cli.device import autocast, to_device
from dmgl_cli.errors import DmglError
from dmgl_cli.hypergradient import (
    Hypergradient,
    coupled_weight_decay,
    first_tensor_hessian_gradient_mean,
    ggn_hypergradient,
    hessian_vector_products,
    identity_hypergradient,
    implicit_hypergradient,
    mixed_gradient,
)
from dmgl_cli.losses import classification_loss, info_nce_of_similarity, pairwise_similarities
from dmgl_cli.objective import compute_losses
from dmgl_cli.strategies.outer_step import OuterStep, TrainingLoop

if TYPE_CHECKING:
    from dmgl_cli.distributed import DistributedContext
    from dmgl_cli.models import ModelOutput
    from dmgl_cli.strategies.learning_based import LearningBasedStrategy
    from dmgl_cli.strategies.schedules import AlphaStrategy

SNR_GROUPS = 4  # interleaved groups of sampled steps whose spread gives the estimate's standard error


def outer_step_for(strategy: AlphaStrategy, loop: TrainingLoop) -> OuterStep | None:
    """The outer step that learns ``strategy``'s alpha inside ``loop``, or None for a strategy that does not learn
    it (a schedule): the trainer calls this once and then only the hooks, never asking which strategy it runs."""
    if not strategy.learns_alpha:
        return None
    return outer_step_of(cast("LearningBasedStrategy", strategy), loop)


def outer_step_of(strategy: LearningBasedStrategy, loop: TrainingLoop) -> OuterStep:
    """The outer step that ``strategy``'s settings describe, inside ``loop``."""
    settings = strategy.settings
    if settings.approx == "official":
        return OfficialOuterStep(strategy, loop)
    if settings.estimator == "step":
        return StepOuterStep(strategy, loop)
    if settings.estimator == "forward":
        return ForwardOuterStep(strategy, loop)
    return EpochOuterStep(strategy, loop)


class StepOuterStep(OuterStep):
    """v0.2's estimate: at an update step, ``g_MM - g_CLS`` of that step's batch and ``v`` of one outer batch.

    ``identity`` takes ``g_MM - g_CLS`` before the backward and the outer forward after it (same parameters and
    BatchNorm statistics, the same value), so that the inner and outer graphs never coexist. ``cg``, ``neumann``
    and ``ggn`` need the inner graph for their products and take everything before the backward, in fp32."""

    def __init__(self, strategy: LearningBasedStrategy, loop: TrainingLoop) -> None:
        super().__init__(strategy, loop)
        self._mixed: list[Tensor] | None = None
        self._pending: Hypergradient | None = None
        self._takes = False
        if self.settings.approx == "ggn":
            check_ggn(loop.distributed)

    def takes_graph(self, last_step: bool) -> bool:
        self._takes = self.strategy.needs_hypergradient(self.loop.global_step + 1, end_of_epoch=last_step)
        return self._takes

    def needs_full_precision(self) -> bool:
        return self._takes and self.settings.approx != "identity"

    def before_backward(self, output: ModelOutput, labels: Tensor, cls_loss: Tensor, mm_loss: Tensor) -> None:
        loop, settings = self.loop, self.settings
        params = self.hyper_parameters()
        reduce = loop.distributed.average
        if settings.approx == "identity":  # its outer forward waits until after the backward
            self._mixed = mixed_gradient(cls_loss, mm_loss, params, reduce)
            return
        outer_output, outer_labels = self.outer_output()
        outer_cls = loop.method.classification_loss(outer_output, outer_labels)
        if settings.approx == "ggn":
            mixed = mixed_gradient(cls_loss, mm_loss, params)
            alpha = self.strategy.alpha
            outputs, convex_loss = convex_outputs(output, labels, alpha, loop.config.loss.tau)
            self._pending = ggn_hypergradient(
                outputs,
                convex_loss,
                mixed,
                outer_cls,
                params,
                settings.terms,
                settings.damping,
                settings.relative_damping,
                weight_decay=self._weight_decay(params),
                tolerance=settings.cg_tolerance,
                max_residual=settings.max_residual,
                fallback_scale=self.look_ahead_step(),
                largest_eigenvalue_estimate=self.strategy.cached_largest_eigenvalue(),
                seed=loop.seed + loop.global_step,
            )
            return
        self._pending = implicit_hypergradient(
            cls_loss,
            mm_loss,
            self.strategy.alpha,
            outer_cls,
            params,
            settings.approx,
            settings.terms,
            self.strategy.scale,
            settings.damping,
            weight_decay=self._weight_decay(params),
            largest_eigenvalue_estimate=self.strategy.cached_largest_eigenvalue(),
            seed=loop.seed + loop.global_step,
            outer_shares_graph=False,
            reduce=reduce if loop.distributed.active else None,
            tolerance=settings.cg_tolerance,
            max_residual=settings.max_residual if settings.approx == "cg" else None,
            fallback_scale=self.look_ahead_step(),
        )

    def after_backward(self) -> None:
        if self._mixed is None:
            return
        output, labels = self.outer_output()
        outer_cls = self.loop.method.classification_loss(output, labels)
        value = identity_hypergradient(
            self._mixed, outer_cls, self.hyper_parameters(), self.look_ahead_step(), self.loop.distributed.average
        )
        self._mixed = None
        self._pending = Hypergradient(value)

    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None


class OfficialOuterStep(OuterStep):
    """The authors' released rule (``approx=official``, ``dmgl-official``): before each epoch, the mean of one
    tensor of ``H g_CLS`` on an outer batch (:func:`first_tensor_hessian_gradient_mean`). As released, the outer
    batch is drawn once, with the *training* transform (frame sampling and augmentation), and that same batch is
    used before every epoch."""

    def __init__(self, strategy: LearningBasedStrategy, loop: TrainingLoop) -> None:
        super().__init__(strategy, loop)
        self._batch: Any = None  # drawn at the first update; the same draw again after a resume (seeded by rows)

    def epoch_start(self, steps: int, resumed_mid_epoch: bool) -> None:
        super().epoch_start(steps, resumed_mid_epoch)
        if not resumed_mid_epoch:  # an epoch resumed mid-way had its update before the interruption
            self._apply(Hypergradient(self.alpha_gradient()))

    def alpha_gradient(self) -> float:
        """The released alpha gradient on the outer batch, at the current weights. Every rank computes it on the
        whole (small) batch, so the ranks agree without a collective."""
        loop = self.loop
        if self._batch is None:
            split = self.outer_split()
            augmented = ArraySplit(split.arrays, split.indices, loop.splits.train.transform)
            size = min(self.settings.outer_batch_size or self._batch_size(), len(augmented))
            self._batch = augmented.__getitems__(list(range(size)))
        inputs, labels = to_device(self._batch, loop.device)
        # H g_CLS on the outer batch: its forward is differentiated twice (uncompiled under train.compile)
        with loop.uncompiled(), self._eval_mode(), autocast(loop.device, loop.config.train.amp):
            output = loop.method.forward(loop.model, inputs, training=False)
        cls_loss, mm_loss = compute_losses(loop.method, loop.config, output, labels)
        return first_tensor_hessian_gradient_mean(cls_loss, mm_loss, self.strategy.alpha, self.hyper_parameters())


class EpochOuterStep(OuterStep):
    """``estimator`` epoch or average: ``d = g_MM - g_CLS`` at sampled steps, carried to the epoch's end through
    the optimiser's update rule (epoch) or averaged (average), against ``v`` over the whole outer set. With
    ``horizon: run`` the sums go on over epochs (each step's transfer still counted to the end of its epoch)."""

    groups_count = SNR_GROUPS

    def __init__(self, strategy: LearningBasedStrategy, loop: TrainingLoop) -> None:
        super().__init__(strategy, loop)
        self.every = self.settings.mixed_every
        self._mixed: list[Tensor] | None = None
        self._sampled: set[int] = set()
        self.groups: list[list[Tensor]] = []  # one Z per group of sampled steps
        self.samples = 0

    def epoch_start(self, steps: int, resumed_mid_epoch: bool) -> None:
        super().epoch_start(steps, resumed_mid_epoch)
        loop = self.loop
        # systematic sampling: every `every`-th step from a seeded random offset; each step's chance is 1/every
        offset = random.Random(loop.seed * 7_919 + loop.epoch).randrange(min(self.every, max(steps, 1)))
        self._sampled = set(range(offset, steps, self.every))
        if not resumed_mid_epoch and self.settings.horizon == "epoch":
            self.groups, self.samples = [], 0

    def takes_graph(self, last_step: bool) -> bool:
        return self.step_in_epoch in self._sampled

    def before_backward(self, output: ModelOutput, labels: Tensor, cls_loss: Tensor, mm_loss: Tensor) -> None:
        self._mixed = mixed_gradient(cls_loss, mm_loss, self.hyper_parameters(), self.loop.distributed.average)

    def after_optimizer_step(self) -> None:
        if self._mixed is not None:
            self._accumulate(self._mixed)
            self._mixed = None
        super().after_optimizer_step()

    def _accumulate(self, mixed: list[Tensor]) -> None:
        """``Z_g -= every * c_s * P_s * d_s`` for the sampled step ``s`` that just took its optimiser step."""
        params = self.hyper_parameters()
        if not self.groups:
            self.groups = [[torch.zeros_like(p) for p in params] for _ in range(self.groups_count)]
        group = self.groups[self.samples % self.groups_count]
        self.samples += 1
        remaining = self.steps_in_epoch - self.step_in_epoch  # steps s .. T-1, this one included
        transfer = _transfer_rule(self.loop.optimizer, self.settings.estimator)
        for z, d, p in zip(group, mixed, params, strict=True):
            weight, preconditioner = transfer(p, remaining)
            if self.settings.estimator == "average":  # the mean over the epoch's steps of -lr d^T v
                weight = weight / max(self.steps_in_epoch, 1)
            update = d * preconditioner if preconditioner is not None else d
            z.sub_(update, alpha=self.every * weight)

    def epoch_end(self) -> dict[str, float]:
        if self.samples:
            params = self.hyper_parameters()
            v = self.whole_outer_gradient(params)
            per_group = [float(sum((z * g).sum() for z, g in zip(zs, v, strict=True))) for zs in self.groups]
            value = float(sum(per_group))
            used = per_group[: min(self.samples, len(per_group))]  # the groups that received a step
            snr = None
            if len(used) >= 2:
                error = math.sqrt(len(used)) * float(np.std(used, ddof=1))
                snr = abs(value) / error if error > 0 else math.inf
            self._apply(Hypergradient(value, snr=snr, samples=self.samples))
        if self.settings.horizon == "epoch":
            self.groups = []
        return super().epoch_end()

    def epoch_state(self) -> dict[str, Any]:
        groups = [[z.clone() for z in group] for group in self.groups]
        return {**super().epoch_state(), "samples": self.samples, "groups": groups}

    def state_dict(self) -> dict[str, Any]:
        # horizon run: Z (and the optimiser's tangents) carry over every epoch boundary, so checkpoints hold them
        if self.settings.horizon != "run":
            return {}
        state = self.epoch_state()
        return {"samples": state["samples"], "groups": state["groups"], "tangents": state.get("tangents", [])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.load_epoch_state({**self.epoch_state(), **state})

    def load_epoch_state(self, state: dict[str, Any]) -> None:
        super().load_epoch_state(state)
        self.samples = int(state.get("samples", 0))
        self.groups = [[z.to(self.loop.device) for z in g] for g in state.get("groups", [])]


class ForwardOuterStep(EpochOuterStep):
    """``estimator`` forward: the forward-mode recursion with its curvature term (Franceschi et al. 2017):
    ``Z`` and the optimiser's tangent state are carried through every step,

        SGD (momentum mu):  B <- mu B + (H + wd) Z + d_s,            Z <- Z - lr B
        Adam:               M <- b1 M + (1 - b1) ((H + wd) Z + d_s),  Z <- Z - lr / (1 - b1^n) P M

    with ``H Z`` the Hessian of the step's inner loss ``(1 - alpha) L_CLS + alpha L_MM`` applied to ``Z`` (one
    Hessian-vector product per group and step, batched), ``d_s`` sampled as in ``epoch`` (weighted
    ``mixed_every``, 0 at the other steps), and Adam's ``P`` held as the optimiser has it (its derivative in
    alpha dropped); AdamW's decoupled decay shrinks ``Z`` by ``1 - lr wd``. Every step's forward is
    differentiated twice, so it runs uncompiled and in fp32: the most faithful estimator, and the dearest."""

    groups_count = 2  # two Z per run: their spread gives the SNR, each costs a product per step

    def __init__(self, strategy: LearningBasedStrategy, loop: TrainingLoop) -> None:
        super().__init__(strategy, loop)
        self.tangents: list[list[Tensor]] = []  # the optimiser's momentum (SGD) / first moment (Adam) of each Z
        self._curvature: list[list[Tensor]] | None = None
        if loop.distributed.active:
            raise DmglError("strategy.lb.estimator=forward runs in one process; leave out --nproc or use epoch")

    def epoch_start(self, steps: int, resumed_mid_epoch: bool) -> None:
        super().epoch_start(steps, resumed_mid_epoch)
        if not resumed_mid_epoch and self.settings.horizon == "epoch":
            self.tangents = []

    def takes_graph(self, last_step: bool) -> bool:
        return True

    def needs_full_precision(self) -> bool:
        return True

    def before_backward(self, output: ModelOutput, labels: Tensor, cls_loss: Tensor, mm_loss: Tensor) -> None:
        params = self.hyper_parameters()
        if self.step_in_epoch in self._sampled:
            self._mixed = mixed_gradient(cls_loss, mm_loss, params)
        self._curvature = None
        if self.samples:  # Z is 0 until a sampled step drives it (no device sync to find out)
            alpha = self.strategy.alpha
            inner = (1 - alpha) * cls_loss + alpha * mm_loss
            gradient = torch.autograd.grad(inner, params, create_graph=True, allow_unused=True)
            gradient = [torch.zeros_like(p) if g is None else g for g, p in zip(gradient, params, strict=True)]
            self._curvature = [
                [h.detach() for h in product] for product in hessian_vector_products(gradient, params, self.groups)
            ]

    def after_optimizer_step(self) -> None:
        params = self.hyper_parameters()
        if not self.groups:
            self.groups = [[torch.zeros_like(p) for p in params] for _ in range(self.groups_count)]
            self.tangents = [[torch.zeros_like(p) for p in params] for _ in range(self.groups_count)]
        sampled_group = None
        if self._mixed is not None:
            sampled_group = self.samples % self.groups_count
            self.samples += 1
        optimizer = self.loop.optimizer
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        decay = coupled_weight_decay(optimizer, params)
        adam_like = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        for g, (zs, tangents) in enumerate(zip(self.groups, self.tangents, strict=True)):
            for i, (z, tangent, p) in enumerate(zip(zs, tangents, params, strict=True)):
                group = group_of.get(id(p))
                if group is None:
                    continue
                drive = (decay[i] * z) if decay[i] else torch.zeros_like(z)
                if self._curvature is not None:
                    drive = drive + self._curvature[g][i]
                if g == sampled_group and self._mixed is not None:
                    drive = drive + self.every * self._mixed[i]
                lr = float(group["lr"])
                if adam_like:
                    state = optimizer.state.get(p, {})
                    if "exp_avg_sq" not in state:
                        continue
                    beta1, beta2 = group["betas"]
                    step = int(float(state["step"]))
                    tangent.mul_(beta1).add_(drive, alpha=1 - beta1)
                    denominator = state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step) + group["eps"]
                    if isinstance(optimizer, torch.optim.AdamW) and group["weight_decay"]:
                        z.mul_(1 - lr * group["weight_decay"])
                    z.sub_(tangent / denominator, alpha=lr / (1 - beta1**step))
                else:
                    momentum = float(group.get("momentum", 0.0))
                    if momentum:
                        tangent.mul_(momentum).add_(drive)
                    else:
                        tangent.copy_(drive)
                    z.sub_(tangent, alpha=lr)
        self._mixed, self._curvature = None, None
        self.step_in_epoch += 1

    def epoch_state(self) -> dict[str, Any]:
        return {**super().epoch_state(), "tangents": [[t.clone() for t in group] for group in self.tangents]}

    def load_epoch_state(self, state: dict[str, Any]) -> None:
        super().load_epoch_state(state)
        self.tangents = [[t.to(self.loop.device) for t in group] for group in state.get("tangents", [])]


def _transfer_rule(optimizer: torch.optim.Optimizer, estimator: str):
    """``(c, P)`` for a parameter whose gradient enters the optimiser now, ``remaining`` steps (this one included)
    before the epoch ends: how far (c) and in which preconditioned direction (P, None for 1) it moves the weight by
    then. ``average`` takes the one-step look-ahead ``lr`` alone."""
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    adam_like = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))

    def rule(param: Tensor, remaining: int) -> tuple[float, Tensor | None]:
        group = group_of.get(id(param))
        if group is None:
            return 0.0, None
        lr = float(group["lr"])
        if estimator == "average":
            return lr, None
        if not adam_like:
            momentum = float(group.get("momentum", 0.0))
            if momentum == 0.0:
                return lr, None
            return lr * (1.0 - momentum**remaining) / (1.0 - momentum), None
        state = optimizer.state.get(param, {})
        if "exp_avg_sq" not in state:
            return 0.0, None
        beta1, beta2 = group["betas"]
        step = int(float(state["step"]))  # this step's count (the optimiser has taken it)
        weight = (1 - beta1) * sum(beta1**k / (1 - beta1 ** (step + k)) for k in range(remaining))
        eps = float(group["eps"])
        preconditioner = 1.0 / (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step) + eps)
        return lr * weight, preconditioner

    return rule


def check_ggn(distributed: DistributedContext) -> None:
    """``approx=ggn`` linearises the network at the logits of a cross-entropy (the fused logits of the plain
    classification loss, InfoNCE's similarity logits); ``config.validate`` refuses a loss or method it cannot
    linearise before any run exists. What only the run knows is refused here: several processes."""
    if distributed.active:
        raise DmglError("strategy.lb.approx=ggn runs in one process; leave out --nproc or use approx=identity")


def convex_outputs(output: ModelOutput, labels: Tensor, alpha: float, tau: float):
    """The outputs at which ``ggn`` linearises the network (the fused logits, InfoNCE's similarity logits of each
    pair of modalities) and the inner loss as a function of them, ``(1 - alpha) CE + alpha InfoNCE``, convex."""
    logits = output.logits.float()
    similarities = pairwise_similarities({m: z.float() for m, z in output.embeddings.items()}, tau)

    def loss(values: list[Tensor]) -> Tensor:
        cls = classification_loss(values[0], labels)
        if len(values) == 1:
            return cls
        matching = torch.stack([info_nce_of_similarity(s) for s in values[1:]]).mean()
        return (1 - alpha) * cls + alpha * matching

    return [logits, *similarities], loss
