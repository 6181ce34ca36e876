"""Weight: a learned, per-sample weighted sum of per-modality predictions (CMML, Yang et al. IJCAI 2019).

Each modality j has its own classifier ``f_j(z_j)``; one attention network shared by all modalities scores each
modality's representation, and a softmax over modalities turns the scores into weights ``a_j(x)`` (CMML's code:
``Attentionmodel`` applied to every modality's hidden features, then ``softmax(dim=1)``). The fused prediction is
the weighted sum of the per-modality class probabilities::

    p(y | x) = sum_j a_j(x) softmax(f_j(z_j))        fused logits = log p  (so softmax(logits) = p)

Choices the paper leaves open, as CMML's code does them: the per-modality classifiers are trained with their own
cross-entropy next to the fused one, weighted 1 : 1 against the fused loss's 2 (``imgloss + textloss +
2 * totalloss``), i.e. ``unimodal_weight = 0.5`` here; CMML's semi-supervised terms (diversity, robust consistency
on unlabelled data) are left out, since Table 1 is fully supervised. The attention network's shape is not fixed by
the paper; this uses Linear(d, d) - ReLU - Linear(d, 1).

Settings (``method.options.weight.*``): ``unimodal_weight`` (0.5, >= 0). Logged per epoch: ``weight_<modality>``,
the mean attention weight of each modality over the epoch's training batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmgl_cli.catalogue.options import WeightOptions
from dmgl_cli.methods.fusion_base import FusionMethod, FusionModel, FusionOutput, encoders_for


class WeightedPredictionFusion(nn.Module):
    def __init__(self, modalities: list[str], embed_dim: int, num_classes: int):
        super().__init__()
        self.modalities = list(modalities)
        self.heads = nn.ModuleDict({m: nn.Linear(embed_dim, num_classes) for m in modalities})
        self.attention = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, 1))

    def modality_weights(self, embeddings: dict[str, Tensor]) -> Tensor:
        """[batch, modalities] attention weights, rows summing to 1."""
        scores = torch.cat([self.attention(embeddings[m]) for m in self.modalities], dim=1)
        return torch.softmax(scores.float(), dim=1)

    def forward(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
        unimodal = {m: self.heads[m](embeddings[m]) for m in self.modalities}
        weights = self.modality_weights(embeddings)
        log_probs = torch.stack([F.log_softmax(unimodal[m].float(), dim=-1) for m in self.modalities], dim=1)
        # log sum_j a_j p_j, in log space so that small probabilities stay finite.
        logits = torch.logsumexp(torch.log(weights.clamp_min(1e-30)).unsqueeze(-1) + log_probs, dim=1)
        return logits, unimodal, {"weights": weights}


class WeightMethod(FusionMethod, method="weight"):
    """CMML's attention-weighted sum of per-modality predictions. Settings: ``unimodal_weight`` (0.5)."""

    options: WeightOptions

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> FusionModel:
        encoders = encoders_for(self.config, modalities, num_classes)
        return FusionModel(
            encoders, WeightedPredictionFusion(list(modalities), self.config.model.embed_dim, num_classes)
        )

    def extra_losses(self, output: FusionOutput, labels: Tensor, step: dict[str, Any]) -> dict[str, Tensor]:
        weights = output.extras["weights"]
        modalities = list(output.unimodal_logits)
        self.track({f"weight_{m}": weights[:, j].mean() for j, m in enumerate(modalities)})
        scale = float(self.options.unimodal_weight)
        if scale == 0:
            return {}
        unimodal_ce = torch.stack(
            [F.cross_entropy(logits.float(), labels) for logits in output.unimodal_logits.values()]
        )
        return {"unimodal_loss": scale * unimodal_ce.sum()}
