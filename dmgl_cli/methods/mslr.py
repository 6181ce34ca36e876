"""MSLR: modality-specific learning rates for late fusion (Yao & Mihalcea, Findings of ACL 2022).

Follows the MSLR baseline in the code of AGM (Li et al., ICCV 2023), github.com/lihong2303/AGM_ICCV2023, which the
comparison tables of this line of work reuse: ``run/CREMAD_main.py`` (likewise ``AVMNIST_main.py``,
``URFunny_main.py``), function ``train`` (the ``methods == "MSLR"`` branch) and the epoch loop of ``CREMAD_main``
(the ``audio_lr_memory`` update). We found no code from the MSLR authors.

Concat with a linear head is additive late fusion — its logits are the sum of the per-modality predictions
``W_j z_j`` plus a bias, the AGM code's ``audio_cls(a) + visual_cls(v)`` — so MSLR applies to it directly.
Modality j's rate is scaled by

    coeff_j = lr_scale_j * dynamic_j

and, as in that code, the scaling is applied to the GRADIENTS of modality j's branch after backward: its encoder
and its classifier, i.e. its columns ``W_j`` of the head (``params.grad * mslr_audio_coeff`` for every parameter
of ``audio_net`` and ``audio_cls``). With plain SGD that is a learning rate of ``coeff_j * lr``; the weight decay
the optimiser adds is not scaled. The scaling is active in epochs ``start_epoch..end_epoch`` (the code's
``modulation_starts <= epoch <= modulation_ends``, defaults 0 and 20 with 1-based epochs: epochs 1-20); outside
them every branch trains at the global rate.

``dynamic_j`` (``schedule: dynamic``, the code's ``audio_lr_ratio``) starts at 1; after each epoch, once
``window`` (5) accuracies are stored, it becomes modality j's validation accuracy this epoch divided by the mean of
the stored ones, and the window slides. It is updated every epoch, inside or outside the modulation window.
``schedule: keep`` fixes ``dynamic_j = 1`` (the paper's "keep" strategy). ``lr_scale`` is the code's
``*_lr_init_coeff``: dataset-specific there (AV-MNIST audio 1.3 / visual 0.7, CREMA-D 0.9 / 1.1, UR-Funny audio 0.9 /
visual 1.4 / text 0.7), so the default is 1.0 and a recipe sets its dataset's values.

Deviations from the AGM code:

* Concat has ONE bias shared by the modalities (AGM's late-fusion model has one per modality classifier); it is
  not scaled.
* The per-modality accuracy is that of Concat's head split on the validation split (the code uses its test
  loader). The CREMA-D ``test`` there counts ``acc_a`` when the VISUAL prediction is right (a slip that makes both
  ratios follow the visual accuracy); the true per-modality accuracies are used here.
* ``scaling: learning-rate`` (ours) gives each encoder its own optimiser parameter group with rate
  ``coeff_j * lr`` instead (the head, one tensor, keeps the global rate). Use it with Adam: Adam normalises the
  gradient, so the code's gradient scaling has almost no effect under Adam.

Settings (``method.options.mslr.*``): ``lr_scale`` (a number, or ``{modality: number}``; default 1.0),
``schedule`` (keep | dynamic; default dynamic), ``window`` (>= 1, default 5), ``start_epoch`` / ``end_epoch``
(1-based, inclusive; default 1 and 20), ``scaling`` (gradient | learning-rate; default gradient).
Logged per epoch: ``mslr_coeff_<modality>`` (the factor the epoch trained with: 1 outside the window),
``mslr_lr_<modality>`` (the rate that amounts to) and ``mslr_dynamic_<modality>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dmgl_cli.catalogue.options import MSLROptions
from dmgl_cli.methods.rebalance_base import RebalanceMethod, concat_head, encoder_parameters, head_columns
from dmgl_cli.models import ModelOutput, MultimodalModel

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config


@torch.no_grad()
def scale_branch_gradients(model: MultimodalModel, coefficients: dict[str, float]) -> None:
    """Multiply the gradients of each modality's encoder and of its head columns ``W_j`` by its coefficient."""
    weight = concat_head(model).head.weight
    for modality, coefficient in coefficients.items():
        for param in encoder_parameters(model, modality):
            if param.grad is not None:
                param.grad.mul_(coefficient)
        if weight.grad is not None:
            weight.grad[:, head_columns(model, modality)] *= coefficient


class MSLRMethod(RebalanceMethod, method="mslr"):
    """Modality-specific learning rates; see the module docstring."""

    options: MSLROptions

    def __init__(self, config: Config, options: MSLROptions):
        super().__init__(config, options)
        self.dynamic: dict[str, float] = {}
        self.memory: dict[str, list[float]] = {}
        self.coefficients: dict[str, float] = {}  # in force this epoch (1 outside the window)

    def param_groups(self, model: MultimodalModel) -> list[dict[str, Any]]:
        self.scales = self.per_modality_floats("lr_scale", list(model.encoders), 1.0)
        if self.options.scaling == "gradient":
            return super().param_groups(model)
        encoder_ids = {id(p) for p in model.encoders.parameters()}
        shared = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
        groups = [{"params": shared, "modality": None}]
        for modality, encoder in model.encoders.items():
            groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "modality": modality})
        return groups

    def coefficients_for(self, epoch: int) -> dict[str, float]:
        """``lr_scale_j * dynamic_j`` per modality in the modulation window, 1 outside it."""
        active = self.options.start_epoch <= epoch <= self.options.end_epoch
        return {m: self.scales[m] * self.dynamic.get(m, 1.0) if active else 1.0 for m in self.scales}

    def start_of_epoch(self, model: MultimodalModel, epoch: int) -> None:
        self.coefficients = self.coefficients_for(epoch)
        assert self.trainer is not None  # attached before the first epoch starts
        groups = self.trainer.optimizer.param_groups
        shared_lr = next((g["lr"] for g in groups if g.get("modality") is None), groups[0]["lr"])
        for group in groups:
            if group.get("modality") is not None:
                group["lr"] = shared_lr * self.coefficients[group["modality"]]
        for modality, coefficient in self.coefficients.items():
            self.track(
                {
                    f"mslr_coeff_{modality}": coefficient,
                    f"mslr_lr_{modality}": shared_lr * coefficient,
                    f"mslr_dynamic_{modality}": self.dynamic.get(modality, 1.0),
                }
            )

    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        if self.options.scaling == "gradient":
            # Read per step, not from start_of_epoch: the same coefficients, also right after a mid-epoch resume.
            scale_branch_gradients(model, self.coefficients_for(step["epoch"]))

    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        if self.options.schedule == "dynamic":
            for modality in model.encoders:
                accuracy = val_metrics.get(f"val_acc_{modality}")
                if accuracy is None:
                    continue
                history = self.memory.setdefault(modality, [])
                if len(history) >= self.options.window:
                    mean = sum(history[-self.options.window :]) / self.options.window
                    self.dynamic[modality] = accuracy / mean if mean > 0 else 1.0
                history.append(accuracy)
                del history[: -self.options.window]
        return self.epoch_statistics()

    def method_state(self) -> dict[str, Any]:
        return {"dynamic": dict(self.dynamic), "memory": {m: list(h) for m, h in self.memory.items()}}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.dynamic = {k: float(v) for k, v in state.get("dynamic", {}).items()}
        self.memory = {k: [float(x) for x in v] for k, v in state.get("memory", {}).items()}
