"""DOMFN: divergence-orientated multi-modal fusion network (Yang et al., ACM MM 2022).

Our reconstruction (no public code): the authors released none, and the DMGL paper, which lists DOMFN in its
tables, does not say how it ran it. What follows the paper: a uni-modal classifier per modality is trained next to
the fused classifier; a per-sample divergence between the uni-modal predictions drives an amended training loss
that penalises divergence beyond a margin; at test time the fused prediction is used only for samples whose
divergence is within the margin, and for the others it is rejected in favour of a uni-modal prediction
(instance-aware fusion).

Computed here::

    d_i   = mean over modality pairs (j, k) of JS(softmax(u_j), softmax(u_k))      # natural log, in [0, ln 2]
    loss  = (1 - alpha) CE(fused) (+ alpha L_MM)       # the shared loop's loss
          + sum_j CE(u_j)                              # domfn_unimodal
          + beta * mean_i max(0, d_i - margin)         # domfn_penalty
    predict_i = log_softmax(fused_i)            if d_i <= margin
              = log_softmax(u_{j*,i}), j* = argmax_j max_c softmax(u_j)_c   otherwise

Choices that are ours (the paper's "functional penalty score" is learnt and its form and constants are not
recoverable from the text): the fused classifier is Concat's linear head and each uni-modal classifier a linear
head on its modality's embedding (``AuxHeadsModel``); the divergence is the pairwise Jensen–Shannon divergence;
the penalty is the hinge ``max(0, d - margin)`` averaged over the batch, weighted by ``beta``; the uni-modal
cross-entropies are added with weight 1; a rejected sample takes the most confident uni-modal head;
``margin = 0.3`` and ``beta = 1.0``.

Settings (``method.options.domfn.*``): ``margin`` ((0, ln 2], default 0.3), ``beta`` (>= 0, default 1.0).
Logged per epoch: ``domfn_divergence`` (mean training divergence), ``domfn_rejected`` (fraction of validation
samples whose fused prediction was rejected).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from dmgl_cli.catalogue.options import DOMFNOptions
from dmgl_cli.methods.rebalance_base import (
    SEEN,
    AuxHeadsModel,
    RebalanceMethod,
    autocast_for,
    distributed_of,
    split_batches,
)
from dmgl_cli.models import ModelOutput, MultimodalModel, build_model


def pairwise_js(unimodal_logits: dict[str, Tensor]) -> Tensor:
    """Per-sample mean Jensen–Shannon divergence between the modalities' softmax outputs, shape (n,)."""
    log_probs = {m: torch.log_softmax(z.float(), dim=1) for m, z in unimodal_logits.items()}
    values = []
    for a, b in itertools.combinations(sorted(log_probs), 2):
        log_p, log_q = log_probs[a], log_probs[b]
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
        kl_p = (log_p.exp() * (log_p - log_m)).sum(dim=1)
        kl_q = (log_q.exp() * (log_q - log_m)).sum(dim=1)
        values.append(0.5 * (kl_p + kl_q))
    return torch.stack(values).mean(dim=0)


class DOMFNMethod(RebalanceMethod, method="domfn"):
    """Divergence-orientated fusion; see the module docstring."""

    options: DOMFNOptions

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> MultimodalModel:
        concat = build_model(self.config, modalities, num_classes)
        return AuxHeadsModel(concat.encoders, concat.fusion, self.config.model.embed_dim, num_classes)

    def extra_losses(self, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> dict[str, Tensor]:
        # A Tensor: the sum runs over at least one modality (pyright types sum() as possibly its start, 0).
        unimodal = cast(Tensor, sum(F.cross_entropy(z.float(), labels) for z in output.unimodal_logits.values()))
        divergence = pairwise_js(output.unimodal_logits)
        penalty = self.options.beta * torch.relu(divergence - self.options.margin).mean()
        self.track({"domfn_divergence": divergence.mean()})
        return {"domfn_unimodal": unimodal, "domfn_penalty": penalty}

    def rejected(self, output: ModelOutput) -> Tensor:
        return pairwise_js(output.unimodal_logits) > self.options.margin

    def predict(self, output: ModelOutput) -> Tensor:
        log_probs = torch.stack([torch.log_softmax(z.float(), dim=1) for z in output.unimodal_logits.values()])
        confidence = log_probs.max(dim=2).values  # (modalities, n)
        best = log_probs.gather(0, confidence.argmax(dim=0)[None, :, None].expand(1, *log_probs.shape[1:]))[0]
        fused = torch.log_softmax(output.logits.float(), dim=1)
        return torch.where(self.rejected(output)[:, None], best, fused)

    @torch.no_grad()
    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        was_training = model.training
        model.eval()
        rejected, seen = 0, 0
        for inputs, labels in split_batches(self.trainer, "val", shard=True):
            with autocast_for(self.trainer):
                output = model(inputs)
            rejected += int(self.rejected(output).sum())
            seen += int(labels.shape[0])
        model.train(was_training)
        # data-parallel: each rank scored its share of the batches
        totals = distributed_of(self.trainer).sum_values({"rejected": float(rejected), SEEN: float(seen)})
        rejected, seen = int(totals["rejected"]), int(totals[SEEN])
        return {**self.epoch_statistics(), "domfn_rejected": rejected / max(seen, 1)}
