"""MSES: modality-specific early stopping (Fujimori et al., ACPR 2019).

Each modality is early-stopped on its own: after every epoch its validation loss — the cross-entropy of its
per-modality logits (Concat's head split) on the validation split — is smoothed, and once it has not improved for
more than ``patience`` epochs the modality's encoder is frozen for the rest of training (its gradients are dropped
after backward, so neither the optimiser step nor momentum nor weight decay moves it) and, with ``restore_best``,
put back to its state at its best epoch, together with its columns of the fusion head, before the next epoch. The fusion head itself keeps
training on the frozen features, and training goes on while any modality is still learning.

The paper leaves the monitored quantity and the stopping rule open; they follow the MSES baseline in the code of
AGM (Li et al., ICCV 2023; github.com/lihong2303/AGM_ICCV2023), which the comparison tables of this line of work
reuse: per-modality validation loss, smoothed as ``0.6 * previous raw loss + 0.4 * current raw loss``, patience 10,
restore the best epoch's weights. That code restores the whole model (and optimiser) when a modality stops; here
only the stopped modality's branch is restored, so the other modalities keep what they learnt since.

Settings (``method.options.mses.*``): ``patience`` (>= 0, default 10), ``min_delta`` (>= 0, default 0: the
smallest decrease that counts as an improvement), ``restore_best`` (default true).
Logged per epoch: ``mses_frozen_<modality>`` (1 once frozen), ``mses_val_loss_<modality>`` (smoothed),
``mses_stop_epoch_<modality>`` once stopped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dmgl_cli.errors import DmglError
from dmgl_cli.methods.rebalance_base import (
    RebalanceMethod,
    autocast_for,
    concat_head,
    encoder_parameters,
    head_columns,
    split_batches,
)
from dmgl_cli.models import ModelOutput, MultimodalModel


class MSESMethod(RebalanceMethod):
    """Modality-specific early stopping; see the module docstring."""

    name = "mses"
    defaults: dict[str, Any] = {"patience": 10, "min_delta": 0.0, "restore_best": True}

    def __init__(self, config, options: dict[str, Any]):
        super().__init__(config, options)
        self.frozen: dict[str, int] = {}  # modality -> epoch it stopped at
        self.previous_raw: dict[str, float] = {}
        self.best_loss: dict[str, float] = {}
        self.best_epoch: dict[str, int] = {}
        self.best_branch: dict[str, dict[str, Tensor]] = {}  # the branch's weights at its best epoch
        self.pending_restore: list[str] = []

    def check(self) -> None:
        super().check()
        self.patience = self.setting_int("patience", 0)
        self.min_delta = self.setting_float("min_delta", 0.0)
        if not isinstance(self.settings["restore_best"], bool):
            raise DmglError(f"{self.key('restore_best')} must be true or false, got {self.settings['restore_best']!r}")
        self.restore_best = self.settings["restore_best"]

    @torch.no_grad()
    def _validation_losses(self, model: MultimodalModel) -> dict[str, float]:
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        seen = 0
        for inputs, labels in split_batches(self.trainer, "val"):
            with autocast_for(self.trainer):
                output = self.forward(model, inputs, training=False)
            for modality, logits in output.unimodal_logits.items():
                loss = F.cross_entropy(logits.float(), labels, reduction="sum")
                totals[modality] = totals.get(modality, 0.0) + float(loss)
            seen += int(labels.shape[0])
        model.train(was_training)
        return {m: total / max(seen, 1) for m, total in totals.items()}

    def _branch(self, model: MultimodalModel, modality: str) -> dict[str, Tensor]:
        state = {f"encoder.{k}": v.detach().cpu().clone() for k, v in model.encoders[modality].state_dict().items()}
        state["head_columns"] = concat_head(model).head.weight[:, head_columns(model, modality)].detach().cpu().clone()
        return state

    @torch.no_grad()
    def _restore(self, model: MultimodalModel, modality: str) -> None:
        saved = self.best_branch[modality]
        encoder_state = {k[len("encoder."):]: v for k, v in saved.items() if k.startswith("encoder.")}
        model.encoders[modality].load_state_dict(encoder_state)
        weight = concat_head(model).head.weight
        weight[:, head_columns(model, modality)] = saved["head_columns"].to(weight.device, weight.dtype)

    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        raw = self._validation_losses(model)
        metrics = {}
        for modality, loss in raw.items():
            smoothed = loss if modality not in self.previous_raw else 0.6 * self.previous_raw[modality] + 0.4 * loss
            self.previous_raw[modality] = loss
            metrics[f"mses_val_loss_{modality}"] = smoothed
            if modality in self.frozen:
                continue
            if modality not in self.best_loss or smoothed < self.best_loss[modality] - self.min_delta:
                self.best_loss[modality], self.best_epoch[modality] = smoothed, epoch
                if self.restore_best:
                    self.best_branch[modality] = self._branch(model, modality)
            elif epoch - self.best_epoch[modality] > self.patience:
                self.frozen[modality] = epoch
                if self.restore_best:
                    # Restored before the next epoch, not now: this epoch's scores and checkpoints stay consistent.
                    self.pending_restore.append(modality)
        for modality in raw:
            metrics[f"mses_frozen_{modality}"] = float(modality in self.frozen)
            if modality in self.frozen:
                metrics[f"mses_stop_epoch_{modality}"] = float(self.frozen[modality])
        return {**self.epoch_statistics(), **metrics}

    def start_of_epoch(self, model: MultimodalModel, epoch: int) -> None:
        for modality in self.pending_restore:
            self._restore(model, modality)
        self.pending_restore = []

    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        for modality in self.frozen:
            for param in encoder_parameters(model, modality):
                param.grad = None

    def method_state(self) -> dict[str, Any]:
        return {"frozen": dict(self.frozen), "previous_raw": dict(self.previous_raw), "best_loss": dict(self.best_loss),
                "best_epoch": dict(self.best_epoch), "best_branch": {m: dict(b) for m, b in self.best_branch.items()},
                "pending_restore": list(self.pending_restore)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.frozen = {k: int(v) for k, v in state.get("frozen", {}).items()}
        self.previous_raw = {k: float(v) for k, v in state.get("previous_raw", {}).items()}
        self.best_loss = {k: float(v) for k, v in state.get("best_loss", {}).items()}
        self.best_epoch = {k: int(v) for k, v in state.get("best_epoch", {}).items()}
        self.best_branch = {m: dict(b) for m, b in state.get("best_branch", {}).items()}
        self.pending_restore = [str(m) for m in state.get("pending_restore", [])]
