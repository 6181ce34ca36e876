"""ML-LSTM: multi-layer LSTM fusion (Nie, Yan, Song & Wang, Multimedia Tools and Applications 2021).

Our reconstruction (no public code): the authors released none. Nie et al. fuse modality features with stacked
LSTM layers over a sequence of utterances per video; the datasets here have one clip per label, and the DMGL paper,
which lists ML-LSTM in its tables, does not describe its adaptation.

Choices that are ours: the LSTM runs over the sequence of modality embeddings, one step per modality in the
dataset's modality order::

    h = LSTM_L(...LSTM_1([z_1, z_2, ..., z_m]))      # `layers` stacked layers, hidden size `hidden`
    logits = W h_m + b                                # the top layer's state after the last modality

so every modality's features pass through every layer, and the fused state carries the interactions the
recurrence builds; the classifier is one linear layer on that last state; ``layers = 2``, ``hidden =
model.embed_dim``, no dropout between layers. ML-LSTM has no per-modality predictions: per-modality scores come
from linear probes on the detached embeddings (``per_modality_source = "probe"``), trained with their own Adam at
``probe_lr`` and never touching the model.

Settings (``method.options.ml-lstm.*``): ``layers`` (2, stacked LSTM layers), ``hidden`` (null = model.embed_dim),
``dropout`` (0.0, between LSTM layers), ``probe_lr`` (1e-3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dmgl_cli.catalogue.options import MLLSTMOptions
from dmgl_cli.methods.fusion_base import (
    FusionMethod,
    FusionModel,
    LinearProbes,
    encoders_for,
)

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config


class LSTMFusion(nn.Module):
    def __init__(
        self, modalities: list[str], embed_dim: int, num_classes: int, layers: int, hidden: int, dropout: float
    ):
        super().__init__()
        self.modalities = list(modalities)
        self.lstm = nn.LSTM(
            embed_dim, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0
        )
        self.head = nn.Linear(hidden, num_classes)
        self.probes = LinearProbes(self.modalities, embed_dim, num_classes)

    def forward(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
        sequence = torch.stack([embeddings[m] for m in self.modalities], dim=1)  # [batch, modalities, embed_dim]
        states, _ = self.lstm(sequence)
        return self.head(states[:, -1]), self.probes(embeddings), {}


class MLLSTMMethod(FusionMethod, method="ml-lstm"):
    """Stacked LSTM over the modality embeddings. Settings: ``layers`` (2), ``hidden`` (embed_dim), ``dropout`` (0),
    ``probe_lr`` (1e-3)."""

    options: MLLSTMOptions

    def __init__(self, config: Config, options: MLLSTMOptions):
        super().__init__(config, options)
        self.probe_lr = options.probe_lr

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> FusionModel:
        embed_dim = self.config.model.embed_dim
        fusion = LSTMFusion(
            list(modalities),
            embed_dim,
            num_classes,
            self.options.layers,
            self.options.hidden or embed_dim,
            float(self.options.dropout),
        )
        return FusionModel(encoders_for(self.config, modalities, num_classes), fusion)
