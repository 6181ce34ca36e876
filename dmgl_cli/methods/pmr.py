"""PMR: prototypical modal rebalance (Fan et al., CVPR 2023).

Follows the authors' code, github.com/fanyunfeng-bit/Modal-Imbalance-PMR, ``main_Prototype_grad.py``: functions
``calculate_prototype`` (prototypes), ``train_epoch`` (the ``Proto`` loss) and ``EU_dist``, with the script's
argument defaults.

Prototypes. Before the first epoch and after every epoch (i.e. before the next one), each modality's class
prototypes are the mean embedding ``z_j`` of each class over the first ``len(loader) // 10`` batches (at least one)
of a freshly shuffled pass over the training split with its training transforms, the model in eval mode, no
gradient. From the third computation on (the code passes ``epoch`` 0 both before training and after the first
epoch, and mixes only when ``epoch > 0``), they are mixed with the previous ones:
``c = (1 - momentum) * c_new + momentum * c_old``.

Rebalancing. Each step, a modality's prototype classifier is ``softmax(-||z_j - c_j||_2)`` over the classes; its
score is ``s_j = sum_i p_j[i, y_i]`` and its ratio ``rho_j = s_j / mean_{k != j} s_k`` (for two modalities the
code's ``ratio_a_p`` and its inverse). From ``start_epoch`` to ``end_epoch`` the slower modality (rho_j < 1) gets
the prototypical cross-entropy ``alpha * CE(-||z_j - c_j||, y)`` added to the loss (the code's ``beta`` / ``lam``),
which pulls its embeddings to its class prototypes and speeds it up; at a tie neither gets it.

Defaults are the script's: ``alpha`` 1.0, ``momentum_coef`` 0.2, ``modulation_starts`` 0 / ``modulation_ends`` 100
(0-based, inclusive: epochs 1..101 here). Its ``bash.sh`` runs CREMA-D with Concat at ``--alpha 2.0
--modulation_ends 70 --momentum_coef 0.0``, which a recipe may set.

Deviations from the authors' code:
- the batches of the prototype pass come from a shuffle of their own, seeded by (training seed, epoch), so a
  resumed run draws the same ones; ``len(loader)`` counts the last, partial batch, as the code's loader does;
- a class absent from the prototype pass keeps its previous prototype (zero before the first one); the code divides
  by its count of 0 (NaN);
- the code computes AVE's and CG-MNIST's prototypes on their validation split; here always on the training split;
- the prototype entropy regulariser of the paper (not in the released code) is ours, off by default: ``mu`` > 0
  adds ``-mu * H(p_dom)`` for the dominant modality (highest rho, when > 1) during the first ``entropy_epochs``
  epochs;
- ``proto_fraction`` other than 0.1 is ours (1.0: the whole training split);
- with more than two modalities every modality with ``rho_j < 1`` gets the prototypical term.

Settings (``method.options.pmr.*``): ``alpha`` (>= 0, 1.0), ``momentum`` ([0, 1), 0.2), ``start_epoch`` /
``end_epoch`` (1-based, inclusive; 1 and 101), ``proto_fraction`` ((0, 1], 0.1), ``mu`` (>= 0, 0 = off),
``entropy_epochs`` (>= 0, 5).
Logged per epoch: ``pmr_proto_shift_<modality>`` (mean distance the prototypes moved at the epoch's update),
``pmr_ratio_<modality>``, ``pmr_boost_<modality>`` (fraction of steps it got the prototypical term), and with
``mu`` > 0 ``pmr_entropy``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dmgl_cli.catalogue.options import PMROptions
from dmgl_cli.errors import DmglError
from dmgl_cli.methods.ogm_ge import discrepancy_ratios
from dmgl_cli.methods.rebalance_base import RebalanceMethod, autocast_for, distributed_of
from dmgl_cli.models import ModelOutput, MultimodalModel

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config


def prototype_batches(trainer, epoch: int, fraction: float) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """The first ``max(1, int(fraction * len(loader)))`` batches of a shuffled pass over the training split (its
    training transforms and batch size; the last batch may be partial), drawn from (training seed, ``epoch``)."""
    from dmgl_cli.data.loader import EpochBatchSampler, make_loader

    # A seed of its own: the shuffle is not the one the epoch's training batches come from. Data-parallel, each rank
    # reads its slice of each batch and the class sums are added over the ranks (PMRMethod.start_of_epoch).
    size = trainer.config.train.batch_size
    split = trainer.splits.train
    if distributed_of(trainer).active:
        split = trainer.this_ranks_part(split, size)
    loader = make_loader(split, size, shuffle=True, seed=trainer.seed + 1, drop_last=False)
    sampler = loader.batch_sampler
    assert isinstance(sampler, EpochBatchSampler)  # make_loader's: shuffles from (seed, epoch)
    sampler.set_epoch(epoch)
    wanted = max(1, int(fraction * len(loader)))
    non_blocking = trainer.device.type == "cuda"
    for number, batch in enumerate(loader):
        if number == wanted:
            break
        inputs = {m: t.to(trainer.device, non_blocking=non_blocking) for m, t in batch["inputs"].items()}
        yield inputs, batch["labels"].to(trainer.device, non_blocking=non_blocking)


@torch.no_grad()
def class_sums(
    model: MultimodalModel,
    batches: Iterable[tuple[dict[str, Tensor], Tensor]],
    num_classes: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per modality the sum of the embeddings of each class, and the class counts (model in eval mode)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    sums: dict[str, Tensor] = {}
    counts: Tensor | None = None
    try:
        for inputs, labels in batches:
            with autocast():
                embeddings = model.encode(inputs)
            for modality, z in embeddings.items():
                z = z.float()
                if modality not in sums:
                    sums[modality] = torch.zeros(num_classes, z.shape[1], device=z.device)
                sums[modality].index_add_(0, labels, z)
            batch_counts = torch.bincount(labels, minlength=num_classes).float()
            counts = batch_counts if counts is None else counts + batch_counts
    finally:
        for module, training in modes:
            module.training = training
    if counts is None:
        raise DmglError("method 'pmr' found no training batches to build its prototypes from")
    return sums, counts


def updated_prototypes(old: Tensor | None, sums: Tensor, counts: Tensor, momentum: float, mix: bool) -> Tensor:
    """Class means ``sums / counts``, mixed with ``old`` when ``mix``: ``(1 - momentum) new + momentum old``; a
    class with no sample keeps its old prototype (zero when there is none)."""
    present = (counts > 0)[:, None]
    new = sums / counts.clamp_min(1.0)[:, None]
    if old is None:
        return torch.where(present, new, torch.zeros_like(new))
    if mix:
        new = (1.0 - momentum) * new + momentum * old
    return torch.where(present, new, old)


def prototype_similarities(embeddings: dict[str, Tensor], prototypes: dict[str, Tensor]) -> dict[str, Tensor]:
    """``-||z_j - c_j||_2`` per sample and class (the code's ``-EU_dist``)."""
    return {m: -torch.cdist(z.float(), prototypes[m]) for m, z in embeddings.items()}


class PMRMethod(RebalanceMethod, method="pmr"):
    """Prototypical modal rebalance; see the module docstring."""

    options: PMROptions

    def __init__(self, config: Config, options: PMROptions):
        super().__init__(config, options)
        self.prototypes: dict[str, Tensor] = {}
        self.prototype_updates = 0  # prototype computations so far (the code mixes from the third on)

    def start_of_epoch(self, model: MultimodalModel, epoch: int) -> None:
        trainer = self.trainer
        assert trainer is not None  # attached before the first epoch starts
        batches = prototype_batches(trainer, epoch, self.options.proto_fraction)
        sums, counts = class_sums(model, batches, trainer.dataset.num_classes, lambda: autocast_for(trainer))
        # data-parallel: every rank summed its slices; the sums and counts of the whole batches on every rank
        names = list(sums)
        totals = distributed_of(trainer).sum_tensors([*(sums[m] for m in names), counts])
        self.update(dict(zip(names, totals[:-1], strict=True)), totals[-1])

    def update(self, sums: dict[str, Tensor], counts: Tensor) -> None:
        """One prototype computation from class sums and counts (mixing from the third computation on)."""
        self.prototype_updates += 1
        mix = self.prototype_updates >= 3
        for modality, total in sums.items():
            old = self.prototypes.get(modality)
            prototype = updated_prototypes(old, total, counts.to(total.device), self.options.momentum, mix)
            if old is not None:
                self.track({f"pmr_proto_shift_{modality}": (prototype - old).norm(dim=1).mean()})
            self.prototypes[modality] = prototype

    def extra_losses(self, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> dict[str, Tensor]:
        if not self.prototypes:
            return {}
        similarities = prototype_similarities(output.embeddings, self.prototypes)
        probabilities = {m: torch.softmax(s.detach(), dim=1) for m, s in similarities.items()}
        scores = {m: p.gather(1, labels[:, None]).sum() for m, p in probabilities.items()}
        ratios = discrepancy_ratios(scores)
        active = self.options.start_epoch <= step["epoch"] <= self.options.end_epoch
        losses = {"pmr_proto": output.logits.new_zeros((), dtype=torch.float32)}
        for modality, rho in ratios.items():
            boosted = active and rho < 1.0
            if boosted and self.options.alpha > 0:
                losses["pmr_proto"] = losses["pmr_proto"] + self.options.alpha * F.cross_entropy(
                    similarities[modality], labels
                )
            self.track({f"pmr_ratio_{modality}": rho, f"pmr_boost_{modality}": float(boosted)})
        if self.options.mu > 0:
            entropy_loss = losses["pmr_proto"].new_zeros(())
            dominant = max(ratios, key=ratios.__getitem__)
            if step["epoch"] <= self.options.entropy_epochs and ratios[dominant] > 1.0:
                log_p = torch.log_softmax(similarities[dominant], dim=1)
                entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
                entropy_loss = -self.options.mu * entropy
                self.track({"pmr_entropy": entropy})
            losses["pmr_entropy_reg"] = entropy_loss
        return losses

    def method_state(self) -> dict[str, Any]:
        return {
            "prototypes": {m: p.detach().cpu() for m, p in self.prototypes.items()},
            "prototype_updates": self.prototype_updates,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        device = self.trainer.device if self.trainer is not None else "cpu"
        self.prototypes = {m: p.to(device) for m, p in state.get("prototypes", {}).items()}
        self.prototype_updates = int(state.get("prototype_updates", 0))
