"""The hooks a method may use on the one shared training loop.

The paper's method is the default ``concat`` model trained with an alpha strategy; a baseline (issue: the
16 comparison methods) is a subclass of :class:`Method` that overrides only the hooks it needs. The trainer calls
every hook in the same place for every method, so adding a method never forks the loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dmgl_cli.models import ModelOutput, MultimodalModel, build_model


class Method:
    name = "base"
    # Strategies this method can be combined with; None means all of them.
    strategies: tuple[str, ...] | None = None
    # Whether L_MM is computed (methods with a single modality have nothing to match).
    uses_matching = True

    def __init__(self, config, options: dict[str, Any]):
        self.config = config
        self.options = options

    # -- construction --------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse a configuration this method cannot run (raise DmglError)."""

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> MultimodalModel:
        return build_model(self.config, modalities, num_classes)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimiser parameter groups (per-modality learning rates go here)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    # -- training step -------------------------------------------------------------------------------------------
    def forward(self, model: MultimodalModel, inputs: dict[str, Tensor], training: bool) -> ModelOutput:
        return model(inputs)

    def extra_losses(self, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> dict[str, Tensor]:
        """Loss terms added to (1 - alpha) L_CLS + alpha L_MM, by name (each is logged)."""
        return {}

    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        """Modify gradients between backward and the optimiser step (gradient modulation)."""

    # -- epochs --------------------------------------------------------------------------------------------------
    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        pass

    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        """Return extra metrics to log for the epoch."""
        return {}

    # -- evaluation ----------------------------------------------------------------------------------------------
    def predict(self, output: ModelOutput) -> Tensor:
        """Fused logits used for scoring (test-time fusion rules go here)."""
        return output.logits

    # -- state (checkpointed for exact resume; plain containers and tensors only) --------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ConcatMethod(Method):
    """Feature concatenation (§3.1) — with ``--strategy constant --alpha 0`` plain Concat, with ``heuristic`` or
    ``lb`` the paper's Ours-H / Ours-LB."""

    name = "concat"
