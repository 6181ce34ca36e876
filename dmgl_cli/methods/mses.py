"""MSES: modality-specific early stopping (Fujimori et al., ACPR 2019).

Follows the MSES baseline in the code of AGM (Li et al., ICCV 2023), github.com/lihong2303/AGM_ICCV2023, which the
comparison tables of this line of work reuse: ``run/CREMAD_main.py`` (likewise ``AVMNIST_main.py``,
``URFunny_main.py``), function ``train`` (the ``methods == "MSES"`` branch) and the epoch loop of ``CREMAD_main``
(the ``min_test_audio_loss`` / ``audio_argmax_loss_epoch`` bookkeeping). The MSES paper leaves the monitored
quantity and the stopping rule open, and we found no code from its authors.

After every epoch each modality's validation loss — the cross-entropy of its per-modality logits (Concat's head
split; the code's ``audio_cls(a)``) — is smoothed: the raw loss in epoch 1, then
``0.6 * previous raw loss + 0.4 * current raw loss``. An epoch whose smoothed loss is strictly below the modality's
best so far becomes its best epoch (epoch 1 is the first best), and the model is remembered at that point. Once
``epoch - best_epoch > patience`` the modality stops: with ``restore: model`` (the code) the WHOLE model and the
optimiser's per-parameter state (momentum) are put back to that modality's best epoch, and from then on the
gradients of the modality's branch — its encoder AND its classifier, i.e. its columns ``W_j`` of the head — are
multiplied by 0 after backward (``params.grad * mses_audio_coeff`` with the coefficient set to 0, for every
parameter of ``audio_net`` and ``audio_cls``). The zeroing is active in epochs ``start_epoch..end_epoch`` (the
code's ``modulation_starts <= epoch <= modulation_ends``, defaults 0 and 20 with 1-based epochs: epochs 1-20);
outside them a stopped branch trains again. As there, a zero gradient is still a gradient: the optimiser's weight
decay and momentum keep moving a stopped branch.

``patience`` is dataset-specific there (AV-MNIST 10, UR-Funny 30, CREMA-D 80): the default is 10 and a recipe sets
its dataset's value.

Deviations from the AGM code:

* The code ends training (``exit()``) once every modality has stopped; the shared loop has no such exit, so the
  run goes on to its last epoch with every branch zeroed (the head's shared bias still learns) and model selection
  still picks the best validation epoch.
* Restoring puts back the per-parameter optimiser state but keeps the current learning rate (the code's
  ``optimizer.load_state_dict`` also rolls the learning rate back to the best epoch's).
* Concat has ONE bias shared by the modalities (AGM's late-fusion model has one per modality classifier); it is
  never zeroed.
* The losses are averaged per sample over the validation split (the code averages batch means of its test
  loader).
* ``restore: branch`` (ours) puts back only the stopped modality's encoder and head columns, so the other
  modalities keep what they learnt since; ``restore: none`` restores nothing. ``min_delta`` (ours, default 0):
  the decrease that counts as an improvement.

Settings (``method.options.mses.*``): ``patience`` (>= 0, default 10), ``min_delta`` (>= 0, default 0),
``restore`` (model | branch | none; default model), ``start_epoch`` / ``end_epoch`` (1-based, inclusive; default
1 and 20).
Logged per epoch: ``mses_frozen_<modality>`` (1 once stopped), ``mses_val_loss_<modality>`` (smoothed),
``mses_stop_epoch_<modality>`` once stopped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dmgl_cli.catalogue.options import MSESOptions
from dmgl_cli.methods.mslr import scale_branch_gradients
from dmgl_cli.methods.rebalance_base import (
    SEEN,
    RebalanceMethod,
    autocast_for,
    concat_head,
    distributed_of,
    head_columns,
    split_batches,
)
from dmgl_cli.models import ModelOutput, MultimodalModel

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config


def _cpu_copy(value: Any) -> Any:
    """A detached CPU copy of a (nested) container of tensors."""
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value


class MSESMethod(RebalanceMethod, method="mses"):
    """Modality-specific early stopping; see the module docstring."""

    options: MSESOptions

    def __init__(self, config: Config, options: MSESOptions):
        super().__init__(config, options)
        self.frozen: dict[str, int] = {}  # modality -> epoch it stopped at
        self.previous_raw: dict[str, float] = {}
        self.best_loss: dict[str, float] = {}
        self.best_epoch: dict[str, int] = {}
        self.snapshots: dict[int, dict[str, Any]] = {}  # epoch -> what `restore` puts back (restore: model)
        self.best_branch: dict[str, dict[str, Tensor]] = {}  # modality -> its branch at its best (restore: branch)
        self.pending_restore: list[str] = []

    # -- what is remembered and put back ------------------------------------------------------------------------
    @torch.no_grad()
    def validation_losses(self, model: MultimodalModel) -> dict[str, float]:
        """Per-modality cross-entropy of the head split, averaged over the validation samples."""
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        seen = 0
        for inputs, labels in split_batches(self.trainer, "val", shard=True):
            with autocast_for(self.trainer):
                output = self.forward(model, inputs, training=False)
            for modality, logits in output.unimodal_logits.items():
                loss = F.cross_entropy(logits.float(), labels, reduction="sum")
                totals[modality] = totals.get(modality, 0.0) + float(loss)
            seen += int(labels.shape[0])
        model.train(was_training)
        # data-parallel: each rank scored its share of the batches
        totals = distributed_of(self.trainer).sum_values({**totals, SEEN: float(seen)})
        seen = int(totals.pop(SEEN))
        return {m: total / max(seen, 1) for m, total in totals.items()}

    def _snapshot(self, model: MultimodalModel) -> dict[str, Any]:
        assert self.trainer is not None  # attached before the first epoch ends
        return {
            "model": _cpu_copy(model.state_dict()),
            "optimizer": _cpu_copy(self.trainer.optimizer.state_dict()["state"]),
        }

    def _branch(self, model: MultimodalModel, modality: str) -> dict[str, Tensor]:
        state = {f"encoder.{k}": v.detach().cpu().clone() for k, v in model.encoders[modality].state_dict().items()}
        state["head_columns"] = concat_head(model).head.weight[:, head_columns(model, modality)].detach().cpu().clone()
        return state

    @torch.no_grad()
    def _restore(self, model: MultimodalModel, modality: str) -> None:
        if self.options.restore == "model":
            snapshot = self.snapshots[self.best_epoch[modality]]
            model.load_state_dict(snapshot["model"])
            assert self.trainer is not None  # attached before the first epoch ends
            optimizer = self.trainer.optimizer
            state = optimizer.state_dict()  # current hyperparameters (learning rates) are kept
            state["state"] = _cpu_copy(snapshot["optimizer"])
            optimizer.load_state_dict(state)
        elif self.options.restore == "branch":
            saved = self.best_branch[modality]
            encoder_state = {k[len("encoder.") :]: v for k, v in saved.items() if k.startswith("encoder.")}
            model.encoders[modality].load_state_dict(encoder_state)
            weight = concat_head(model).head.weight
            weight[:, head_columns(model, modality)] = saved["head_columns"].to(weight.device, weight.dtype)

    # -- hooks ------------------------------------------------------------------------------------------------
    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        raw = self.validation_losses(model)
        metrics = {}
        improved = []
        for modality, loss in raw.items():
            smoothed = loss if modality not in self.previous_raw else 0.6 * self.previous_raw[modality] + 0.4 * loss
            self.previous_raw[modality] = loss
            metrics[f"mses_val_loss_{modality}"] = smoothed
            if modality in self.frozen:
                continue
            if modality not in self.best_loss or smoothed < self.best_loss[modality] - self.options.min_delta:
                self.best_loss[modality], self.best_epoch[modality] = smoothed, epoch
                improved.append(modality)
        if improved and self.options.restore == "model":
            self.snapshots[epoch] = self._snapshot(model)
        elif self.options.restore == "branch":
            for modality in improved:
                self.best_branch[modality] = self._branch(model, modality)
        for modality in raw:
            if modality not in self.frozen and epoch - self.best_epoch[modality] > self.options.patience:
                self.frozen[modality] = epoch
                # Put back before the next epoch, not now: this epoch's scores and checkpoints stay consistent. In
                # order, so when two modalities stop together the later one's best epoch wins, as in the code.
                self.pending_restore.append(modality)
        self._drop_unneeded_snapshots()
        for modality in raw:
            metrics[f"mses_frozen_{modality}"] = float(modality in self.frozen)
            if modality in self.frozen:
                metrics[f"mses_stop_epoch_{modality}"] = float(self.frozen[modality])
        return {**self.epoch_statistics(), **metrics}

    def start_of_epoch(self, model: MultimodalModel, epoch: int) -> None:
        for modality in self.pending_restore:
            self._restore(model, modality)
        self.pending_restore = []
        self._drop_unneeded_snapshots()

    def _drop_unneeded_snapshots(self) -> None:
        """Keep only the snapshots a modality that is still learning, or about to be restored, can return to."""
        needed = {e for m, e in self.best_epoch.items() if m not in self.frozen or m in self.pending_restore}
        self.snapshots = {e: s for e, s in self.snapshots.items() if e in needed}

    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        if self.frozen and self.options.start_epoch <= step["epoch"] <= self.options.end_epoch:
            scale_branch_gradients(model, {m: 0.0 for m in self.frozen})

    def method_state(self) -> dict[str, Any]:
        return {
            "frozen": dict(self.frozen),
            "previous_raw": dict(self.previous_raw),
            "best_loss": dict(self.best_loss),
            "best_epoch": dict(self.best_epoch),
            "snapshots": dict(self.snapshots),
            "best_branch": {m: dict(b) for m, b in self.best_branch.items()},
            "pending_restore": list(self.pending_restore),
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.frozen = {k: int(v) for k, v in state.get("frozen", {}).items()}
        self.previous_raw = {k: float(v) for k, v in state.get("previous_raw", {}).items()}
        self.best_loss = {k: float(v) for k, v in state.get("best_loss", {}).items()}
        self.best_epoch = {k: int(v) for k, v in state.get("best_epoch", {}).items()}
        self.snapshots = {int(e): s for e, s in state.get("snapshots", {}).items()}
        self.best_branch = {m: dict(b) for m, b in state.get("best_branch", {}).items()}
        self.pending_restore = [str(m) for m in state.get("pending_restore", [])]
