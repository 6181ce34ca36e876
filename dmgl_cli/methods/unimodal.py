"""The uni-modal rows of Table 1 (Audio/Text, Video/Image): one encoder and one linear head, trained alone.

``dmgl train --method unimodal --modality NAME`` (or ``method.options.unimodal.modality``). The model holds only
the named modality's encoder — built with the same encoder settings as the multimodal rows — and a linear head; the
other modalities are never read by the model. With one modality there is nothing to match, so L_MM is off and the
method runs with ``--strategy constant --alpha 0`` only. The per-modality score of its one modality is its own
prediction, so its per-modality accuracy equals its fused accuracy and the gap is 0; the modality-gap distance
needs two modalities and is not logged.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dmgl_cli.catalogue.options import UnimodalOptions
from dmgl_cli.errors import DmglError
from dmgl_cli.methods.fusion_base import FusionMethod, FusionModel, encoders_for


class UnimodalHead(nn.Module):
    def __init__(self, modality: str, embed_dim: int, num_classes: int):
        super().__init__()
        self.modality = modality
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
        logits = self.head(embeddings[self.modality])
        return logits, {self.modality: logits}, {}


class UnimodalMethod(FusionMethod, method="unimodal"):
    """One modality alone. Settings (``method.options.unimodal.*``): ``modality`` — required, a modality of the
    dataset (``--modality NAME`` sets it)."""

    options: UnimodalOptions

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> FusionModel:
        modality = self.options.modality
        if modality not in modalities:
            raise DmglError(
                f"--modality {modality}: dataset {self.config.dataset!r} has no such modality; "
                f"it has: {', '.join(modalities)}"
            )
        encoders = encoders_for(self.config, {modality: modalities[modality]}, num_classes)
        return FusionModel(encoders, UnimodalHead(modality, self.config.model.embed_dim, num_classes))
