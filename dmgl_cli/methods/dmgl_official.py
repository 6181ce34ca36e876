"""``dmgl-official``: the paper's learning-based method as the authors' released code runs it, for comparison.

Follows ``Crema_epoch_learnable.py`` of njustkmg/NeurIPS24-LFM (the code linked from the paper), functions
``Alignment``, ``getAlpha_Learnable`` and ``train_audio_video`` and its ``__main__``, with ``AVClassifier`` of
``model/AudioVideo.py``. The released code differs from the paper in every part of the learning-based step:

==========================  ==========================================  ==========================================
                            paper (``concat`` + ``--strategy lb``)      released code (``dmgl-official``)
==========================  ==========================================  ==========================================
model                       Concat: one linear head on [z_a; z_v]       one linear head per modality, each with
                                                                        its own bias; L_CLS is the cross-entropy
                                                                        of ½(o_a + o_v)
matching loss L_MM          symmetric InfoNCE of the embeddings         ``mixture_kl``: ½[KL(m‖p) + KL(m‖q)] of
                                                                        the two heads' softmax outputs (the code
                                                                        calls it JS; ``F.kl_div(p.log(), m)`` is
                                                                        KL(m‖p), see ``losses.py``)
objective                   (1 - alpha) L_CLS + alpha L_MM              2 [(1 - alpha) L_CLS + alpha L_MM]
alpha's gradient            Eq. 3: -(g_MM - g_CLS)^T H^-1 v             mean over the entries of the first
                                                                        parameter tensor of H g_CLS, H the
                                                                        Hessian of (1 - alpha) L_CLS + alpha L_MM
                                                                        in all parameters, H and g_CLS on the
                                                                        same batch; no inverse, no g_MM - g_CLS,
                                                                        no weight decay (``approx: official``)
outer data                  held-out training samples                   16 training samples held out (seeded),
                                                                        the same first 8 of them every time
                                                                        (``holdout: 16``, ``outer_batch_size: 8``,
                                                                        ``outer_sampling: fixed``)
when alpha moves            every ``update_every`` steps                once before each epoch, the first before
                                                                        any training (``update_every:
                                                                        epoch_start``)
alpha's step                Adam on alpha (dmgl's default) or SGD       SGD with lr 1e-4, halved every 20 epochs
                                                                        (``alpha_lr_halving: 20``)
starting alpha, range       ``initial_alpha``; [0, 1] (Algorithm 1)     0.95 (CE weight 0.05); [0.05, 0.95]
==========================  ==========================================  ==========================================

How the settings are applied: this method *is* that configuration, so its ``pinned_settings`` (its entry in
``dmgl_cli/catalogue/methods.py``: ``OFFICIAL_SETTINGS``, ``EQ3_SETTINGS``) are written into the
run's config when it is resolved (``config.resolve``), before it is validated and recorded; the run's parameters
and ``config.yaml`` show what ran, and a warning names every setting it changed. It runs with ``--strategy lb``
only.

Deliberate differences from the released code:

* The alpha step's forward runs in eval mode every time (BatchNorm on its running statistics, which it does not
  update). The released code calls it on a model left in eval mode by the previous epoch's test pass, except before
  epoch 0, where the fresh module is in train mode: that first step uses the 8 samples' batch statistics and adds
  them to BatchNorm's running averages.
* The encoders are dmgl's (the recipe's): each projects to ``model.embed_dim`` where the released code's ResNet18
  feeds its 512 pooled features to the heads, and weights start from PyTorch's default initialisation, not the
  code's ``weight_init``. The optimiser, scheduler and epochs are the recipe's (the released CREMA-D run: SGD lr
  1e-2, momentum 0.9, weight decay 1e-4, StepLR 70 x0.1, batch 64, 200 epochs).
* The released code evaluates on the test split every epoch and keeps no validation split; dmgl selects the best
  epoch on validation only.

As released (and so here): the outer batch is drawn once, with the training transform (frame sampling and
augmentation), and that same batch is used before every epoch (``strategies/outer_step.py``,
``OfficialOuterStep``).

``dmgl-official-eq3`` keeps all of the above except alpha's gradient: it takes Eq. 3 with conjugate gradient
(weight decay in H) at the end of each epoch, stepped with Adam, so that the two rules can be compared with
everything else held fixed. Its objective is twice Eq. 1, so its H is ``2 H_L + wd``; the hypergradient is taken
with the unscaled losses and ``H_L + wd / 2`` (the factor 2 cancels), so the weight decay weighs against the loss
Hessian as it does in training.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from dmgl_cli.methods.fusion_base import FusionMethod, FusionModel, encoders_for
from dmgl_cli.methods.sum import SumFusion


class MeanOfHeadsFusion(SumFusion):
    """``AVClassifier``'s heads: one linear classifier (with bias) per modality; the fused logits whose cross-entropy
    is L_CLS are their mean ½(o_a + o_v) (the released code's ``0.5 * o_v + 0.5 * o_a``)."""

    def forward(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
        summed, unimodal, extras = super().forward(embeddings)
        return summed / len(unimodal), unimodal, extras


class DMGLOfficialMethod(FusionMethod, method="dmgl-official"):
    """The released code's variant of Ours-LB; see the module docstring for how it differs from the paper."""

    objective_scale = 2.0  # train_audio_video: loss = 2 * (cls_k[0] * loss_cls + cls_k[1] * loss_alignment)

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> FusionModel:
        encoders = encoders_for(self.config, modalities, num_classes)
        return FusionModel(encoders, MeanOfHeadsFusion(list(modalities), self.config.model.embed_dim, num_classes))


class DMGLOfficialEq3Method(DMGLOfficialMethod, method="dmgl-official-eq3"):
    """``dmgl-official`` with alpha's gradient taken from Eq. 3 (CG) instead of the released rule."""
