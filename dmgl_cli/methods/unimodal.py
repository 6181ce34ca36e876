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


class UnimodalMethod(FusionMethod):
    """One modality alone. Settings (``method.options.unimodal.*``): ``modality`` — required, a modality of the
    dataset (``--modality NAME`` sets it)."""

    name = "unimodal"
    strategies = ("constant",)
    uses_matching = False
    per_modality_source = "own"
    defaults: dict[str, Any] = {"modality": None}

    def check(self) -> None:
        modality = self.settings["modality"]
        if modality is None:
            raise DmglError(
                "method 'unimodal' needs the modality to train: pass --modality NAME "
                f"(or --set {self.key('modality')}=NAME)"
            )
        if not isinstance(modality, str) or not modality:
            raise DmglError(f"{self.key('modality')} must be a modality name, got {modality!r}")
        if self.config.strategy.alpha != 0:
            raise DmglError(
                f"method 'unimodal' trains one modality, which has nothing to match: it needs alpha = 0 "
                f"(--strategy constant --alpha 0), got alpha {self.config.strategy.alpha}"
            )

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> FusionModel:
        modality = self.settings["modality"]
        if modality not in modalities:
            raise DmglError(
                f"--modality {modality}: dataset {self.config.dataset!r} has no such modality; "
                f"it has: {', '.join(modalities)}"
            )
        encoders = encoders_for(self.config, {modality: modalities[modality]}, num_classes)
        return FusionModel(encoders, UnimodalHead(modality, self.config.model.embed_dim, num_classes))
