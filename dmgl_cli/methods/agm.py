"""AGM: adaptive gradient modulation (Li et al., ICCV 2023).

Follows the authors' code, github.com/lihong2303/AGM_ICCV2023: ``model/CREMAD_net.py`` (``GradMod.forward``, the
``Modality_Audio`` / ``Modality_Visual`` responses and the backward hooks ``hooka`` / ``hookv``) and
``run/CREMAD_main.py`` (``train``: the scores, ratios, coefficients and the conditional gradient clip).

Modality responses. The model runs once on the real inputs (in the model's current mode) and once per proper,
non-empty subset S of the modalities with the other inputs replaced by zeros ("padded"), these passes in eval mode
(the authors call ``net.eval()`` around them: BatchNorm uses and keeps its running statistics, dropout is off) and
with gradients. With f(S) those logits, a modality's response is its Shapley value in the game v(S) = f(S) for
S non-empty and v(empty) = 0 — the all-zero pass is not part of it:

    phi_j = sum_{S without j} |S|! (m - |S| - 1)! / m! * (v(S + j) - v(S))

For two modalities this is the authors' ``m_a = (f(a,v) - f(0,v) + f(a,0)) / 2``; for three it is their UR-Funny
``Modality_Text`` formula. The responses sum to f(all), the model's prediction (the code's ``out = m_a + m_v``);
the ``phi_j`` are the per-modality outputs that are scored.

Modulation. Per step, ``score_j`` is the cross-entropy of ``phi_j`` on the batch (probabilities floored at 1e-8),
``ratio_j = exp(m/(m-1) * (mean_k score_k - score_j))`` (for two modalities ``exp(score_v - score_a)``), the target
``optimal_ratio_j`` is the same expression on the running means of the scores over every step so far (starting at
0, updated after the coefficients), and the gradient that flows back through ``phi_j`` is multiplied by
``coeff_j = exp(alpha * min(optimal_ratio_j - ratio_j, cap))``. A modality ahead of its running balance is slowed
down, one behind it is sped up. The coefficients are applied from ``start_epoch`` to ``end_epoch``; before that
they are 1 and after it they stay at their last value (the authors' hooks keep the scale last set). After the
backward pass, when an entry of the gradient of the fused head's weight lies outside [-1, 1], all gradients are
clipped to total norm 1.0 (the authors' check on ``fc_out.weight.grad``).

Defaults are the code's: ``alpha`` 1.0 (``--alpha``), modulation epochs 1..20 (``--modulation_starts 0
--modulation_ends 20`` with 1-based epochs), cap 10 (CREMA-D; the UR-Funny script caps at 7, the MOSEI script does
not cap).

Deviations from the authors' code:
- the all-zero pass f(0, ..., 0) is not run: the code computes it and never uses it in the responses or the loss;
- the coefficient scales the gradient of ``phi_j`` through an autograd function (``scale_gradient``) instead of a
  module backward hook; the coefficients are set from the batch in ``extra_losses``, before the backward pass;
- more than three modalities use the same Shapley form (the code has two- and three-modality versions only);
- the model is our Concat (encoders, concatenation, linear head); the clip checks that head's weight.

Settings (``method.options.agm.*``): ``alpha`` (> 0, 1.0), ``start_epoch`` / ``end_epoch`` (1-based, inclusive;
1 and 20), ``cap`` (> 0 or null for none; 10), ``hold_after_window`` (true: the code's last coefficients stay after
``end_epoch``; false: ours, they return to 1), ``clip`` (true: the code's conditional clip; false: none).
2^m - 1 forward passes per step (3 for two modalities). Logged per epoch: ``agm_coeff_<modality>`` (applied),
``agm_ratio_<modality>``, ``agm_score_<modality>`` (running mean), ``agm_clipped`` (fraction of clipped steps).
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dmgl_cli.catalogue.options import AGMOptions
from dmgl_cli.errors import DmglError
from dmgl_cli.methods.rebalance_base import RebalanceMethod, concat_head, scale_gradient
from dmgl_cli.models import ModelOutput, MultimodalModel

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config


def shapley_weights(count: int) -> dict[int, float]:
    """Weight of a coalition of size s (not containing the player) among ``count`` players."""
    return {s: math.factorial(s) * math.factorial(count - s - 1) / math.factorial(count) for s in range(count)}


def coalition_outputs(model: MultimodalModel, inputs: dict[str, Tensor]) -> tuple[ModelOutput, dict[frozenset, Tensor]]:
    """The model's output on the real inputs and the logits f(S) of every non-empty coalition S (the full one is
    that output's). The padded passes run in eval mode, as the authors' ``net.eval()`` does, so they neither move
    BatchNorm's running statistics nor use the zero batch's statistics; every submodule's mode is restored after."""
    modalities = model.modalities
    full = model(inputs)
    logits: dict[frozenset, Tensor] = {frozenset(modalities): full.logits}
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        for size in range(1, len(modalities)):
            for subset in itertools.combinations(modalities, size):
                padded = {m: inputs[m] if m in subset else torch.zeros_like(inputs[m]) for m in modalities}
                logits[frozenset(subset)] = model(padded).logits
    finally:
        for module, training in modes:
            module.training = training
    return full, logits


