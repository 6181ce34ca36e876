"""Sum: prediction summation (§4.1) — one linear head per modality, the fused logits are their sum.

``logits = sum_j (W_j z_j + b_j)``. The paper does not say whether predictions are summed before or after the
softmax; this follows the balanced-multimodal-learning code the paper builds on (``SumFusion`` of OGM-GE, Peng et
al. CVPR 2022: ``fc_x(x) + fc_y(y)``), which sums logits and trains on the cross-entropy of the sum only. Each
modality's own head is its per-modality prediction (``per_modality_source = "own"``). No settings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dmgl_cli.methods.fusion_base import FusionMethod, FusionModel, encoders_for


class SumFusion(nn.Module):
    def __init__(self, modalities: list[str], embed_dim: int, num_classes: int):
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(embed_dim, num_classes) for m in modalities})

    def forward(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
        unimodal = {m: head(embeddings[m]) for m, head in self.heads.items()}
        return torch.stack(list(unimodal.values())).sum(dim=0), unimodal, {}


class SumMethod(FusionMethod, method="sum"):
    """Sum of per-modality logits (OGM-GE's SumFusion). No settings."""

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> FusionModel:
        encoders = encoders_for(self.config, modalities, num_classes)
        return FusionModel(encoders, SumFusion(list(modalities), self.config.model.embed_dim, num_classes))
