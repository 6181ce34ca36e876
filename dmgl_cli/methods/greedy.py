"""Greedy: balancing the conditional learning speed (Wu, Jastrzebski, Cho & Geras, ICML 2022, "Characterizing and
overcoming the greedy nature of learning in multi-modal deep neural networks").

The paper measures how fast a multi-modal network learns from each modality with a *learning speed* built from the
effective update ``mu(theta) = ||grad_theta L||^2 / ||theta||^2`` of the parameters a modality flows through,
accumulated over training (``M = sum_t mu_t``), and balances the two modalities' speeds. Its network has
uni-directional fusion (MMTM) layers between two uni-modal branches, and its conditional speed compares those
layers with the branches. Concat has no such layers; what modality j's input alone flows through is its encoder
and its columns ``W_j`` of the fusion head, so here

    s_j = log M(encoder_j, W_j),       d_speed = s_a - s_b.

Balanced multi-modal learning alternates *normal* steps with *re-balancing* steps: after a normal step with
``|d_speed| > tolerance``, the next ``window`` steps re-balance towards the slower modality (smaller s_j) — only
its branch is updated (the other modality's encoder and head columns get no gradient) — then training returns to
normal steps. The effective updates are measured from every step's full gradient, before re-balancing drops part
of it. Like the paper, the method is defined for exactly two modalities (§4 of the DMGL paper lists Greedy as a
two-modality method). The tolerance and window are tuned per dataset in the paper; the defaults here (0.1, 5
steps) are ours.

Settings (``method.options.greedy.*``): ``tolerance`` (>= 0, default 0.1), ``window`` (>= 1, default 5).
Logged per epoch: ``greedy_rebalance_steps_<modality>`` (steps spent re-balancing towards it), ``greedy_speed_<m>``
(s_j at the epoch's end), ``greedy_dspeed`` (mean over the epoch's normal steps).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from dmgl_cli.errors import DmglError
from dmgl_cli.methods.rebalance_base import (
    RebalanceMethod,
    concat_head,
    encoder_parameters,
    head_columns,
    relative_update,
)
from dmgl_cli.models import ModelOutput, MultimodalModel


class GreedyMethod(RebalanceMethod):
    """Balanced multi-modal learning by learning speed; see the module docstring."""

    name = "greedy"
    defaults: dict[str, Any] = {"tolerance": 0.1, "window": 5}

    def __init__(self, config, options: dict[str, Any]):
        super().__init__(config, options)
        self.accumulated: dict[str, float] = {}  # modality -> M, its branch's accumulated effective update
        self.target: str | None = None  # modality being re-balanced towards
        self.remaining = 0

    def check(self) -> None:
        super().check()
        self.tolerance = self.setting_float("tolerance", 0.0)
        self.window = self.setting_int("window", 1)

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> MultimodalModel:
        if len(modalities) != 2:
            raise DmglError(f"method 'greedy' balances the conditional learning speed between exactly two modalities; "
                            f"dataset {self.config.dataset!r} has {len(modalities)}: {', '.join(modalities)}")
        return super().build_model(modalities, num_classes)

    def speeds(self) -> dict[str, float]:
        return {m: math.log(total + 1e-30) for m, total in self.accumulated.items()}

    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        weight = concat_head(model).head.weight
        for modality in model.modalities:
            columns = head_columns(model, modality)
            params = [*encoder_parameters(model, modality), weight[:, columns]]
            grads = [p.grad for p in encoder_parameters(model, modality)]
            grads.append(weight.grad[:, columns] if weight.grad is not None else None)
            self.accumulated[modality] = self.accumulated.get(modality, 0.0) + relative_update(params, grads)

        if self.remaining > 0:  # a re-balancing step: only the target modality's branch learns
            for modality in model.modalities:
                if modality == self.target:
                    continue
                for param in encoder_parameters(model, modality):
                    param.grad = None
                if weight.grad is not None:
                    weight.grad[:, head_columns(model, modality)] = 0.0
            self.count(f"greedy_rebalance_steps_{self.target}")
            self.remaining -= 1
            return
        speeds = self.speeds()
        first, second = model.modalities
        dspeed = speeds[first] - speeds[second]
        self.track({"greedy_dspeed": dspeed})
        if abs(dspeed) > self.tolerance:
            self.target = first if speeds[first] < speeds[second] else second
            self.remaining = self.window

    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        metrics = self.epoch_statistics()
        for modality in model.modalities:
            metrics.setdefault(f"greedy_rebalance_steps_{modality}", 0.0)
        if self.accumulated:
            metrics.update({f"greedy_speed_{m}": s for m, s in self.speeds().items()})
        return metrics

    def method_state(self) -> dict[str, Any]:
        return {"accumulated": dict(self.accumulated), "target": self.target, "remaining": self.remaining}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.accumulated = {k: float(v) for k, v in state.get("accumulated", {}).items()}
        self.target = state.get("target")
        self.remaining = int(state.get("remaining", 0))