def shapley_responses(modalities: list[str], logits: dict[frozenset, Tensor]) -> dict[str, Tensor]:
    """``phi_j`` of the game v(S) = logits[S], v(empty) = 0; the responses sum to the full coalition's logits."""
    weights = shapley_weights(len(modalities))
    responses = {}
    for modality in modalities:
        others = [m for m in modalities if m != modality]
        phi = 0
        for size in range(len(others) + 1):
            for subset in itertools.combinations(others, size):
                coalition = frozenset(subset)
                without = logits[coalition] if coalition else 0
                phi = phi + weights[size] * (logits[coalition | {modality}] - without)
        responses[modality] = phi
    return responses


class AGMMethod(RebalanceMethod, method="agm"):
    """Adaptive gradient modulation on Shapley modality responses; see the module docstring."""

    options: AGMOptions

    def __init__(self, config: Config, options: AGMOptions):
        super().__init__(config, options)
        self.coefficients: dict[str, float] = {}  # read by the backward pass
        self.running_scores: dict[str, float] = {}
        self.iterations = 0

    def forward(self, model: MultimodalModel, inputs: dict[str, Tensor], training: bool) -> ModelOutput:
        modalities = model.modalities
        if len(modalities) < 2:
            raise DmglError("method 'agm' needs at least two modalities")
        full, logits = coalition_outputs(model, inputs)
        responses = shapley_responses(modalities, logits)
        if training:
            for modality in modalities:
                self.coefficients.setdefault(modality, 1.0)
                responses[modality] = scale_gradient(responses[modality], self.coefficients, modality)
        fused = torch.stack(list(responses.values())).sum(dim=0)
        return ModelOutput(logits=fused, unimodal_logits=responses, embeddings=full.embeddings)

    def extra_losses(self, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> dict[str, Tensor]:
        # The first hook that sees the labels: set this step's coefficients before the backward pass reads them.
        count = len(output.unimodal_logits)
        scores = {}
        for modality, phi in output.unimodal_logits.items():
            probs = torch.softmax(phi.detach().float(), dim=1).gather(1, labels[:, None]).clamp_min(1e-8)
            scores[modality] = float(-probs.log().mean())
        factor = count / (count - 1)
        mean_score = sum(scores.values()) / count
        ratios = {m: math.exp(factor * (mean_score - s)) for m, s in scores.items()}
        if not self.running_scores:
            self.running_scores = {m: 0.0 for m in scores}  # the authors' code starts the means at 0
        mean_running = sum(self.running_scores.values()) / count
        optimal = {m: math.exp(factor * (mean_running - s)) for m, s in self.running_scores.items()}
        epoch = step["epoch"]
        for modality in scores:
            if self.options.start_epoch <= epoch <= self.options.end_epoch:
                exponent = optimal[modality] - ratios[modality]
                if self.options.cap is not None:
                    exponent = min(exponent, self.options.cap)
                self.coefficients[modality] = math.exp(self.options.alpha * exponent)
            elif epoch < self.options.start_epoch or not self.options.hold_after_window:
                self.coefficients[modality] = 1.0
            else:  # after the window the authors' hooks keep the scale they were last given
                self.coefficients.setdefault(modality, 1.0)
        self.iterations += 1
        for modality, score in scores.items():
            self.running_scores[modality] += (score - self.running_scores[modality]) / self.iterations
        self.track({f"agm_coeff_{m}": self.coefficients[m] for m in scores})
        self.track({f"agm_ratio_{m}": r for m, r in ratios.items()})
        return {}

    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        if not self.options.clip:
            return
        weight_grad = concat_head(model).head.weight.grad
        clipped = weight_grad is not None and bool(weight_grad.abs().max() > 1.0)
        if clipped:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        self.track({"agm_clipped": float(clipped)})

    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        return {**self.epoch_statistics(), **{f"agm_score_{m}": s for m, s in self.running_scores.items()}}

    def method_state(self) -> dict[str, Any]:
        return {
            "running_scores": dict(self.running_scores),
            "iterations": self.iterations,
            "coefficients": dict(self.coefficients),
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.running_scores = {k: float(v) for k, v in state.get("running_scores", {}).items()}
        self.iterations = int(state.get("iterations", 0))
        self.coefficients.clear()
        self.coefficients.update({k: float(v) for k, v in state.get("coefficients", {}).items()})
