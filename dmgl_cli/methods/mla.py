"""MLA: multimodal representation learning by alternating unimodal adaptation (Zhang, Yoon, Bansal & Yao, CVPR 2024).

Follows the authors' code, github.com/Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation (the
repository the paper links; no public njustkmg/CVPR24-MLA could be found): ``main.py`` ``train_epoch``
(the ``gs_flag`` branch), ``utils/utils.py`` ``GSPlugin.before_update`` and ``main.py`` ``valid`` with
``calculate_gating_weights`` (the README's "MLA (dynamic fusion)" run).

Alternating uni-modal training with a shared head. The model is the encoders and ONE linear head
``h: embed_dim -> classes`` shared by every modality. Each training batch is used once per modality, one after the
other, with an optimiser step each (the loop's ``train_passes`` hook): the step for modality j trains its encoder
and the head on ``CE(h(z_j), y)`` only, so the modalities never compete inside one gradient.

Gradient modification (``GSPlugin.before_update``). Between backward and every optimiser step except the very
first of the run, the matrix P (``d x d``, initially the identity) is updated with the batch mean ``r`` (``1 x d``)
of the current modality's features and the head's weight gradient is replaced::

    a = 0.1 ** (1 + batch / batches)            # batch: index of the batch within the epoch
    k = P r^T                                   # d x 1
    P <- P - (k k^T) / (a + k r)                # k r is d x d: the division is element-wise, as in the code
    P <- P / ||P||_F
    grad_W <- grad_W P^T                        # replaced, not added

The head's bias is not touched. The code's division by the matrix ``a + k r`` is not the orthogonal-projector
update of OWM, whose denominator is the scalar ``a + r k``; ``denominator: scalar`` selects that (ours).

Test-time fusion (``calculate_gating_weights``). The fused logits are ``sum_j w_j h(z_j)`` with
``w = softmax_j(-e_j)``. In the code ``e_j`` is one number per modality and evaluation batch: the softmax of
``h(z_j)`` is taken over the batch axis (``F.softmax(output, dim=0)``) and the entropy summed over the whole batch,
so a sample's prediction depends on the batch it is evaluated in (here ``train.eval_batch_size``; 64 there).
``fusion: sample-entropy`` (ours; also BalanceBenchmark's and the paper's per-sample reading) takes the entropy of
each sample's class distribution instead. The per-modality outputs are ``h(z_j)``.

Deviations from the authors' code:

* The latest commit of ``utils/utils.py`` (11ae1ee, "Fix bugs") looks the weight up by the name
  ``module.weight``, which the ``nn.Linear`` head's weight (named ``weight``) never has, so there P stays the
  identity and no gradient is modified. The first release (4735bbc) also accepted ``weight`` and did modify it;
  the paper describes the modification, so it is on here. ``projection: false`` reproduces 11ae1ee.
* Each step computes only the active modality's encoder (the code runs every encoder once per batch and reuses the
  features; the values are the same). The other encoders have no gradient in that step and the optimiser skips
  them. In the code (torch 1.8, whose ``zero_grad()`` leaves zero tensors) an encoder already stepped earlier in
  the batch still holds a zero gradient in the later steps, so SGD's momentum and weight decay move it once more
  per later step; that side effect is not reproduced.
* Entropies are computed from log-softmax (the code's ``log(softmax)`` can give 0 * -inf = nan).
* No fixed-weight fusion (the code without ``--dynamic``: ``0.5/0.5``, or ``0.35/0.25/0.4`` for three
  modalities). P is ``model.embed_dim`` wide (512 hard-coded there).

GeWu-Lab/BalanceBenchmark (``balancemm/trainer/MLA_trainer.py``, ``models/avclassify_model.py``) differs from the
authors' code in: it ADDS the projected gradient (``grad <- grad + grad P^T``); it alternates only between
``modulation_starts`` and ``modulation_ends`` and trains the fused output jointly outside that window; its fusion
weights are per sample (entropy over classes); it projects with detached features. The element-wise denominator
is the same in both.

With one modality per step there is no pair of modalities to match, so the paper's L_MM cannot be added: MLA runs
with ``--strategy constant --alpha 0`` only.

Settings (``method.options.mla.*``): ``fusion`` (batch-entropy | sample-entropy; default batch-entropy),
``denominator`` (elementwise | scalar; default elementwise), ``projection`` (default true).
Logged per epoch: ``mla_steps_<modality>`` (optimiser steps the epoch took on that modality),
``mla_fusion_weight_<modality>`` (mean test-time weight on validation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dmgl_cli.catalogue.options import MLAOptions
from dmgl_cli.errors import DmglError
from dmgl_cli.methods.rebalance_base import SEEN, RebalanceMethod, autocast_for, distributed_of, split_batches
from dmgl_cli.models import ModelOutput, MultimodalModel, build_model

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config


def entropy_weights(unimodal_logits: dict[str, Tensor], rule: str = "batch-entropy") -> Tensor:
    """Fusion weights ``softmax_j(-entropy_j)``, shape (modalities, n).

    ``batch-entropy``: the authors' ``calculate_entropy`` — softmax over the batch axis, entropy summed over the
    batch, one weight per modality for the whole batch. ``sample-entropy``: the entropy of each sample's classes.
    """
    logits = torch.stack([z.float() for z in unimodal_logits.values()])  # (modalities, n, classes)
    axis = 1 if rule == "batch-entropy" else 2
    log_probs = torch.log_softmax(logits, dim=axis)
    plogp = log_probs.exp() * log_probs
    if rule == "batch-entropy":
        entropy = -plogp.sum(dim=(1, 2), keepdim=True)[:, :, 0].expand(-1, logits.shape[1])
    else:
        entropy = -plogp.sum(dim=2)
    return torch.softmax(-entropy, dim=0)


def update_projection(projection: Tensor, features: Tensor, a: float, denominator: str = "elementwise") -> Tensor:
    """One ``GSPlugin.before_update`` step of P with the batch mean of ``features`` (n x d); returns the new P."""
    r = features.detach().float().mean(dim=0, keepdim=True)  # 1 x d
    k = projection @ r.T  # d x 1
    scale = a + (k @ r if denominator == "elementwise" else r @ k)  # d x d (the code) or 1 x 1 (OWM)
    updated = projection - (k @ k.T) / scale
    return updated / torch.linalg.matrix_norm(updated)


class SharedHeadFusion(nn.Module):
    """One linear head applied to every modality's embedding; fused logits by entropy weighting."""

    def __init__(self, modalities: list[str], embed_dim: int, num_classes: int, rule: str = "batch-entropy"):
        super().__init__()
        self.modalities = list(modalities)
        self.rule = rule
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        unimodal = {m: self.head(z) for m, z in embeddings.items()}
        weights = entropy_weights(unimodal, self.rule)
        stacked = torch.stack([z.float() for z in unimodal.values()])
        return (weights[:, :, None] * stacked).sum(dim=0), unimodal


