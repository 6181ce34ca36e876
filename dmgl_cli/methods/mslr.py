"""MSLR: modality-specific learning rates for late fusion (Yao & Mihalcea, Findings of ACL 2022).

Concat with a linear head is additive late fusion — its logits are the sum of the per-modality predictions
``W_j z_j`` plus a bias — so MSLR applies to it directly: each modality's encoder gets its own learning rate, the
fusion head keeps the global one. The optimiser has one parameter group per modality encoder and one for the rest;
before every epoch a modality's rate is ``lr_scale_j * dynamic_j * lr``, with ``lr`` the shared group's current rate
(so the LR scheduler still applies to every group).

The paper proposes three ways to set the rates: *keep* the rates that suit each uni-modal model (``schedule:
keep``: ``lr_scale`` per modality, fixed), *smooth* and *dynamic*. ``schedule: dynamic`` (the default) follows the
MSLR baseline in the code of AGM (Li et al., ICCV 2023; github.com/lihong2303/AGM_ICCV2023), which the comparison
tables of this line of work reuse: once ``window`` epochs have been seen, ``dynamic_j`` is modality j's validation
accuracy this epoch divided by its mean over the previous ``window`` epochs (5 there), so a modality that is still
improving learns faster and one that has stalled slows down. That code uses initial scales of 1.3 (audio) and 0.7
(visual); they are dataset-specific and go in a recipe as ``lr_scale: {audio: 1.3, visual: 0.7}`` (default 1.0).
The per-modality accuracy is that of Concat's head split on the validation split.

Settings (``method.options.mslr.*``): ``lr_scale`` (a number, or ``{modality: number}``; default 1.0),
``schedule`` (keep | dynamic; default dynamic), ``window`` (>= 1, default 5).
Logged per epoch: ``mslr_lr_<modality>`` (the rate the epoch trained with) and ``mslr_dynamic_<modality>``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dmgl_cli.methods.rebalance_base import RebalanceMethod
from dmgl_cli.models import MultimodalModel


class MSLRMethod(RebalanceMethod):
    """Modality-specific learning rates; see the module docstring."""

    name = "mslr"
    defaults: dict[str, Any] = {"lr_scale": 1.0, "schedule": "dynamic", "window": 5}

    def __init__(self, config, options: dict[str, Any]):
        super().__init__(config, options)
        self.dynamic: dict[str, float] = {}
        self.memory: dict[str, list[float]] = {}

    def check(self) -> None:
        super().check()
        self.schedule = self.setting_choice("schedule", ("keep", "dynamic"))
        self.window = self.setting_int("window", 1)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        self.scales = self.per_modality_floats("lr_scale", list(model.encoders), 1.0)
        encoder_ids = {id(p) for p in model.encoders.parameters()}
        shared = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
        groups = [{"params": shared, "modality": None}]
        for modality, encoder in model.encoders.items():
            groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "modality": modality,
                           "lr": self.config.optim.lr * self.scales[modality]})
        return groups

    def start_of_epoch(self, model: MultimodalModel, epoch: int) -> None:
        groups = self.trainer.optimizer.param_groups
        shared_lr = next(g["lr"] for g in groups if g.get("modality") is None)
        for group in groups:
            modality = group.get("modality")
            if modality is None:
                continue
            group["lr"] = shared_lr * self.scales[modality] * self.dynamic.get(modality, 1.0)
            self.track({f"mslr_lr_{modality}": group["lr"], f"mslr_dynamic_{modality}": self.dynamic.get(modality, 1.0)})

    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        if self.schedule == "dynamic":
            for modality in model.encoders:
                accuracy = val_metrics.get(f"val_acc_{modality}")
                if accuracy is None:
                    continue
                history = self.memory.setdefault(modality, [])
                if len(history) >= self.window:
                    mean = sum(history[-self.window:]) / self.window
                    self.dynamic[modality] = accuracy / mean if mean > 0 else 1.0
                history.append(accuracy)
                del history[:-self.window]
        return self.epoch_statistics()

    def method_state(self) -> dict[str, Any]:
        return {"dynamic": dict(self.dynamic), "memory": {m: list(h) for m, h in self.memory.items()}}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.dynamic = {k: float(v) for k, v in state.get("dynamic", {}).items()}
        self.memory = {k: [float(x) for x in v] for k, v in state.get("memory", {}).items()}
