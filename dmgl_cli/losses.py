"""Loss functions: classification, uniform-label, and modality matching.

The training objective of the paper (Eq. 1) is ``L_tot = (1 - alpha) * L_CLS + alpha * L_MM``. ``L_MM`` is the
symmetric InfoNCE of §3.2 between every pair of modalities; alternatives are offered for comparison: the authors'
released code's ``Alignment`` (``mixture_kl``: ½[KL(m‖p) + KL(m‖q)] of the modalities' predictions, which its
comment calls JS but is not), the true Jensen–Shannon divergence (``js``), and Figure 1's uniform-label loss ``L_U``
on the fused prediction.
"""

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dmgl_cli.errors import DmglError


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` (n, c) against integer ``labels`` (n,): the paper's ``L_CLS``."""
    return F.cross_entropy(logits, labels)


def uniform_label_loss(logits: Tensor) -> Tensor:
    """Cross-entropy against the uniform label 1/c for every sample (Figure 1's ``L_U``), mean over the batch.

    Equals ``log(c)`` exactly when the logits are uniform, its minimum.
    """
    return -F.log_softmax(logits, dim=-1).mean(dim=-1).mean()


def info_nce(z_a: Tensor, z_b: Tensor, tau: float) -> Tensor:
    """Symmetric InfoNCE between two modalities' embeddings (§3.2 of the paper).

    With cosine similarities ``s_ik = cos(z_a[i], z_b[k])`` the loss is
    ``-(1 / 2n) * sum_i [log softmax_k(s_ik / tau)[i] + log softmax_k(s_ki / tau)[i]]``: the mean of the row-wise
    and the column-wise cross-entropy of the similarity matrix over ``tau``, the matching sample being the target.
    """
    return info_nce_of_similarity(scaled_similarity(z_a, z_b, tau))


def scaled_similarity(z_a: Tensor, z_b: Tensor, tau: float) -> Tensor:
    """``cos(z_a[i], z_b[k]) / tau``, the logits of InfoNCE's two cross-entropies (:func:`info_nce`)."""
    if tau <= 0:
        raise DmglError(f"the InfoNCE temperature tau must be > 0, got {tau}")
    if z_a.shape[0] != z_b.shape[0]:
        raise ValueError(f"info_nce needs paired batches, got {z_a.shape[0]} and {z_b.shape[0]} samples")
    return F.normalize(z_a, dim=-1) @ F.normalize(z_b, dim=-1).T / tau


def info_nce_of_similarity(similarity: Tensor) -> Tensor:
    """InfoNCE from its similarity logits: the mean of the row-wise and column-wise cross-entropy, the matching
    sample being the target. Convex in ``similarity`` (the generalised Gauss-Newton products linearise the network
    up to these logits)."""
    matching = torch.arange(similarity.shape[0], device=similarity.device)
    return 0.5 * (F.cross_entropy(similarity, matching) + F.cross_entropy(similarity.T, matching))


def js_divergence(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Jensen–Shannon divergence (natural log) between ``softmax(logits_a)`` and ``softmax(logits_b)``, batch mean.

    ``JS(p, q) = ½[KL(p‖m) + KL(q‖m)]`` with ``m = (p + q) / 2``. The authors' released code names its matching loss
    JS but computes ``½[KL(m‖p) + KL(m‖q)]`` (:func:`mixture_kl_divergence`); this is the divergence its name says.
    The paper's §3.2 matching loss is the InfoNCE of the embeddings (:func:`info_nce`).
    """
    log_p = F.log_softmax(logits_a, dim=-1)
    log_q = F.log_softmax(logits_b, dim=-1)
    # log of the mixture (p + q) / 2, computed in log space so that tiny probabilities stay finite
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_p_m = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_q_m = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return (0.5 * (kl_p_m + kl_q_m)).mean()


def mixture_kl_divergence(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """``½[KL(m‖p) + KL(m‖q)]`` with ``p, q`` the softmax of the two logits and ``m = (p + q) / 2``; sum over classes,
    mean over the batch.

    This is what ``Alignment`` in the authors' released code (``Crema_epoch_learnable.py``, njustkmg/NeurIPS24-LFM)
    computes: ``F.kl_div(input, target)`` takes log-probabilities as ``input`` and returns ``KL(target‖input)``, so
    ``F.kl_div(p.log(), m)`` is ``KL(m‖p)``, not the ``KL(p‖m)`` of Jensen–Shannon (:func:`js_divergence`). Both are
    0 when ``p = q``; they differ in size and gradient elsewhere (``KL(m‖p)`` grows without bound as ``p`` of a class
    that ``q`` keeps goes to 0, where JS stays below ``log 2``).
    """
    log_p = F.log_softmax(logits_a, dim=-1)
    log_q = F.log_softmax(logits_b, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    m = log_m.exp()
    kl_m_p = (m * (log_m - log_p)).sum(dim=-1)
    kl_m_q = (m * (log_m - log_q)).sum(dim=-1)
    return (0.5 * (kl_m_p + kl_m_q)).mean()


def _modality_pairs(per_modality: dict[str, Tensor], kind: str) -> list[tuple[str, str]]:
    if len(per_modality) < 2:
        raise DmglError(
            f"matching loss '{kind}' compares modalities pairwise and needs at least 2, got {len(per_modality)}: "
            f"{sorted(per_modality)}"
        )
    return list(itertools.combinations(sorted(per_modality), 2))


def mean_pairwise_info_nce(
    embeddings: dict[str, Tensor], unimodal_logits: dict[str, Tensor], fused_logits: Tensor, tau: float
) -> Tensor:
    """Mean :func:`info_nce` of the embeddings over every unordered pair of modalities."""
    return torch.stack([info_nce_of_similarity(s) for s in pairwise_similarities(embeddings, tau)]).mean()


def pairwise_similarities(embeddings: dict[str, Tensor], tau: float) -> list[Tensor]:
    """:func:`scaled_similarity` of every unordered pair of modalities, in :func:`mean_pairwise_info_nce`'s order."""
    pairs = _modality_pairs(embeddings, "infonce")
    return [scaled_similarity(embeddings[a], embeddings[b], tau) for a, b in pairs]


def mean_pairwise_js_divergence(
    embeddings: dict[str, Tensor], unimodal_logits: dict[str, Tensor], fused_logits: Tensor, tau: float
) -> Tensor:
    """Mean :func:`js_divergence` of the unimodal predictions over every unordered pair of modalities."""
    pairs = _modality_pairs(unimodal_logits, "js")
    return torch.stack([js_divergence(unimodal_logits[a], unimodal_logits[b]) for a, b in pairs]).mean()


def mean_pairwise_mixture_kl(
    embeddings: dict[str, Tensor], unimodal_logits: dict[str, Tensor], fused_logits: Tensor, tau: float
) -> Tensor:
    """Mean :func:`mixture_kl_divergence` of the unimodal predictions over every unordered pair of modalities."""
    pairs = _modality_pairs(unimodal_logits, "mixture_kl")
    return torch.stack([mixture_kl_divergence(unimodal_logits[a], unimodal_logits[b]) for a, b in pairs]).mean()


def fused_uniform_label_loss(
    embeddings: dict[str, Tensor], unimodal_logits: dict[str, Tensor], fused_logits: Tensor, tau: float
) -> Tensor:
    """:func:`uniform_label_loss` of the fused prediction; with alpha = 0.3 Eq. 1 is Figure 1's 0.7 L_S + 0.3 L_U."""
    return uniform_label_loss(fused_logits)


MatchingLoss = Callable[[dict[str, Tensor], dict[str, Tensor], Tensor, float], Tensor]

# loss.matching -> the loss; config accepts catalogue.MATCHING_LOSS_NAMES (tests/test_config.py checks they agree).
MATCHING_LOSSES: dict[str, MatchingLoss] = {
    "infonce": mean_pairwise_info_nce,
    "js": mean_pairwise_js_divergence,
    "mixture_kl": mean_pairwise_mixture_kl,
    "uniform": fused_uniform_label_loss,
}


def modality_matching_loss(
    kind: str,
    embeddings: dict[str, Tensor],
    unimodal_logits: dict[str, Tensor],
    fused_logits: Tensor,
    tau: float,
) -> Tensor:
    """The matching loss ``L_MM`` named by ``kind`` (one of :data:`MATCHING_LOSSES`)."""
    if kind not in MATCHING_LOSSES:
        raise DmglError(f"unknown matching loss '{kind}'; valid names: {', '.join(MATCHING_LOSSES)}")
    return MATCHING_LOSSES[kind](embeddings, unimodal_logits, fused_logits, tau)


def total_loss(alpha: float | Tensor, cls_loss: Tensor, matching_loss: Tensor) -> Tensor:
    """Eq. 1 of the paper: ``(1 - alpha) * cls_loss + alpha * matching_loss``."""
    return (1 - alpha) * cls_loss + alpha * matching_loss
