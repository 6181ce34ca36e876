"""AGM: adaptive gradient modulation (Li et al., ICCV 2023).

Modality responses. Each modality's contribution to the prediction is its Shapley value over the modalities,
obtained by running the model with the other inputs zeroed ("padded"): with f(S) the logits when only the
modalities in S are given, ``phi_j = sum_{S without j} |S|!(m-|S|-1)!/m! (f(S + j) - f(S))``. For two modalities
this is the authors' ``m_a = (f(a,v) - f(0,v) + f(a,0) - f(0,0)) / 2``. The model's prediction is
``sum_j phi_j = f(all) - f(none)`` (the code's ``out = m_a + m_v``), and the ``phi_j`` are the per-modality outputs.

Modulation. Per step, ``score_j`` is the cross-entropy of ``phi_j`` on the batch (probabilities floored at 1e-8);
``ratio_j = exp(m/(m-1) * (mean_k score_k - score_j))`` (for two modalities ``exp(score_v - score_a)``); the target
``optimal_ratio_j`` is the same expression on the running averages of the scores over all past steps; the gradient
that flows through ``phi_j`` is multiplied by ``coeff_j = exp(alpha * min(optimal_ratio_j - ratio_j, 10))``. A
modality that is currently ahead of its running balance is slowed down, one that is behind is sped up.

From the authors' code (github.com/lihong2303/AGM_ICCV2023), where the paper leaves it open: the coefficient scales
the gradient of ``phi_j`` in the backward pass (their backward hooks on the modality outputs — here a gradient-
scaling autograd function whose coefficient is set from the batch before backward, in ``extra_losses``); the running
averages start at 0 and are cumulative means over every step so far, updated after the coefficients are computed;
``alpha = 1.0``; modulation from epoch ``start_epoch`` to ``end_epoch``. The exponent is capped at 10 so that one
bad batch cannot blow the step up (public re-implementations cap it; the value is ours to state, not the paper's).

Settings (``method.options.agm.*``): ``alpha`` (> 0, default 1.0), ``start_epoch`` / ``end_epoch`` (1-based,
inclusive; default 1 and 1000). 2^m forward passes per step (4 for two modalities). Logged per epoch:
``agm_coeff_<modality>``, ``agm_ratio_<modality>``, ``agm_score_<modality>`` (running average).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

from dmgl_cli.errors import DmglError
from dmgl_cli.methods.rebalance_base import RebalanceMethod, scale_gradient
from dmgl_cli.models import ModelOutput, MultimodalModel


def shapley_weights(count: int) -> dict[int, float]:
    """Weight of a coalition of size s (not containing the player) among ``count`` players."""
    return {s: math.factorial(s) * math.factorial(count - s - 1) / math.factorial(count) for s in range(count)}


class AGMMethod(RebalanceMethod):
    """Adaptive gradient modulation on Shapley modality responses; see the module docstring."""

    name = "agm"
    per_modality_source = "own"
    defaults: dict[str, Any] = {"alpha": 1.0, "start_epoch": 1, "end_epoch": 1000}

    def __init__(self, config, options: dict[str, Any]):
        super().__init__(config, options)
        self.coefficients: dict[str, float] = {}  # read by the backward pass
        self.running_scores: dict[str, float] = {}
        self.iterations = 0

    def check(self) -> None:
        super().check()
        self.read_modulation_window()

    def forward(self, model: MultimodalModel, inputs: dict[str, Tensor], training: bool) -> ModelOutput:
        modalities = model.modalities
        if len(modalities) < 2:
            raise DmglError("method 'agm' needs at least two modalities")
        full = model(inputs)
        responses: dict[frozenset, Tensor] = {frozenset(modalities): full.logits}
        for size in range(len(modalities)):
            for subset in itertools.combinations(modalities, size):
                padded = {m: inputs[m] if m in subset else torch.zeros_like(inputs[m]) for m in modalities}
                responses[frozenset(subset)] = model(padded).logits
        weights = shapley_weights(len(modalities))
        phis = {}
        for modality in modalities:
            others = [m for m in modalities if m != modality]
            phi = 0
            for size in range(len(others) + 1):
                for subset in itertools.combinations(others, size):
                    coalition = frozenset(subset)
                    phi = phi + weights[size] * (responses[coalition | {modality}] - responses[coalition])
            if training:
                self.coefficients.setdefault(modality, 1.0)
                phi = scale_gradient(phi, self.coefficients, modality)
            phis[modality] = phi
        logits = torch.stack(list(phis.values())).sum(dim=0)
        return ModelOutput(logits=logits, unimodal_logits=phis, embeddings=full.embeddings)

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
            self.running_scores = {m: 0.0 for m in scores}  # the authors' code starts the averages at 0
        mean_running = sum(self.running_scores.values()) / count
        optimal = {m: math.exp(factor * (mean_running - s)) for m, s in self.running_scores.items()}
        active = self.start_epoch <= step["epoch"] <= self.end_epoch
        for modality in scores:
            exponent = min(optimal[modality] - ratios[modality], 10.0)
            self.coefficients[modality] = math.exp(self.alpha * exponent) if active else 1.0
        self.iterations += 1
        for modality, score in scores.items():
            self.running_scores[modality] += (score - self.running_scores[modality]) / self.iterations
        self.track({f"agm_coeff_{m}": c for m, c in self.coefficients.items()})
        self.track({f"agm_ratio_{m}": r for m, r in ratios.items()})
        return {}

    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        return {**self.epoch_statistics(), **{f"agm_score_{m}": s for m, s in self.running_scores.items()}}

    def method_state(self) -> dict[str, Any]:
        return {"running_scores": dict(self.running_scores), "iterations": self.iterations,
                "coefficients": dict(self.coefficients)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.running_scores = {k: float(v) for k, v in state.get("running_scores", {}).items()}
        self.iterations = int(state.get("iterations", 0))
        self.coefficients.clear()
        self.coefficients.update({k: float(v) for k, v in state.get("coefficients", {}).items()})
