"""G-Blend: gradient blending (Wang, Tran & Feiszli, CVPR 2020, "What makes training multi-modal classification
networks hard?").

The model is Concat plus one linear classifier per modality on its embedding (uni-modal heads, which are the
per-modality outputs). The classification part of the loss is a weighted blend over the heads k in
{modalities, fused}: ``sum_k w_k CE_k``, with weights that sum to 1. The weights come from each head's
overfitting-to-generalisation ratio over the last *super-epoch* of ``super_epoch`` epochs, measured on the held-out
validation split (V) and the training split (T):

    Delta_G_k = L^V_k(N) - L^V_k(N + n)                        (generalisation: how much V-loss fell)
    Delta_O_k = O_k(N + n) - O_k(N),  O_k = L^V_k - L^T_k        (overfitting: how much the V/T gap grew)
    w_k  proportional to  max(Delta_G_k, 0) / Delta_O_k^2

This is the online form of G-Blend: the weights are re-estimated at every super-epoch boundary, starting from
uniform weights. The losses are measured in eval mode at the boundaries (before the first epoch, then after every
``super_epoch`` epochs) on the validation split and on a fixed random subset of ``train_samples`` samples of the
training split. If no head's ``Delta_G`` is > 0 the previous weights are kept. The authors released no code; the
estimator is the paper's formula, with a floor of 1e-8 on ``Delta_O^2``. The paper measures the losses on
uni-modal and multi-modal models trained for the super-epoch; here the heads of the network being trained give
them, which costs two evaluation passes per super-epoch instead of m + 1 extra trainings.

With an alpha strategy the blend replaces the classification term: ``(1 - alpha) (sum_k w_k CE_k) + alpha L_MM``.
The loop always adds ``(1 - alpha) CE_fused``; the logged extra term ``gblend_blend`` is the difference
``(1 - alpha) ((w_fused - 1) CE_fused + sum_j w_j CE_j)``, so it can be negative.

Settings (``method.options.g-blend.*``): ``super_epoch`` (>= 1, default 1), ``train_samples`` (>= 1, default 2048).
Logged per epoch: ``gblend_weight_<head>`` (``<modality>`` or ``fused``) and ``gblend_updates`` (estimates so far).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dmgl_cli.methods.rebalance_base import AuxHeadsModel, RebalanceMethod, autocast_for, split_batches
from dmgl_cli.models import ModelOutput, MultimodalModel, build_model

FUSED = "fused"


class GBlendMethod(RebalanceMethod):
    """Online gradient blending; see the module docstring."""

    name = "g-blend"
    per_modality_source = "own"
    defaults: dict[str, Any] = {"super_epoch": 1, "train_samples": 2048}

    def __init__(self, config, options: dict[str, Any]):
        super().__init__(config, options)
        self.weights: dict[str, float] = {}
        self.reference: dict[str, dict[str, float]] = {}  # losses at the last super-epoch boundary
        self.updates = 0

    def check(self) -> None:
        super().check()
        self.super_epoch = self.setting_int("super_epoch", 1)
        self.train_samples = self.setting_int("train_samples", 1)

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> MultimodalModel:
        concat = build_model(self.config, modalities, num_classes)
        return AuxHeadsModel(concat.encoders, concat.fusion, self.config.model.embed_dim, num_classes)

    def heads(self, model: MultimodalModel) -> list[str]:
        return [*model.modalities, FUSED]

    @torch.no_grad()
    def head_losses(self, model: MultimodalModel, split: str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        seen = 0
        limit = self.train_samples if split == "train" else None
        for inputs, labels in split_batches(self.trainer, split, limit, seed=self.trainer.config.data.split_seed):
            with autocast_for(self.trainer):
                output = model(inputs)
            logits = {**output.unimodal_logits, FUSED: output.logits}
            for head, z in logits.items():
                totals[head] = totals.get(head, 0.0) + float(F.cross_entropy(z.float(), labels, reduction="sum"))
            seen += int(labels.shape[0])
        model.train(was_training)
        return {head: total / max(seen, 1) for head, total in totals.items()}

    def _measure(self, model: MultimodalModel) -> dict[str, dict[str, float]]:
        return {"val": self.head_losses(model, "val"), "train": self.head_losses(model, "train")}

    def start_of_epoch(self, model: MultimodalModel, epoch: int) -> None:
        if not self.weights:
            heads = self.heads(model)
            self.weights = {h: 1.0 / len(heads) for h in heads}
        if not self.reference:
            self.reference = self._measure(model)

    def estimate(self, before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, float] | None:
        """Blending weights from two measurements, or None when no head generalised better."""
        raw = {}
        for head in before["val"]:
            gain = before["val"][head] - after["val"][head]
            overfit = (after["val"][head] - after["train"][head]) - (before["val"][head] - before["train"][head])
            raw[head] = max(gain, 0.0) / max(overfit * overfit, 1e-8)
        total = sum(raw.values())
        if total <= 0:
            return None
        return {head: value / total for head, value in raw.items()}

    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        if epoch % self.super_epoch == 0:
            now = self._measure(model)
            weights = self.estimate(self.reference, now)
            if weights is not None:
                self.weights = weights
                self.updates += 1
            self.reference = now
        metrics = {f"gblend_weight_{head}": w for head, w in self.weights.items()}
        return {**self.epoch_statistics(), **metrics, "gblend_updates": float(self.updates)}

    def extra_losses(self, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> dict[str, Tensor]:
        keep = 1.0 - float(step["alpha"])
        blend = (self.weights[FUSED] - 1.0) * F.cross_entropy(output.logits.float(), labels)
        for modality, logits in output.unimodal_logits.items():
            blend = blend + self.weights[modality] * F.cross_entropy(logits.float(), labels)
        return {"gblend_blend": keep * blend}

    def method_state(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "reference": {k: dict(v) for k, v in self.reference.items()},
                "updates": self.updates}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.weights = {k: float(v) for k, v in state.get("weights", {}).items()}
        self.reference = {k: {h: float(x) for h, x in v.items()} for k, v in state.get("reference", {}).items()}
        self.updates = int(state.get("updates", 0))
