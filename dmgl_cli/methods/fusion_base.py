"""Shared pieces of the fusion baselines (§4.1 "traditional MML"): Sum, Weight, Affine, Channel, ML-LSTM, ETMC,
and the uni-modal rows.

Every fusion method keeps the foundation's encoders (built by :func:`dmgl_cli.models.build_model`, so a recipe's
encoder settings mean the same for every row of Table 1) and swaps what sits after them. Its fusion module returns
``(logits, unimodal_logits, extras)``; ``extras`` carries the tensors that make the method's mechanism visible
(attention weights, FiLM scales, MMTM gates, Dirichlet parameters). The embeddings the encoders produce are the
same size for every modality, so the paper's matching loss L_MM can be added to any of them with ``--strategy``.

Per-modality scores. Every method reports the same per-modality metrics and gap as Concat. Where a method has its
own uni-modal outputs (Sum's and Weight's per-modality heads, MMTM's per-stream classifiers, ETMC's per-view
opinions, the uni-modal rows) those are scored (its catalogue entry's ``per_modality_source="own"``). Where it has
none (FiLM, ML-LSTM) a linear probe per modality is trained online on the *detached* embeddings (``"probe"``): it
has its own Adam optimiser stepped in ``after_backward`` and its gradients are cleared before the main step, so it
never changes the encoders, the main optimiser's state, gradient clipping or the logged training loss. The run
records which source was used as the tag ``dmgl.per_modality_scores``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmgl_cli.catalogue import MethodOptions
from dmgl_cli.methods.base import Method
from dmgl_cli.models import ModelOutput, MultimodalModel, build_model

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config


@dataclass
class FusionOutput(ModelOutput):
    # Method-specific tensors of the forward pass (attention weights, gates, Dirichlet parameters, ...).
    extras: dict[str, Any] = field(default_factory=dict)


class FusionModel(MultimodalModel):
    """The foundation's encoders followed by a fusion module returning ``(logits, unimodal_logits, extras)``."""

    def forward(self, inputs: dict[str, Tensor]) -> FusionOutput:
        embeddings = self.encode(inputs)
        logits, unimodal, extras = self.fusion(embeddings)
        return FusionOutput(logits=logits, unimodal_logits=unimodal, embeddings=embeddings, extras=extras)


class LinearProbes(nn.Module):
    """One linear classifier per modality on detached embeddings: per-modality scores without touching the model."""

    def __init__(self, modalities: list[str], embed_dim: int, num_classes: int):
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(embed_dim, num_classes) for m in modalities})

    def forward(self, embeddings: dict[str, Tensor]) -> dict[str, Tensor]:
        # float(): the probe step runs outside autocast, on embeddings that may be bf16.
        return {m: head(embeddings[m].detach().float()) for m, head in self.heads.items()}


def encoders_for(config: Config, modalities: dict[str, dict[str, Any]], num_classes: int) -> nn.ModuleDict:
    """The encoders the foundation would build for this config (one source of truth for encoder settings)."""
    return build_model(config, modalities, num_classes).encoders


class FusionMethod(Method):
    """A method that replaces Concat's head; subclasses build their model.

    ``self.options`` holds the method's checked settings (its catalogue entry's options dataclass). Per-epoch
    statistics of the training steps (mean attention weight,
    mean gate, Dirichlet strength, ...) are gathered on the device with :meth:`track` and logged at epoch end.
    """

    probe_lr = 1e-3  # the learning rate of the linear probes (methods whose per-modality scores are probes)

    def __init__(self, config: Config, options: MethodOptions):
        super().__init__(config, options)
        self._sums: dict[str, Tensor] = {}
        self._steps = 0
        self._probe_optimizer: torch.optim.Optimizer | None = None
        self._probe_state: dict[str, Any] | None = None

    # -- statistics ------------------------------------------------------------------------------------------
    def track(self, values: dict[str, Tensor]) -> None:
        """Add one training step's statistics (0-dim tensors; stay on the device, no host sync)."""
        for name, value in values.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._steps += 1

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        self._sums, self._steps = {}, 0

    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        steps = max(self._steps, 1)
        return {name: float(total) / steps for name, total in self._sums.items()}

    # -- probes ----------------------------------------------------------------------------------------------
    def probe_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        probes = getattr(model.fusion, "probes", None) if hasattr(model, "fusion") else None
        return list(probes.parameters()) if probes is not None else []

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        probe_ids = {id(p) for p in self.probe_parameters(model)}
        return [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in probe_ids]}]

    def _probes_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self._probe_optimizer is None:
            self._probe_optimizer = torch.optim.Adam(self.probe_parameters(model), lr=self.probe_lr)
            if self._probe_state is not None:
                self._probe_optimizer.load_state_dict(self._probe_state)
                self._probe_state = None
        return self._probe_optimizer

    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        if self.per_modality_source != "probe":
            return
        optimizer = self._probes_optimizer(model)
        optimizer.zero_grad(set_to_none=True)
        # Recomputed from the (detached) embeddings: a fresh graph, whatever the main backward freed.
        probes = model.fusion.probes
        assert isinstance(probes, LinearProbes)  # what every "probe" method's fusion carries (affine, ml-lstm)
        probe_logits = probes(output.embeddings)
        probe_loss = torch.stack([F.cross_entropy(logits, labels) for logits in probe_logits.values()]).mean()
        probe_loss.backward()
        optimizer.step()
        # Cleared so that gradient clipping of the main step never sees the probes.
        optimizer.zero_grad(set_to_none=True)
        self.track({"probe_loss": probe_loss})

    def state_dict(self) -> dict[str, Any]:
        if self._probe_optimizer is not None:
            return {"probe_optimizer": self._probe_optimizer.state_dict()}
        return {"probe_optimizer": self._probe_state} if self._probe_state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("probe_optimizer") is not None:
            self._probe_state = state["probe_optimizer"]
            self._probe_optimizer = None
