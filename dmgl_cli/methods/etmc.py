"""ETMC: trusted multi-view classification with dynamic evidential fusion (Han et al. TPAMI 2023).

Each modality j gives non-negative evidence ``e_j = softplus(W_j z_j + b_j)`` and a Dirichlet ``alpha_j = e_j + 1``
(a subjective opinion: belief ``b_j = e_j / S_j``, uncertainty ``u_j = K / S_j``, strength ``S_j = sum alpha_j``).
ETMC adds a pseudo-view, a classifier on the concatenated embeddings, and fuses all opinions with the reduced
Dempster-Shafer rule::

    b = (b_1 * b_2 + b_1 u_2 + b_2 u_1) / (1 - C),  u = u_1 u_2 / (1 - C),  C = sum_{i != k} b_1i b_2k

applied left to right as the authors' code does: ``DS(DS(view_1, view_2), pseudo)`` (for m modalities,
``DS(...DS(DS(view_1, view_2), view_3)..., pseudo)``). Every opinion — each modality's, the pseudo-view's and the
fused one — is trained with the authors' evidential loss: the expected cross-entropy under the Dirichlet,
``sum_k y_k (digamma(S) - digamma(alpha_k))``, plus ``lambda_t * KL(Dir(alpha~) || Dir(1))`` on the evidence of the
wrong classes, with ``lambda_t = min(1, t / annealing_epochs)`` growing with the (0-based) epoch t, as in the
authors' ``ce_loss(..., global_step=epoch, annealing_step)``. The per-view heads are single linear layers here:
the encoders already end in hidden layers.

In this loop the evidential loss *replaces* the cross-entropy as L_CLS (:meth:`Method.classification_loss`), so
``--strategy heuristic/lb`` combine it with L_MM on the encoders' embeddings as for any method. Training steps use
the annealed lambda_t; evaluation (``val_cls_loss``, which the plateau scheduler watches) uses lambda = 1 so that
the monitored loss does not rise just because the KL term is being phased in.

Scoring: ``softmax(log alpha) = alpha / S``, the Dirichlet's expected class probabilities, so the fused logits are
``log alpha_fused`` and each modality's own logits are ``log alpha_j`` (``per_modality_source = "own"``).

Settings (``method.options.etmc.*``): ``annealing_epochs`` (10, the authors' ``--annealing_epoch`` default).
Logged per epoch over the training batches: ``etmc_kl_coef``, ``etmc_strength`` and ``etmc_uncertainty`` of the
fused opinion, ``etmc_uncertainty_<modality>`` and ``etmc_uncertainty_pseudo``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmgl_cli.catalogue.options import ETMCOptions
from dmgl_cli.methods.fusion_base import FusionMethod, FusionModel, FusionOutput, encoders_for
from dmgl_cli.models import MultimodalModel

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config

PSEUDO = "pseudo"
FUSED = "fused"


def dempster_shafer(alpha_a: Tensor, alpha_b: Tensor) -> Tensor:
    """Reduced Dempster-Shafer combination of two Dirichlet opinions ``[batch, K]``; returns the fused alpha."""
    classes = alpha_a.shape[1]
    strength_a, strength_b = alpha_a.sum(dim=1, keepdim=True), alpha_b.sum(dim=1, keepdim=True)
    belief_a, belief_b = (alpha_a - 1) / strength_a, (alpha_b - 1) / strength_b
    uncertainty_a, uncertainty_b = classes / strength_a, classes / strength_b
    # Conflict: belief mass the two opinions put on different classes.
    conflict = belief_a.sum(dim=1, keepdim=True) * belief_b.sum(dim=1, keepdim=True) - (belief_a * belief_b).sum(
        dim=1, keepdim=True
    )
    belief = (belief_a * belief_b + belief_a * uncertainty_b + belief_b * uncertainty_a) / (1 - conflict)
    uncertainty = uncertainty_a * uncertainty_b / (1 - conflict)
    strength = classes / uncertainty
    return belief * strength + 1


def kl_to_uniform_dirichlet(alpha: Tensor) -> Tensor:
    """KL(Dir(alpha) || Dir(1, ..., 1)) per sample, ``[batch]``."""
    classes = alpha.shape[1]
    strength = alpha.sum(dim=1)
    log_beta = torch.lgamma(strength) - torch.lgamma(alpha).sum(dim=1) - torch.lgamma(alpha.new_tensor(float(classes)))
    return ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(strength).unsqueeze(1))).sum(dim=1) + log_beta


def evidential_loss(alpha: Tensor, labels: Tensor, kl_coef: float) -> Tensor:
    """The authors' ``ce_loss``: Dirichlet-expected cross-entropy + kl_coef * KL of the non-target evidence; mean."""
    one_hot = F.one_hot(labels, alpha.shape[1]).to(alpha.dtype)
    strength = alpha.sum(dim=1, keepdim=True)
    expected_ce = (one_hot * (torch.digamma(strength) - torch.digamma(alpha))).sum(dim=1)
    wrong_evidence_alpha = (alpha - 1) * (1 - one_hot) + 1
    return (expected_ce + kl_coef * kl_to_uniform_dirichlet(wrong_evidence_alpha)).mean()


