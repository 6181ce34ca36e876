"""Shared pieces of the rebalancing baselines (§4.1: MSES, G-Blend, OGM-GE, Greedy, DOMFN, MSLR, PMR, AGM, MLA).

Every rebalancing method keeps the foundation's encoders and, unless it says otherwise, Concat's head; what it
changes is *how* the model is trained: extra loss terms, gradients rescaled between backward and the optimiser
step, per-modality learning rates, frozen encoders, alternating updates. :class:`RebalanceMethod` gives them

* settings: ``self.options``, the method's ``method.options.<name>.*`` as its catalogue entry's typed options
  (:mod:`dmgl_cli.catalogue.options`: defaults, and the checks that run with config validation);
* per-epoch statistics of the mechanism (``track``), logged at epoch end as ``<prefix>_<what>_<modality>`` so that
  a run shows the mechanism at work (OGM-GE's coefficients, G-Blend's weights, MLA's steps per modality, ...);
* the trainer (:meth:`attach`), for the methods that need data beyond the batch (validation losses, prototypes
  over the training set) or the optimiser (per-modality learning rates);
* a state that survives an exact resume, also one from the middle of an epoch: ``on_epoch_start`` work is done
  once per epoch, and the running statistics are part of the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from dmgl_cli.catalogue import MethodOptions
from dmgl_cli.device import autocast, to_device
from dmgl_cli.distributed import SINGLE_PROCESS, DistributedContext
from dmgl_cli.errors import DmglError
from dmgl_cli.methods.base import Method
from dmgl_cli.models import ModelOutput, MultimodalModel
from dmgl_cli.models.fusion import ConcatFusion

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config
    from dmgl_cli.loop import MethodLoop


class RebalanceMethod(Method):
    """Base of the rebalancing baselines; a subclass names its catalogue entry (whose options check that the model
    has Concat's head, ``model.fusion=concat``) and overrides the hooks it uses."""

    def __init__(self, config: Config, options: MethodOptions):
        super().__init__(config, options)
        self.trainer: MethodLoop | None = None  # set by attach(), before any training hook runs
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._started_epoch = 0  # the epoch whose start-of-epoch work is done (so a resumed epoch is not redone)

    def per_modality_floats(self, name: str, modalities: list[str], default: float) -> dict[str, float]:
        """A setting given as one number for every modality or as ``{modality: number}`` (others: ``default``)."""
        value = getattr(self.options, name)
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(modalities))
            if unknown:
                raise DmglError(
                    f"{self.key(name)} names {', '.join(unknown)}, which the dataset does not have; "
                    f"its modalities: {', '.join(modalities)}"
                )
            values = {m: value.get(m, default) for m in modalities}
        else:
            values = {m: value for m in modalities}
        for modality, number in values.items():
            if (
                isinstance(number, bool)
                or not isinstance(number, (int, float))
                or not math.isfinite(number)
                or number <= 0
            ):
                raise DmglError(f"{self.key(name)} for {modality} must be a number > 0, got {number!r}")
        return {m: float(v) for m, v in values.items()}

    # -- the trainer ------------------------------------------------------------------------------------------
    def attach(self, trainer: MethodLoop) -> None:
        self.trainer = trainer

    def start_of_epoch(self, model: MultimodalModel, epoch: int) -> None:
        """Work done once before epoch ``epoch`` trains (subclasses); skipped when a resumed epoch restarts."""

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        if self._started_epoch == epoch:  # resumed in the middle of this epoch: its start is already done
            return
        self._sums, self._counts = {}, {}
        self._started_epoch = epoch
        self.start_of_epoch(model, epoch)

    # -- statistics -------------------------------------------------------------------------------------------
    def track(self, values: dict[str, float | Tensor]) -> None:
        """Add one observation per name; the epoch's mean is logged. Tensors are read here (small, per step)."""
        for name, value in values.items():
            number = float(value.detach().float()) if isinstance(value, Tensor) else float(value)
            self._sums[name] = self._sums.get(name, 0.0) + number
            self._counts[name] = self._counts.get(name, 0) + 1

    def count(self, name: str, amount: float = 1.0) -> None:
        """Add to a per-epoch total (logged as the sum, not the mean)."""
        self._sums[name] = self._sums.get(name, 0.0) + amount
        self._counts[name] = 0  # 0 marks a total

    def epoch_statistics(self) -> dict[str, float]:
        return {name: total / self._counts[name] if self._counts[name] else total for name, total in self._sums.items()}

    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        return self.epoch_statistics()

    # -- state ------------------------------------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        """The subclass's own state (tensors and plain containers)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "started_epoch": self._started_epoch,
            "sums": dict(self._sums),
            "counts": dict(self._counts),
            "own": self.method_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._started_epoch = int(state.get("started_epoch", 0))
        self._sums = {k: float(v) for k, v in state.get("sums", {}).items()}
        self._counts = {k: int(v) for k, v in state.get("counts", {}).items()}
        self.load_method_state(state.get("own", {}))


