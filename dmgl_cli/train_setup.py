"""What the trainer checks and builds before its first step: settings that do not fit the data or the number of
processes refused, the optimiser and scheduler of ``optim.*``, and the model placed on its device (SyncBatchNorm,
channels_last, ``train.compile``)."""

from __future__ import annotations

import logging

import torch

from dmgl_cli.config import Config
from dmgl_cli.data.loader import hold_out, make_splits
from dmgl_cli.data.prepared import PreparedDataset
from dmgl_cli.distributed import DistributedContext
from dmgl_cli.errors import DmglError
from dmgl_cli.methods.base import Method
from dmgl_cli.models import MultimodalModel
from dmgl_cli.models.vision import ResNetTrunk
from dmgl_cli.strategies import LearningBasedStrategy

LOG = logging.getLogger("dmgl")


def check_against_dataset(config: Config, dataset: PreparedDataset) -> None:
    """Refuse settings that do not fit ``dataset`` before any run is created: the LB strategy's holdout must leave
    samples both for its outer batches and for training."""
    if holds_out(config):
        splits = make_splits(dataset, config.data.val_fraction, config.data.split_seed)
        hold_out(splits.train, config.strategy.lb.holdout, config.data.split_seed, None)


def holds_out(config: Config) -> bool:
    """Whether the run sets training samples aside for Ours-LB's outer step (``strategy.lb.outer_data=holdout``)."""
    return config.strategy.name == LearningBasedStrategy.name and config.strategy.lb.outer_data == "holdout"


def check_data_parallel(config: Config, processes: int) -> None:
    """Refuse a run that cannot train in ``processes`` data-parallel processes: a method that cannot (its
    ``data_parallel_refusal``), or batches smaller than the number of processes."""
    from dmgl_cli.catalogue import METHODS

    reason = METHODS[config.method.name].data_parallel_refusal
    if processes > 1 and reason:
        raise DmglError(
            f"method {config.method.name} cannot train data-parallel: {reason}; train it in one process "
            "(leave out --nproc)"
        )
    if processes > config.train.batch_size:
        raise DmglError(
            f"{processes} processes need training batches of at least {processes} samples, train.batch_size is "
            f"{config.train.batch_size}; raise it or use fewer processes"
        )


def build_optimizer(config: Config, method: Method, model: MultimodalModel) -> torch.optim.Optimizer:
    """The ``optim.name`` optimiser over the method's parameter groups."""
    optim = config.optim
    groups = method.param_groups(model)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.name == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer):
    """The ``optim.scheduler`` learning-rate scheduler, or None."""
    optim = config.optim
    if optim.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=optim.plateau_factor, patience=optim.plateau_patience
        )
    if optim.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.step_size, gamma=optim.step_gamma)
    return None


def place_model(
    model: MultimodalModel, config: Config, device: torch.device, distributed: DistributedContext
) -> tuple[MultimodalModel, bool]:
    """``model`` on ``device`` with rank 0's initial weights, laid out and compiled as the config says; and whether
    its BatchNorm buffers must be broadcast after every step (data-parallel on the CPU)."""
    # Data-parallel on CUDA: BatchNorm over the global batch (SyncBatchNorm), as one process normalises it; on the
    # CPU (no SyncBatchNorm) each rank normalises its slice and rank 0's running statistics are broadcast after
    # every step (DDP's broadcast_buffers).
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if distributed.active and has_batchnorm and device.type == "cuda":
        # converts the BatchNorm layers in place (the root is a MultimodalModel, returned as is)
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    broadcast_buffers = distributed.active and has_batchnorm and device.type != "cuda"
    if broadcast_buffers and distributed.is_main:
        LOG.warning(
            "data-parallel on the CPU: BatchNorm normalises each rank's slice of the batch (SyncBatchNorm needs "
            "CUDA), so the results differ from one process's (a model without BatchNorm matches them)"
        )
    model = model.to(device)
    distributed.broadcast_module(model)  # rank 0's initial weights everywhere
    # channels_last for 2D convolutions only: Module.to(memory_format=channels_last) fails on the 5D weights of
    # 3D convolutions (NVGesture's video encoders). On the CPU only the ResNet trunks wide enough for it
    # (models/vision.py, CPU_CHANNELS_LAST_MIN_WIDTH), whose inputs their encoders then lay out the same way.
    for module in model.modules():
        if isinstance(module, ResNetTrunk) and module.channels_last_on(device):
            module.to(memory_format=torch.channels_last)
        elif isinstance(module, torch.nn.Conv2d) and device.type == "cuda":
            module.to(memory_format=torch.channels_last)
    # train.compile: torch.compile of the model's forward, in place (nn.Module.compile), so that the model keeps
    # its class, the submodules the methods reach into and its state_dict keys (no ``_orig_mod.`` prefix): its
    # checkpoints load into an uncompiled model and the other way round. Double backward runs uncompiled
    # (Trainer.uncompiled).
    if config.train.compile:
        model.compile()
    return model, broadcast_buffers
