"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

Follows the authors' code, github.com/GeWu-Lab/OGM-GE_CVPR2022, ``main.py``, function ``train_epoch`` (the
modulation block after ``loss.backward()``), with its argument defaults.

Each step, after backward, the discrepancy ratio of the batch compares how well each modality alone predicts the
labels — the sum over the batch of its softmax score on the true class, with its per-modality logits from Concat's
head split (``W_j z_j + b / m``, as the code computes ``out_a`` / ``out_v``):

    s_j = sum_i softmax(logits_j)[i, y_i],     rho_j = s_j / mean_{k != j} s_k

The dominant modality (rho_j > 1) gets the coefficient ``1 - tanh(alpha * relu(rho_j))``, the others 1. Every
modulated gradient tensor ``g`` of a modality's encoder becomes ``coeff_j * g + N(0, std(g) + 1e-8)`` (std of the
unscaled gradient; the noise is the generalisation enhancement, added to every modality's tensors, whatever the
coefficient). The modulated tensors are, as in the code (``len(parm.grad.size()) == 4``), the encoder's 4-D
gradients — the kernels of 2-D convolutions (ResNet18's); not the projection to the embedding, biases or
normalisation parameters. Modulation runs from ``start_epoch`` to ``end_epoch`` (the code's ``modulation_starts`` 0
and ``modulation_ends`` 50, 0-based and inclusive: epochs 1..51 here). ``alpha`` 0.8 is the README's CREMA-D
command (the code has no default).

Deviations from the authors' code:
- with more than two modalities ``rho_j`` compares modality j with the mean score of the others (the paper's
  ratio when there are two);
- at an exact tie (rho = 1) no modality is modulated; the code's ``else`` branch then modulates the audio one;
- ``params`` other than ``conv2d`` are ours: an encoder without 2-D convolutions (MLP, BERT, 3-D video ResNets)
  has no 4-D gradients, so the code's rule leaves it unmodulated (a warning says so once per modality).

Settings (``method.options.ogm-ge.*``): ``alpha`` (> 0, default 0.8), ``start_epoch`` / ``end_epoch`` (1-based,
inclusive; default 1 and 51), ``noise`` (true: OGM-GE; false: OGM, the code's ``--modulation OGM``), ``params``
(which encoder gradients are modulated: ``conv2d`` the code's 4-D tensors; ``conv`` every convolution kernel,
tensors of rank >= 3, also 3-D video kernels; ``weights`` every tensor of rank >= 2, also Linear projections and
MLP encoders).
Logged per epoch: ``ogm_coeff_<modality>`` (mean coefficient over the steps) and ``ogm_ratio_<modality>``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dmgl_cli.catalogue.options import OGMGEOptions
from dmgl_cli.methods.rebalance_base import RebalanceMethod, encoder_parameters
from dmgl_cli.models import ModelOutput, MultimodalModel

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config

# ``params`` setting -> whether a gradient of that rank is modulated.
PARAMETER_SELECTIONS = {
    "conv2d": lambda rank: rank == 4,  # the authors' `len(parm.grad.size()) == 4`
    "conv": lambda rank: rank >= 3,
    "weights": lambda rank: rank >= 2,
}


def true_class_scores(unimodal_logits: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
    """``sum_i softmax(logits_j)[i, y_i]`` per modality (the discrepancy scores of OGM-GE and PMR)."""
    return {
        m: torch.softmax(z.detach().float(), dim=1).gather(1, labels[:, None]).sum() for m, z in unimodal_logits.items()
    }


def discrepancy_ratios(scores: dict[str, Tensor]) -> dict[str, float]:
    """``rho_j = s_j / mean_{k != j} s_k``; for two modalities the paper's ``s_a / s_v`` and its inverse."""
    ratios = {}
    for modality, score in scores.items():
        others = [s for m, s in scores.items() if m != modality]
        ratios[modality] = float(score / (torch.stack(others).mean() + 1e-12))
    return ratios


def ogm_coefficients(ratios: dict[str, float], alpha: float) -> dict[str, float]:
    """``1 - tanh(alpha * relu(rho))`` for a dominant modality (rho > 1), 1 for the others."""
    return {
        m: 1.0 - float(torch.tanh(torch.tensor(alpha * max(rho, 0.0)))) if rho > 1 else 1.0 for m, rho in ratios.items()
    }


class OGMGEMethod(RebalanceMethod, method="ogm-ge"):
    """On-the-fly gradient modulation with generalisation enhancement; see the module docstring."""

    options: OGMGEOptions

    def __init__(self, config: Config, options: OGMGEOptions):
        super().__init__(config, options)
        self._warned: set[str] = set()

    def modulated_parameters(self, model: MultimodalModel, modality: str) -> list[nn.Parameter]:
        """The encoder tensors of ``modality`` whose gradients are modulated (by rank, see ``params``)."""
        selected = PARAMETER_SELECTIONS[self.options.params]
        chosen = [p for p in encoder_parameters(model, modality) if selected(p.dim())]
        if not chosen and modality not in self._warned:
            self._warned.add(modality)
            logging.getLogger("dmgl").warning(
                f"{self.key('params')}={self.options.params}: the {modality} encoder has no such parameters, so OGM-GE leaves "
                f"its gradients unmodulated (the authors' code modulates 2-D convolution kernels only); "
                f"--set {self.key('params')}=weights modulates its weight matrices too"
            )
        return chosen

    def coefficients(self, output: ModelOutput, labels: Tensor) -> tuple[dict[str, float], dict[str, float]]:
        ratios = discrepancy_ratios(true_class_scores(output.unimodal_logits, labels))
        return ogm_coefficients(ratios, self.options.alpha), ratios

    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        if not self.options.start_epoch <= step["epoch"] <= self.options.end_epoch:
            return
        coefficients, ratios = self.coefficients(output, labels)
        for modality, coefficient in coefficients.items():
            for param in self.modulated_parameters(model, modality):
                if param.grad is None:
                    continue
                grad = param.grad * coefficient
                if self.options.noise:
                    grad = grad + torch.randn_like(grad) * (float(param.grad.std()) + 1e-8)
                param.grad = grad
        self.track({f"ogm_coeff_{m}": c for m, c in coefficients.items()})
        self.track({f"ogm_ratio_{m}": r for m, r in ratios.items()})
