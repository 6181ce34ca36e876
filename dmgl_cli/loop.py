"""What a method may read of the training loop: the narrow context that methods (and, extended by
:class:`dmgl_cli.strategies.outer_step.TrainingLoop`, Ours-LB's outer step) are typed against instead of
:class:`dmgl_cli.train.Trainer`, which provides it. It names no method and no strategy, so nothing that a method
imports for its types leads back to the trainer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from dmgl_cli.config import Config
    from dmgl_cli.data.loader import ArraySplit, Splits
    from dmgl_cli.data.prepared import PreparedDataset
    from dmgl_cli.distributed import DistributedContext


class MethodLoop(Protocol):
    """The run's settings, data, device and optimiser, this process's place among data-parallel ranks, and a way to
    read this rank's part of a split; read by methods that need more than the batch (validation passes, copies of
    the model, the optimiser's state)."""

    config: Config
    dataset: PreparedDataset
    device: torch.device
    seed: int
    optimizer: torch.optim.Optimizer
    splits: Splits
    train_loader: DataLoader
    distributed: DistributedContext

    def this_ranks_part(self, split: ArraySplit, batch_size: int) -> ArraySplit: ...
