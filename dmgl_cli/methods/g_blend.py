"""G-Blend: gradient blending (Wang, Tran & Feiszli, CVPR 2020, "What makes training multi-modal classification
networks hard?"), Algorithm 2 (offline / online Gradient-Blending).

The authors released no code. This follows the G-Blend of BalanceBenchmark (github.com/GeWu-Lab/BalanceBenchmark),
used as the reference implementation: ``balancemm/trainer/GBlending_trainer.py``, ``GBlendingTrainer.fit`` (when
to estimate), ``GBlendingTrainer.super_epoch_origin`` (the estimate) and ``GBlendingTrainer.training_step`` (the
blended loss); ``balancemm/models/avclassify_model.py``, ``BaseClassifierModel.forward`` (``padding``: the inputs
of the modalities left out are zeros) and ``unimodality_calculate`` (the per-modality outputs are Concat's head
split); ``balancemm/train.py`` (a temporary model and optimiser for the estimate); ``configs/trainer_config.yaml``
(``GBlending``: online, ``super_epoch`` 10).

The model is plain Concat. Its heads are k in {each modality, fused}: a modality's logits are Concat's head split
(``W_k z_k + b / M``), the fused logits are the head's output. Training minimises the blend
``sum_k w_k CE_k`` with weights that sum to 1.

The weights are estimated before the first epoch and then every ``super_epoch`` epochs (before epochs
1, 1 + S, 1 + 2S, ...), from the checkpoint the real model has reached. For every head k a temporary copy is made:
a deep copy of the model with a fresh optimiser of the run's class and settings (its base learning rate, no
scheduler, no state), trained for ``copy_epochs`` epochs on the cross-entropy of its fused output alone (plain
Concat training). The copy of a modality sees that modality only: the inputs of the other modalities are replaced
by zeros, in training and validation; the copy of ``fused`` sees every modality. The copy records

* ``train_first`` / ``train_last``: its training loss during its first / last epoch (the running loss of the
  batches it trained on, in train mode), and
* ``val_first`` / ``val_last``: its validation loss (eval mode) after its first / last epoch,

each as the sum over batches of the batch-mean cross-entropy (the reference's sums; ``loss_reduction: mean`` gives
per-sample means instead). Then, with the paper's definitions as the reference implements them,

    Delta_G_k = val_first - val_last                                        (generalisation gained)
    Delta_O_k = (val_last - train_last) - (val_first - train_first)         (overfitting gained)
    w_k = |Delta_G_k| / Delta_O_k^2,   normalised to sum 1.

The copies are thrown away; the real model and its optimiser are never touched (the copies share no tensor with
them). Each copy draws the batches the real run will draw in the coming epochs (the run's sampler seed, epochs
``N .. N + copy_epochs - 1``) and runs under a forked random state seeded from (run seed, epoch, head), so the
estimate is the same in a resumed run and the real run's random stream does not move.

Cost: each estimate trains M + 1 copies for ``copy_epochs`` epochs; with the defaults (10 and 10) that is M + 1
extra trainings of the same length as the run. ``copy_batches`` (ours) caps the batches of a copy epoch.

Differences from the paper, inherited from the reference: the uni-modal models are the multimodal network with
the other inputs zeroed (the paper trains separate uni-modal networks), the per-modality heads are Concat's head
split (not separate classifiers), the first measurement is taken after the copies' first epoch (not at the
checkpoint), losses are sums over batches, and ``|Delta_G|`` is used (a head whose validation loss rose still gets
a positive weight).

Deviations from the reference code:

* the copies train for ``copy_epochs`` epochs, a setting of its own (the reference trains them for ``super_epoch``
  epochs; both default to 10, so the defaults agree). ``copy_epochs`` must be >= 2: with one epoch the reference's
  first and last measurements coincide and its estimate is meaningless;
* ``mode: offline`` estimates once, before epoch 1, with copies trained for ``train.epochs`` epochs as in the
  reference, unless ``copy_epochs`` is given explicitly;
* ``Delta_O^2`` is floored at 1e-12 and an estimate in which no head has a finite, non-zero weight is skipped (the
  previous weights stay; uniform ones if it was the first): the reference divides by zero and gets inf / NaN;
* the copies' batch order and random state are seeded as above (the reference continues its shared loader and the
  global random state), and they apply ``optim.grad_clip`` and bf16 autocast like the real run (the reference has
  neither, in either loop);
* with an alpha strategy the blend replaces the classification term: ``(1 - alpha) sum_k w_k CE_k + alpha L_MM``
  (the published method is ``--strategy constant --alpha 0``, the reference's loss). The loop always adds
  ``(1 - alpha) CE_fused``; the logged extra term ``gblend_blend`` is the difference
  ``(1 - alpha) ((w_fused - 1) CE_fused + sum_j w_j CE_j)``, so it can be negative;
* ``copy_batches`` and ``loss_reduction: mean`` are ours (their defaults, 0 = whole epochs and ``batch-sum``, are
  the reference's).

Settings (``method.options.g-blend.*``): ``mode`` (online | offline, default online), ``super_epoch`` (>= 1,
default 10), ``copy_epochs`` (>= 2, default 10), ``copy_batches`` (>= 0, default 0 = all), ``loss_reduction``
(batch-sum | mean, default batch-sum).
Logged per epoch: ``gblend_weight_<head>`` (``<modality>`` or ``fused``; the weights of that epoch),
``gblend_updates`` (estimates so far) and, in an epoch that began with an estimate, ``gblend_generalisation_<head>``
(Delta_G) and ``gblend_overfitting_<head>`` (Delta_O). The last estimate's recorded losses are in the checkpoint
(method state ``last_estimate``).
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dmgl_cli.catalogue.options import GBlendOptions
from dmgl_cli.data.loader import make_loader
from dmgl_cli.distributed import batch_rows_of
from dmgl_cli.methods.rebalance_base import SEEN, RebalanceMethod, autocast_for, distributed_of, split_batches
from dmgl_cli.models import ModelOutput, MultimodalModel

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config

FUSED = "fused"
# Keeps w = |Delta_G| / Delta_O^2 finite when a head's overfitting did not change at all.
MIN_OVERFIT_SQUARED = 1e-12


def blend_weights(
    losses: dict[str, dict[str, float]],
) -> tuple[dict[str, float] | None, dict[str, float], dict[str, float]]:
    """(weights, Delta_G, Delta_O) per head from the copies' recorded losses; weights is None when no head has a
    finite, non-zero weight."""
    gains, overfits, raw = {}, {}, {}
    for head, loss in losses.items():
        gains[head] = loss["val_first"] - loss["val_last"]
        overfits[head] = (loss["val_last"] - loss["train_last"]) - (loss["val_first"] - loss["train_first"])
        raw[head] = abs(gains[head]) / max(overfits[head] ** 2, MIN_OVERFIT_SQUARED)
    total = sum(raw.values())
    if not math.isfinite(total) or total <= 0:
        return None, gains, overfits
    return {head: value / total for head, value in raw.items()}, gains, overfits


def fresh_optimizer(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """A new optimiser of ``optimizer``'s class built with the same settings (its base learning rate), no state."""
    accepted = inspect.signature(type(optimizer)).parameters
    # ``defaults`` also holds values the constructor derives itself (AdamW's decoupled_weight_decay).
    settings = {key: value for key, value in optimizer.defaults.items() if key in accepted}
    return type(optimizer)(groups, **settings)


