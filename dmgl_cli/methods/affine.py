"""Affine: FiLM fusion (Perez et al. AAAI 2018) — one modality produces a feature-wise scale and shift applied to
the other.

With ``c`` the conditioning modality and ``o`` the other::

    gamma, beta = split(W_c z_c + b_c)          # 2 x embed_dim
    logits      = W_out (gamma * z_o + beta) + b_out

As in the balanced-multimodal-learning code the paper builds on (``FiLM`` of OGM-GE, Peng et al. CVPR 2022, where
``x_film=True`` lets the first modality — audio — condition the second), the generator is one linear layer on the
conditioning embedding and the modulated features go to a linear classifier. FiLM pairs two modalities, so three
or more are refused. FiLM has no per-modality predictions: per-modality scores come from linear probes on the
detached embeddings (``per_modality_source = "probe"``).

Settings (``method.options.affine.*``): ``condition`` — the conditioning modality (default: the dataset's first
modality, OGM-GE's ``x_film=True``); ``probe_lr`` (1e-3) — Adam rate of the per-modality probes. Logged per epoch:
``film_scale_mean``, ``film_scale_std``, ``film_shift_mean`` over the epoch's training batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from dmgl_cli.catalogue.options import AffineOptions
from dmgl_cli.errors import DmglError
from dmgl_cli.methods.fusion_base import (
    FusionMethod,
    FusionModel,
    FusionOutput,
    LinearProbes,
    encoders_for,
)

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config


class FiLMFusion(nn.Module):
    def __init__(self, condition: str, modulated: str, embed_dim: int, num_classes: int):
        super().__init__()
        self.condition, self.modulated, self.embed_dim = condition, modulated, embed_dim
        self.generator = nn.Linear(embed_dim, 2 * embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.probes = LinearProbes([condition, modulated], embed_dim, num_classes)

    def scale_shift(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(gamma, beta), each [batch, embed_dim], computed from the conditioning modality alone."""
        gamma, beta = self.generator(embeddings[self.condition]).split(self.embed_dim, dim=1)
        return gamma, beta

    def forward(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
        gamma, beta = self.scale_shift(embeddings)
        logits = self.head(gamma * embeddings[self.modulated] + beta)
        return logits, self.probes(embeddings), {"scale": gamma, "shift": beta}


class AffineMethod(FusionMethod, method="affine"):
    """FiLM: ``condition`` scales and shifts the other modality. Settings: ``condition``, ``probe_lr``."""

    options: AffineOptions

    def __init__(self, config: Config, options: AffineOptions):
        super().__init__(config, options)
        self.probe_lr = options.probe_lr

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> FusionModel:
        names = list(modalities)
        if len(names) != 2:
            raise DmglError(
                f"method 'affine' (FiLM) conditions one modality on another and needs exactly 2 modalities; "
                f"dataset {self.config.dataset!r} has {len(names)}: {', '.join(names)}"
            )
        condition = self.options.condition or names[0]
        if condition not in modalities:
            raise DmglError(
                f"{self.key('condition')}={condition}: dataset {self.config.dataset!r} has no such modality; "
                f"it has: {', '.join(names)}"
            )
        modulated = names[1] if condition == names[0] else names[0]
        encoders = encoders_for(self.config, modalities, num_classes)
        return FusionModel(encoders, FiLMFusion(condition, modulated, self.config.model.embed_dim, num_classes))

    def extra_losses(self, output: FusionOutput, labels: Tensor, step: dict[str, Any]) -> dict[str, Tensor]:
        scale, shift = output.extras["scale"].float(), output.extras["shift"].float()
        self.track({"film_scale_mean": scale.mean(), "film_scale_std": scale.std(), "film_shift_mean": shift.mean()})
        return {}
