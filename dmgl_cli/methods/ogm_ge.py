"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

Each step, after backward, the discrepancy ratio of the batch compares how well each modality alone predicts the
labels — the sum over the batch of its softmax score on the true class, with its per-modality logits from Concat's
head split (``W_j z_j + b / m``, as the authors' code computes ``out_a`` / ``out_v``):

    s_j = sum_i softmax(logits_j)[i, y_i],     rho_j = s_j / mean_{k != j} s_k

The dominant modality (rho_j > 1) has its encoder gradients multiplied by ``1 - tanh(alpha * rho_j)``; the others
keep coefficient 1. Generalisation enhancement then adds Gaussian noise N(0, std(g)) to every modulated tensor's
gradient ``g`` (every modality's, as the authors' code does, whatever its coefficient).

Choices taken from the authors' code (github.com/GeWu-Lab/OGM-GE_CVPR2022, ``main.py``), where the paper leaves
them open: the coefficient uses ``tanh(alpha * relu(rho))`` (not ``rho - 1``); the modulated tensors are the encoder
weights of rank >= 2 (the code's 4-D test selects ResNet18's convolution kernels; ranks >= 2 select the same kernels
there and the weight matrices of MLP encoders, never biases or normalisation parameters); the noise is added after
scaling with std ``g.std() + 1e-8``; modulation runs from ``modulation_starts`` to ``modulation_ends`` (defaults 0
and 50 there, 0-based; here ``start_epoch`` 1 and ``end_epoch`` 51, 1-based, both inclusive); alpha = 0.8 (the
README's CREMA-D command). With more than two modalities ``rho_j`` compares modality j with the mean score of the
others, which is the paper's ratio when there are two.

Settings (``method.options.ogm-ge.*``): ``alpha`` (> 0, default 0.8), ``start_epoch`` / ``end_epoch`` (1-based,
inclusive; default 1 and 51), ``noise`` (true: OGM-GE; false: OGM without generalisation enhancement).
Logged per epoch: ``ogm_coeff_<modality>`` (mean coefficient over the steps) and ``ogm_ratio_<modality>``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dmgl_cli.errors import DmglError
from dmgl_cli.methods.rebalance_base import RebalanceMethod, encoder_parameters
from dmgl_cli.models import ModelOutput, MultimodalModel


def true_class_scores(unimodal_logits: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
    """``sum_i softmax(logits_j)[i, y_i]`` per modality (the discrepancy scores of OGM-GE and PMR)."""
    return {m: torch.softmax(z.detach().float(), dim=1).gather(1, labels[:, None]).sum() for m, z in unimodal_logits.items()}


def discrepancy_ratios(scores: dict[str, Tensor]) -> dict[str, float]:
    """``rho_j = s_j / mean_{k != j} s_k``; for two modalities the paper's ``s_a / s_v`` and its inverse."""
    ratios = {}
    for modality, score in scores.items():
        others = [s for m, s in scores.items() if m != modality]
        ratios[modality] = float(score / (torch.stack(others).mean() + 1e-12))
    return ratios


class OGMGEMethod(RebalanceMethod):
    """On-the-fly gradient modulation with generalisation enhancement; see the module docstring."""

    name = "ogm-ge"
    defaults: dict[str, Any] = {"alpha": 0.8, "start_epoch": 1, "end_epoch": 51, "noise": True}

    def check(self) -> None:
        super().check()
        self.read_modulation_window()
        if not isinstance(self.settings["noise"], bool):
            raise DmglError(f"{self.key('noise')} must be true or false, got {self.settings['noise']!r}")
        self.noise = self.settings["noise"]

    def coefficients(self, output: ModelOutput, labels: Tensor) -> tuple[dict[str, float], dict[str, float]]:
        ratios = discrepancy_ratios(true_class_scores(output.unimodal_logits, labels))
        coefficients = {m: 1.0 - float(torch.tanh(torch.tensor(self.alpha * max(rho, 0.0)))) if rho > 1 else 1.0
                        for m, rho in ratios.items()}
        return coefficients, ratios

    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        if not self.start_epoch <= step["epoch"] <= self.end_epoch:
            return
        coefficients, ratios = self.coefficients(output, labels)
        for modality, coefficient in coefficients.items():
            for param in encoder_parameters(model, modality):
                if param.grad is None or param.grad.dim() < 2:
                    continue
                grad = param.grad * coefficient
                if self.noise:
                    grad = grad + torch.randn_like(grad) * (float(param.grad.std()) + 1e-8)
                param.grad = grad
        self.track({f"ogm_coeff_{m}": c for m, c in coefficients.items()})
        self.track({f"ogm_ratio_{m}": r for m, r in ratios.items()})
