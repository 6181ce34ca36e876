"""Models: an encoder per modality -> fusion -> classification head.

``ENCODERS`` and ``FUSIONS`` are the explicit registries (their names, which config accepts, are
:mod:`dmgl_cli.catalogue`'s ``ENCODER_NAMES`` and ``FUSION_NAMES``; ``tests/test_config.py`` checks they agree);
``build_model`` wires a model from the config and the prepared dataset's modality specs; ``check_tokenisation``
refuses a text encoder that does not read the tokenizer a dataset was prepared with (CLIP's against BERT's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from dmgl_cli.models.encoders import ENCODERS, build_encoder, check_tokenisation
from dmgl_cli.models.fusion import FUSIONS, ModelOutput, MultimodalModel

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config

__all__ = ["ENCODERS", "FUSIONS", "ModelOutput", "MultimodalModel", "build_model", "check_tokenisation"]


def build_model(
    config: Config, modalities: dict[str, dict[str, Any]], num_classes: int, fusion: str | None = None
) -> MultimodalModel:
    """Encoders for ``modalities`` (name -> manifest spec), the configured fusion, a linear head."""
    embed_dim = config.model.embed_dim
    encoders = nn.ModuleDict(
        {
            name: build_encoder(spec, config.encoder_for(name), embed_dim, config.model.dropout)
            for name, spec in modalities.items()
        }
    )
    fusion_cls = FUSIONS[fusion or config.model.fusion]
    return MultimodalModel(encoders, fusion_cls(list(modalities), embed_dim, num_classes))