def shared_head(model: MultimodalModel) -> nn.Linear:
    """The head every modality's embedding goes through (the SharedHeadFusion of :meth:`MLAMethod.build_model`)."""
    fusion = model.fusion
    assert isinstance(fusion, SharedHeadFusion)
    return fusion.head


class MLAMethod(RebalanceMethod, method="mla"):
    """Alternating uni-modal adaptation; see the module docstring."""

    options: MLAOptions

    def __init__(self, config: Config, options: MLAOptions):
        super().__init__(config, options)
        self.modalities: list[str] = []
        self.active: str | None = None
        self.projection: Tensor | None = None
        self.steps_taken = 0  # optimiser steps so far (the code's exp_count: the first one is not modified)
        self.batch = 0  # batch index within the epoch

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> MultimodalModel:
        if len(modalities) < 2:
            raise DmglError("method 'mla' alternates between modalities and needs at least two")
        self.modalities = list(modalities)
        encoders = build_model(self.config, modalities, num_classes).encoders
        fusion = SharedHeadFusion(self.modalities, self.config.model.embed_dim, num_classes, self.options.fusion)
        return MultimodalModel(encoders, fusion)

    # -- alternating steps ------------------------------------------------------------------------------------
    def train_passes(self) -> tuple[Any, ...]:
        return tuple(self.modalities)

    def start_pass(self, key: Any) -> None:
        if key == self.modalities[0] and self.active is not None:
            self.batch += 1
        self.active = key

    def start_of_epoch(self, model: MultimodalModel, epoch: int) -> None:
        self.batch = 0
        self.active = None

    def forward(self, model: MultimodalModel, inputs: dict[str, Tensor], training: bool) -> ModelOutput:
        if not training or self.active is None:
            return model(inputs)
        z = model.encoders[self.active](inputs[self.active])
        logits = shared_head(model)(z)
        return ModelOutput(logits=logits, unimodal_logits={self.active: logits}, embeddings={self.active: z})

    @torch.no_grad()
    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        weight = shared_head(model).weight
        if self.projection is None:
            self.projection = torch.eye(weight.shape[1], device=weight.device)
        if self.options.projection and self.steps_taken > 0 and weight.grad is not None:
            batches = max(len(self.trainer.train_loader), 1) if self.trainer is not None else 1
            a = 0.1 ** (1.0 + self.batch / batches)
            assert self.active is not None  # after_backward follows start_pass: one modality's step
            self.projection = update_projection(
                self.projection, output.embeddings[self.active], a, self.options.denominator
            )
            weight.grad.copy_(weight.grad @ self.projection.T.to(weight.grad.dtype))
        self.steps_taken += 1
        self.count(f"mla_steps_{self.active}")

    @torch.no_grad()
    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        was_training = model.training
        model.eval()
        active, self.active = self.active, None
        sums: dict[str, float] = {}
        seen = 0
        for inputs, labels in split_batches(self.trainer, "val", shard=True):
            with autocast_for(self.trainer):
                output = model(inputs)
            weights = entropy_weights(output.unimodal_logits, self.options.fusion)
            for index, modality in enumerate(output.unimodal_logits):
                sums[modality] = sums.get(modality, 0.0) + float(weights[index].sum())
            seen += int(labels.shape[0])
        self.active = active
        model.train(was_training)
        # data-parallel: each rank scored its share of the batches (whole batches: the entropy is per batch)
        sums = distributed_of(self.trainer).sum_values({**sums, SEEN: float(seen)})
        seen = int(sums.pop(SEEN))
        return {**self.epoch_statistics(), **{f"mla_fusion_weight_{m}": s / max(seen, 1) for m, s in sums.items()}}

    def method_state(self) -> dict[str, Any]:
        return {
            "projection": None if self.projection is None else self.projection.detach().cpu(),
            "steps_taken": self.steps_taken,
            "batch": self.batch,
            "active": self.active,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        projection = state.get("projection")
        device = self.trainer.device if self.trainer is not None else "cpu"
        self.projection = None if projection is None else projection.to(device)
        self.steps_taken = int(state.get("steps_taken", 0))
        self.batch = int(state.get("batch", 0))
        self.active = state.get("active")