def keep_only(inputs: dict[str, Tensor], kept: set[str]) -> dict[str, Tensor]:
    """The batch with the inputs of the modalities not in ``kept`` replaced by zeros."""
    return {m: x if m in kept else torch.zeros_like(x) for m, x in inputs.items()}


class GBlendMethod(RebalanceMethod, method="g-blend"):
    """Gradient blending with weights from temporary copies; see the module docstring."""

    options: GBlendOptions

    def __init__(self, config: Config, options: GBlendOptions):
        super().__init__(config, options)
        self.weights: dict[str, float] = {}
        self.updates = 0
        # {"epoch": the epoch it was made before, "losses": {head: {train_first, val_first, train_last, val_last}}}
        self.last_estimate: dict[str, Any] = {}
        # offline: one estimate, before the first epoch
        self.super_epoch = max(config.train.epochs, 1) if options.mode == "offline" else options.super_epoch
        self.copy_epochs = options.copies_epochs(config)

    def heads(self, model: MultimodalModel) -> list[str]:
        return [*model.modalities, FUSED]

    # -- the estimate ---------------------------------------------------------------------------------------------
    def start_of_epoch(self, model: MultimodalModel, epoch: int) -> None:
        if (epoch - 1) % self.super_epoch == 0:
            self.estimate(model, epoch)
        if not self.weights:  # the first estimate was skipped (see blend_weights)
            heads = self.heads(model)
            self.weights = {head: 1.0 / len(heads) for head in heads}

    def estimate(self, model: MultimodalModel, epoch: int) -> None:
        """Train the temporary copies from ``model`` and set the weights from their losses."""
        losses = self.copy_losses(model, epoch)
        self.last_estimate = {"epoch": epoch, "losses": losses}
        weights, _, _ = blend_weights(losses)
        if weights is not None:
            self.weights = weights
            self.updates += 1

    def copy_losses(self, model: MultimodalModel, epoch: int) -> dict[str, dict[str, float]]:
        trainer = self.trainer
        assert trainer is not None  # attached before the first epoch starts
        # The real run's sampler (same seed, drop_last), so copy epoch e draws the batches of real epoch N + e.
        split = trainer.splits.train
        if distributed_of(trainer).active:  # this rank's slice of each of those batches: the copies train data-parallel
            split = trainer.this_ranks_part(split, trainer.config.train.batch_size)
        loader = make_loader(
            split,
            trainer.config.train.batch_size,
            shuffle=True,
            seed=trainer.seed,
            drop_last=True,
            num_workers=trainer.config.data.num_workers,
            pin_memory=trainer.device.type == "cuda",
        )
        return {
            head: self.train_copy(model, head, index, loader, epoch) for index, head in enumerate(self.heads(model))
        }

    def train_copy(self, model: MultimodalModel, head: str, index: int, loader, epoch: int) -> dict[str, float]:
        """The four losses of ``head``'s copy of ``model``, trained for ``copy_epochs`` epochs."""
        trainer = self.trainer
        assert trainer is not None  # attached before the first epoch starts
        kept = set(model.modalities) if head == FUSED else {head}
        replica = copy.deepcopy(model)
        for parameter in replica.parameters():
            parameter.grad = None
        optimizer = fresh_optimizer(trainer.optimizer, self.param_groups(replica))
        seed = int(np.random.SeedSequence([trainer.seed, epoch, index]).generate_state(1)[0])
        record: dict[str, float] = {}
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for copy_epoch in range(self.copy_epochs):
                train_loss = self._train_copy_epoch(replica, optimizer, loader, kept, epoch - 1 + copy_epoch)
                if copy_epoch in (0, self.copy_epochs - 1):
                    which = "first" if copy_epoch == 0 else "last"
                    record[f"train_{which}"] = train_loss
                    record[f"val_{which}"] = self._copy_val_loss(replica, kept)
        return record

    def _reduce(self, total: float, samples: int) -> float:
        return total if self.options.loss_reduction == "batch-sum" else total / max(samples, 1)

    def _train_copy_epoch(
        self, replica: MultimodalModel, optimizer, loader, kept: set[str], sampler_epoch: int
    ) -> float:
        trainer = self.trainer
        assert trainer is not None  # attached before the first epoch starts
        replica.train()
        loader.batch_sampler.set_epoch(sampler_epoch)
        total = torch.zeros((), device=trainer.device)  # summed on the device: one host sync per epoch
        batches = samples = 0
        non_blocking = trainer.device.type == "cuda"
        for batch in loader:
            if self.options.copy_batches and batches >= self.options.copy_batches:
                break
            inputs = {m: t.to(trainer.device, non_blocking=non_blocking) for m, t in batch["inputs"].items()}
            labels = batch["labels"].to(trainer.device, non_blocking=non_blocking)
            with autocast_for(trainer):
                logits = replica(keep_only(inputs, kept)).logits
            # data-parallel: the loss of the whole global batch on every rank, gradients averaged (distributed.py)
            logits, labels = distributed_of(trainer).gather_rows([logits, labels], batch_rows_of(batch))
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed_of(trainer).average_gradients(list(replica.parameters()), stop_requested=False)
            if trainer.config.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(replica.parameters(), trainer.config.optim.grad_clip)
            optimizer.step()
            size = int(labels.shape[0])
            total += loss.detach() * (1 if self.options.loss_reduction == "batch-sum" else size)
            batches, samples = batches + 1, samples + size
        return self._reduce(float(total), samples)

    @torch.no_grad()
    def _copy_val_loss(self, replica: MultimodalModel, kept: set[str]) -> float:
        replica.eval()
        total = 0.0
        samples = 0
        for inputs, labels in split_batches(self.trainer, "val", shard=True):
            with autocast_for(self.trainer):
                logits = replica(keep_only(inputs, kept)).logits
            loss = float(F.cross_entropy(logits.float(), labels))
            size = int(labels.shape[0])
            total += loss if self.options.loss_reduction == "batch-sum" else loss * size
            samples += size
        replica.train()
        # data-parallel: each rank scored its share of the batches
        totals = distributed_of(self.trainer).sum_values({"total": total, SEEN: float(samples)})
        return self._reduce(totals["total"], int(totals[SEEN]))

    # -- training ------------------------------------------------------------------------------------------------
    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        metrics = {f"gblend_weight_{head}": weight for head, weight in self.weights.items()}
        metrics["gblend_updates"] = float(self.updates)
        if self.last_estimate.get("epoch") == epoch:
            _, gains, overfits = blend_weights(self.last_estimate["losses"])
            for head in gains:
                if math.isfinite(gains[head]) and math.isfinite(overfits[head]):
                    metrics[f"gblend_generalisation_{head}"] = gains[head]
                    metrics[f"gblend_overfitting_{head}"] = overfits[head]
        return {**self.epoch_statistics(), **metrics}

    def extra_losses(self, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> dict[str, Tensor]:
        keep = 1.0 - float(step["alpha"])
        blend = (self.weights[FUSED] - 1.0) * F.cross_entropy(output.logits.float(), labels)
        for modality, logits in output.unimodal_logits.items():
            blend = blend + self.weights[modality] * F.cross_entropy(logits.float(), labels)
        return {"gblend_blend": keep * blend}

    # -- state ---------------------------------------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        estimate = {}
        if self.last_estimate:
            estimate = {
                "epoch": int(self.last_estimate["epoch"]),
                "losses": {h: dict(v) for h, v in self.last_estimate["losses"].items()},
            }
        return {"weights": dict(self.weights), "updates": self.updates, "last_estimate": estimate}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.weights = {k: float(v) for k, v in state.get("weights", {}).items()}
        self.updates = int(state.get("updates", 0))
        estimate = state.get("last_estimate") or {}
        self.last_estimate = {}
        if estimate:
            self.last_estimate = {
                "epoch": int(estimate["epoch"]),
                "losses": {h: {k: float(x) for k, x in v.items()} for h, v in estimate["losses"].items()},
            }