# ------------------------------------------------------------------------------------------------ model parts


def encoder_parameters(model: MultimodalModel, modality: str) -> list[nn.Parameter]:
    return [p for p in model.encoders[modality].parameters() if p.requires_grad]


def concat_head(model: MultimodalModel) -> ConcatFusion:
    if not isinstance(model.fusion, ConcatFusion):
        raise DmglError(f"this method needs Concat's head, but the model's fusion is {type(model.fusion).__name__}")
    return model.fusion


def head_columns(model: MultimodalModel, modality: str) -> slice:
    """The columns of Concat's head weight that read ``modality``'s embedding (its W_j)."""
    fusion = concat_head(model)
    index = fusion.modalities.index(modality)
    return slice(index * fusion.embed_dim, (index + 1) * fusion.embed_dim)


def relative_update(params: list[Tensor], grads: list[Tensor | None]) -> float:
    """``||g||^2 / ||theta||^2`` over a group of tensors (Greedy's effective update)."""
    grad_sq = sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None)
    param_sq = sum(float(p.detach().float().pow(2).sum()) for p in params)
    return grad_sq / (param_sq + 1e-12)


class AuxHeadsModel(MultimodalModel):
    """Concat (encoders, concatenation, linear head) plus one linear classifier per modality on its embedding.

    G-Blend and DOMFN train a uni-modal classifier per modality next to the fused one; those classifiers are the
    model's per-modality outputs (``unimodal_logits``), so they are what the per-modality scores measure.
    """

    def __init__(self, encoders: nn.ModuleDict, fusion: nn.Module, embed_dim: int, num_classes: int):
        super().__init__(encoders, fusion)
        self.aux_heads = nn.ModuleDict({m: nn.Linear(embed_dim, num_classes) for m in encoders})

    def forward(self, inputs: dict[str, Tensor]) -> ModelOutput:
        embeddings = self.encode(inputs)
        logits, _ = self.fusion(embeddings)
        unimodal = {m: self.aux_heads[m](z) for m, z in embeddings.items()}
        return ModelOutput(logits=logits, unimodal_logits=unimodal, embeddings=embeddings)


# --------------------------------------------------------------------------------------------------- gradients


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``holder[key]`` read at backward time."""

    @staticmethod
    def forward(ctx, tensor: Tensor, holder: dict, key: str) -> Tensor:
        ctx.holder, ctx.key = holder, key
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.holder[ctx.key], None, None


def scale_gradient(tensor: Tensor, holder: dict, key: str) -> Tensor:
    """``tensor`` whose gradient is scaled by ``holder[key]`` — the coefficient may be set after the forward pass
    (as AGM's backward hooks do: the coefficient depends on the batch's outputs)."""
    return _ScaleGradient.apply(tensor, holder, key)


# ------------------------------------------------------------------------------------------------- data passes


# The sample count among the totals a sharded pass sums over the ranks (split_batches(shard=True))
SEEN = "samples seen"


def distributed_of(trainer) -> DistributedContext:
    """The trainer's place in a data-parallel run (one process for a trainer without one, as in unit tests)."""
    return getattr(trainer, "distributed", SINGLE_PROCESS)


def split_batches(
    trainer, split: str, max_samples: int | None = None, seed: int = 0, shard: bool = False
) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """Batches of ``split`` ("train" or "val") on the trainer's device, in a fixed order; with ``max_samples`` a
    fixed random subset (drawn from ``seed`` alone, so it is the same every epoch and after a resume). ``shard``
    (data-parallel training): this rank's share of the batches (batch i on rank i mod N), whose totals the caller
    sums over the ranks (``trainer.distributed.sum_values``)."""
    from dmgl_cli.data.loader import ArraySplit, eval_loader

    source = getattr(trainer.splits, split)
    indices = source.indices
    if max_samples is not None and max_samples < len(source):
        indices = indices[np.sort(np.random.default_rng(seed).choice(len(source), size=max_samples, replace=False))]
    subset = ArraySplit(source.arrays, indices)
    distributed = distributed_of(trainer)
    sharded = (distributed.rank, distributed.world) if shard and distributed.active else None
    loader = eval_loader(trainer.dataset, trainer.config, subset, batch_shard=sharded)
    for batch in loader:
        yield to_device(batch, trainer.device)


def autocast_for(trainer):
    return autocast(trainer.device, trainer.config.train.amp)
