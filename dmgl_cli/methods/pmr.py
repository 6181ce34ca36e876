"""PMR: prototypical modal rebalance (Fan et al., CVPR 2023).

Prototypes. Before every epoch each modality's class prototypes are recomputed as the mean embedding ``z_j`` of
each class over the training split (model in eval mode, no gradient), and mixed with the previous epoch's:
``c = (1 - momentum) * c_new + momentum * c_old`` (not in the first epoch). A class absent from the pass keeps its
previous prototype.

Rebalancing. Each step, a modality's prototype classifier is ``p_j = softmax(-||z_j - c_j||_2)`` over the classes;
its score is ``s_j = sum_i p_j[i, y_i]`` and its ratio ``rho_j = s_j / mean_{k != j} s_k``. The slower modality
(rho_j < 1) gets the prototypical cross-entropy ``alpha * CE(-||z_j - c_j||, y)``, which pulls its embeddings to its
class prototypes and speeds it up; during the first ``entropy_epochs`` epochs the dominant modality (the highest
rho, when > 1) gets the prototype entropy regulariser ``-mu * H(p_dom)``, which keeps it from converging early.

From the authors' code (github.com/fanyunfeng-bit/Modal-Imbalance-PMR), where the paper leaves it open: Euclidean
distances to the prototypes; the coefficient is the constant ``alpha`` for the slower modality and 0 for the other
(``beta = alpha`` if ``ratio_a_p < 1``); prototypes over the training set before each epoch with momentum 0.2;
``alpha = 1.0``. The entropy regulariser is described in the paper but not in the released training scripts; its
weight ``mu`` (default 0.1) and its window (``entropy_epochs``, default 5) are ours — ``mu = 0`` reproduces the code.
With more than two modalities every modality with ``rho_j < 1`` gets the PCE term.

Settings (``method.options.pmr.*``): ``alpha`` (>= 0, 1.0), ``momentum`` ([0, 1), 0.2), ``mu`` (>= 0, 0.1),
``entropy_epochs`` (>= 0, 5), ``proto_samples`` (null = the whole training split, or a fixed random subset size).
Logged per epoch: ``pmr_proto_shift_<modality>`` (mean distance the prototypes moved at the epoch's update),
``pmr_ratio_<modality>``, ``pmr_boost_<modality>`` (fraction of steps it got the PCE term), ``pmr_entropy``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dmgl_cli.errors import DmglError
from dmgl_cli.methods.ogm_ge import discrepancy_ratios
from dmgl_cli.methods.rebalance_base import RebalanceMethod, autocast_for, split_batches
from dmgl_cli.models import ModelOutput, MultimodalModel


class PMRMethod(RebalanceMethod):
    """Prototypical modal rebalance; see the module docstring."""

    name = "pmr"
    defaults: dict[str, Any] = {"alpha": 1.0, "momentum": 0.2, "mu": 0.1, "entropy_epochs": 5, "proto_samples": None}

    def __init__(self, config, options: dict[str, Any]):
        super().__init__(config, options)
        self.prototypes: dict[str, Tensor] = {}

    def check(self) -> None:
        super().check()
        self.alpha = self.setting_float("alpha", 0.0)
        self.momentum = self.setting_float("momentum", 0.0, 1.0)
        if self.momentum >= 1.0:
            raise DmglError(f"{self.key('momentum')} must be < 1, got {self.momentum}")
        self.mu = self.setting_float("mu", 0.0)
        self.entropy_epochs = self.setting_int("entropy_epochs", 0)
        self.proto_samples = None if self.settings["proto_samples"] is None else self.setting_int("proto_samples", 1)

    @torch.no_grad()
    def _class_means(self, model: MultimodalModel, num_classes: int) -> tuple[dict[str, Tensor], Tensor]:
        trainer = self.trainer
        was_training = model.training
        model.eval()
        sums: dict[str, Tensor] = {}
        counts = torch.zeros(num_classes, device=trainer.device)
        for inputs, labels in split_batches(trainer, "train", self.proto_samples, seed=trainer.config.data.split_seed):
            with autocast_for(trainer):
                embeddings = model.encode(inputs)
            for modality, z in embeddings.items():
                z = z.float()
                if modality not in sums:
                    sums[modality] = torch.zeros(num_classes, z.shape[1], device=z.device)
                sums[modality].index_add_(0, labels, z)
            counts += torch.bincount(labels, minlength=num_classes).float()
        model.train(was_training)
        return sums, counts

    def start_of_epoch(self, model: MultimodalModel, epoch: int) -> None:
        num_classes = self.trainer.dataset.num_classes
        sums, counts = self._class_means(model, num_classes)
        present = counts > 0
        for modality, total in sums.items():
            new = total / counts.clamp_min(1.0)[:, None]
            old = self.prototypes.get(modality)
            if old is None:
                prototype = new
            else:
                mixed = (1.0 - self.momentum) * new + self.momentum * old
                prototype = torch.where(present[:, None], mixed, old)
                self.track({f"pmr_proto_shift_{modality}": (prototype - old).norm(dim=1).mean()})
            self.prototypes[modality] = prototype

    def extra_losses(self, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> dict[str, Tensor]:
        if not self.prototypes:
            return {}
        similarities = {m: -torch.cdist(z.float(), self.prototypes[m]) for m, z in output.embeddings.items()}
        probabilities = {m: torch.softmax(s.detach(), dim=1) for m, s in similarities.items()}
        scores = {m: p.gather(1, labels[:, None]).sum() for m, p in probabilities.items()}
        ratios = discrepancy_ratios(scores)
        zero = output.logits.new_zeros((), dtype=torch.float32)
        proto_loss, entropy_loss = zero, zero
        for modality, rho in ratios.items():
            slower = rho < 1.0
            if slower and self.alpha > 0:
                proto_loss = proto_loss + self.alpha * F.cross_entropy(similarities[modality], labels)
            self.track({f"pmr_ratio_{modality}": rho, f"pmr_boost_{modality}": float(slower)})
        dominant = max(ratios, key=ratios.get)
        if self.mu > 0 and step["epoch"] <= self.entropy_epochs and ratios[dominant] > 1.0:
            log_p = torch.log_softmax(similarities[dominant], dim=1)
            entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
            entropy_loss = -self.mu * entropy
            self.track({"pmr_entropy": entropy})
        return {"pmr_proto": proto_loss, "pmr_entropy_reg": entropy_loss}

    def method_state(self) -> dict[str, Any]:
        return {"prototypes": {m: p.detach().cpu() for m, p in self.prototypes.items()}}

    def load_method_state(self, state: dict[str, Any]) -> None:
        device = self.trainer.device if self.trainer is not None else "cpu"
        self.prototypes = {m: p.to(device) for m, p in state.get("prototypes", {}).items()}
