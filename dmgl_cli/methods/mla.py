"""MLA: multimodal representation learning by alternating unimodal adaptation (Zhang, Yoon, Bansal & Yao, CVPR 2024).

Alternating uni-modal training with a shared head. The model is the encoders and ONE linear head
``h: embed_dim -> classes`` shared by every modality. Each training batch is used once per modality, one after the
other, with an optimiser step each (the loop's ``train_passes`` hook): the step for modality j trains its encoder
and the head on ``CE(h(z_j), y)`` only, so the modalities never compete inside one gradient.

Gradient modification against forgetting. Because the head is shared, a step on modality j could undo what the
head learnt for the others. Before each step (except the very first), the head's weight gradient is projected with
the orthogonal-weight-modification matrix P (initially the identity) that is updated with the batch's mean feature
``r`` of the current modality: ``k = P r``, ``P <- P - k k^T / (a + r^T k)``, ``P <- P / ||P||_F``,
``grad_W <- grad_W P^T``, with ``a = 0.1 ** (1 + batch / batches)`` annealed within each epoch. The authors' code
(``GSPlugin.before_update``) divides ``k k^T`` element-wise by the matrix ``a + k r^T``; this follows the paper's
orthogonal projection, whose denominator is the scalar ``a + r^T k``. The head's bias is not projected (as there).

Test-time fusion. The prediction is an entropy-weighted sum of the uni-modal logits: with ``e_j`` the entropy of
``softmax(h(z_j))`` per sample, ``logits = sum_j softmax_j(-e_j) h(z_j)`` (the code's ``MLA_prediction``); the
per-modality outputs are ``h(z_j)``.

With one modality per step there is no pair of modalities to match, so the paper's L_MM cannot be added: MLA runs
with ``--strategy constant --alpha 0`` only. No settings. Logged per epoch: ``mla_steps_<modality>`` (optimiser
steps the epoch took on that modality), ``mla_fusion_weight_<modality>`` (mean test-time weight on validation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dmgl_cli.errors import DmglError
from dmgl_cli.methods.rebalance_base import RebalanceMethod, autocast_for, split_batches
from dmgl_cli.models import ModelOutput, MultimodalModel, build_model


def entropy_weights(unimodal_logits: dict[str, Tensor]) -> Tensor:
    """Per-sample fusion weights ``softmax_j(-entropy_j)``, shape (modalities, n)."""
    log_probs = torch.stack([torch.log_softmax(z.float(), dim=1) for z in unimodal_logits.values()])
    entropy = -(log_probs.exp() * log_probs).sum(dim=2)
    return torch.softmax(-entropy, dim=0)


class SharedHeadFusion(nn.Module):
    """One linear head applied to every modality's embedding; fused logits by entropy weighting."""

    def __init__(self, modalities: list[str], embed_dim: int, num_classes: int):
        super().__init__()
        self.modalities = list(modalities)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        unimodal = {m: self.head(z) for m, z in embeddings.items()}
        weights = entropy_weights(unimodal)
        stacked = torch.stack([z.float() for z in unimodal.values()])
        return (weights[:, :, None] * stacked).sum(dim=0), unimodal


class MLAMethod(RebalanceMethod):
    """Alternating uni-modal adaptation; see the module docstring."""

    name = "mla"
    strategies = ("constant",)
    per_modality_source = "own"
    defaults: dict[str, Any] = {}

    def __init__(self, config, options: dict[str, Any]):
        super().__init__(config, options)
        self.modalities: list[str] = []
        self.active: str | None = None
        self.projection: Tensor | None = None
        self.steps_taken = 0  # optimiser steps so far (the first one is not projected)
        self.batch = 0  # batch index within the epoch

    @classmethod
    def configure(cls, config) -> None:
        if config.strategy.name != "constant" or config.strategy.alpha != 0:
            given = (f"--strategy {config.strategy.name}" if config.strategy.name != "constant"
                     else f"alpha {config.strategy.alpha}")
            raise DmglError(
                "method 'mla' trains one modality per optimiser step, so there is no pair of modalities to match: "
                f"it runs with --strategy constant --alpha 0 only, got {given}"
            )

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> MultimodalModel:
        if len(modalities) < 2:
            raise DmglError("method 'mla' alternates between modalities and needs at least two")
        self.modalities = list(modalities)
        encoders = build_model(self.config, modalities, num_classes).encoders
        return MultimodalModel(encoders, SharedHeadFusion(self.modalities, self.config.model.embed_dim, num_classes))

    # -- alternating steps ------------------------------------------------------------------------------------
    def train_passes(self) -> tuple[Any, ...]:
        return tuple(self.modalities)

    def start_pass(self, key: Any) -> None:
        if key == self.modalities[0] and self.active is not None:
            self.batch += 1
        self.active = key

    def start_of_epoch(self, model: MultimodalModel, epoch: int) -> None:
        self.batch = 0
        self.active = None

    def forward(self, model: MultimodalModel, inputs: dict[str, Tensor], training: bool) -> ModelOutput:
        if not training or self.active is None:
            return model(inputs)
        z = model.encoders[self.active](inputs[self.active])
        logits = model.fusion.head(z)
        return ModelOutput(logits=logits, unimodal_logits={self.active: logits}, embeddings={self.active: z})

    @torch.no_grad()
    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        weight = model.fusion.head.weight
        if self.projection is None:
            self.projection = torch.eye(weight.shape[1], device=weight.device)
        if self.steps_taken > 0 and weight.grad is not None:
            batches = max(len(self.trainer.train_loader), 1) if self.trainer is not None else 1
            a = 0.1 ** (1.0 + self.batch / batches)
            r = output.embeddings[self.active].detach().float().mean(dim=0, keepdim=True)  # (1, d)
            k = self.projection @ r.T  # (d, 1)
            self.projection = self.projection - (k @ k.T) / (a + float(r @ k))
            self.projection = self.projection / torch.linalg.matrix_norm(self.projection)
            weight.grad.copy_(weight.grad @ self.projection.T.to(weight.grad.dtype))
        self.steps_taken += 1
        self.count(f"mla_steps_{self.active}")

    @torch.no_grad()
    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        was_training = model.training
        model.eval()
        active, self.active = self.active, None
        sums: dict[str, float] = {}
        seen = 0
        for inputs, labels in split_batches(self.trainer, "val"):
            with autocast_for(self.trainer):
                output = model(inputs)
            weights = entropy_weights(output.unimodal_logits)
            for index, modality in enumerate(output.unimodal_logits):
                sums[modality] = sums.get(modality, 0.0) + float(weights[index].sum())
            seen += int(labels.shape[0])
        self.active = active
        model.train(was_training)
        return {**self.epoch_statistics(), **{f"mla_fusion_weight_{m}": s / max(seen, 1) for m, s in sums.items()}}

    def method_state(self) -> dict[str, Any]:
        return {"projection": None if self.projection is None else self.projection.detach().cpu(),
                "steps_taken": self.steps_taken, "batch": self.batch, "active": self.active}

    def load_method_state(self, state: dict[str, Any]) -> None:
        projection = state.get("projection")
        device = self.trainer.device if self.trainer is not None else "cpu"
        self.projection = None if projection is None else projection.to(device)
        self.steps_taken = int(state.get("steps_taken", 0))
        self.batch = int(state.get("batch", 0))
        self.active = state.get("active")