class EvidentialFusion(nn.Module):
    def __init__(self, modalities: list[str], embed_dim: int, num_classes: int):
        super().__init__()
        self.modalities = list(modalities)
        self.heads = nn.ModuleDict({m: nn.Linear(embed_dim, num_classes) for m in modalities})
        self.pseudo_head = nn.Linear(embed_dim * len(self.modalities), num_classes)

    def forward(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
        # float32: digamma/lgamma and the combination rule are not safe in bf16.
        alphas = {m: F.softplus(self.heads[m](embeddings[m]).float()) + 1 for m in self.modalities}
        concatenated = torch.cat([embeddings[m] for m in self.modalities], dim=1)
        alphas[PSEUDO] = F.softplus(self.pseudo_head(concatenated).float()) + 1
        fused = alphas[self.modalities[0]]
        for view in [*self.modalities[1:], PSEUDO]:
            fused = dempster_shafer(fused, alphas[view])
        alphas[FUSED] = fused
        unimodal = {m: torch.log(alphas[m]) for m in self.modalities}
        return torch.log(fused), unimodal, {"alphas": alphas}


class ETMCMethod(FusionMethod, method="etmc"):
    """Evidential per-modality opinions + pseudo-view, Dempster-Shafer fusion, annealed KL. Settings:
    ``annealing_epochs`` (10)."""

    options: ETMCOptions

    def __init__(self, config: Config, options: ETMCOptions):
        super().__init__(config, options)
        self.epoch = 1

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> FusionModel:
        encoders = encoders_for(self.config, modalities, num_classes)
        return FusionModel(encoders, EvidentialFusion(list(modalities), self.config.model.embed_dim, num_classes))

    def kl_coefficient(self) -> float:
        """lambda_t = min(1, t / annealing_epochs) with t the 0-based epoch (the authors' ``i_epoch``)."""
        return min(1.0, (self.epoch - 1) / self.options.annealing_epochs)

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        super().on_epoch_start(model, epoch)
        self.epoch = epoch

    def forward(self, model: MultimodalModel, inputs: dict[str, Tensor], training: bool) -> FusionOutput:
        output = model(inputs)
        output.extras["kl_coef"] = self.kl_coefficient() if training else 1.0
        return output

    def classification_loss(self, output: FusionOutput, labels: Tensor) -> Tensor:
        kl_coef = output.extras["kl_coef"]
        return torch.stack(
            [evidential_loss(alpha, labels, kl_coef) for alpha in output.extras["alphas"].values()]
        ).sum()

    def extra_losses(self, output: FusionOutput, labels: Tensor, step: dict[str, Any]) -> dict[str, Tensor]:
        alphas = output.extras["alphas"]
        classes = alphas[FUSED].shape[1]
        strengths = {view: alpha.sum(dim=1) for view, alpha in alphas.items()}
        stats = {
            "etmc_kl_coef": strengths[FUSED].new_tensor(output.extras["kl_coef"]),
            "etmc_strength": strengths[FUSED].mean(),
            "etmc_uncertainty": (classes / strengths[FUSED]).mean(),
        }
        stats.update(
            {f"etmc_uncertainty_{view}": (classes / strengths[view]).mean() for view in alphas if view != FUSED}
        )
        self.track(stats)
        return {}
