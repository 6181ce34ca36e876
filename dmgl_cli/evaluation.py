"""Scoring a split: the fused and per-modality scores and the two losses, as the trainer, ``dmgl eval`` and the
imbalance measures score it (one rank's batches gathered when data-parallel)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dmgl_cli.config import Config
from dmgl_cli.device import autocast, to_device
from dmgl_cli.distributed import SINGLE_PROCESS, DistributedContext, interleave_shards
from dmgl_cli.methods.base import Method
from dmgl_cli.metrics import MetricAccumulator
from dmgl_cli.models import ModelOutput, MultimodalModel
from dmgl_cli.objective import compute_losses


@torch.inference_mode()
def evaluate(
    model: MultimodalModel,
    method: Method,
    config: Config,
    loader,
    device: torch.device,
    prefix: str,
    distributed: DistributedContext = SINGLE_PROCESS,
    after_batch: Callable[[dict[str, Tensor], Tensor, ModelOutput], None] | None = None,
) -> dict[str, float]:
    """Scores of one split: fused and per-modality ACC / MAP / macro-F1, their gap, the modality-gap distance,
    and the two losses — all prefixed (``val_acc``, ``test_acc_audio``, ...).

    Data-parallel: ``loader`` yields this rank's batches (batch i on rank i mod N, ``EpochBatchSampler.batch_shard``);
    every rank's per-batch records are gathered and added in the batches' order, so every rank returns the
    single-process metrics.

    ``after_batch(inputs, labels, output)`` runs after each batch is scored, with the batch on the device and the
    method's output (:func:`dmgl_cli.imbalance.evaluate_with_coalitions` scores the modality coalitions there)."""
    was_training = model.training
    model.eval()
    accumulator = MetricAccumulator()
    for batch in loader:
        inputs, labels = to_device(batch, device)
        with autocast(device, config.train.amp):
            output = method.forward(model, inputs, training=False)
        cls_loss, mm_loss = compute_losses(method, config, output, labels)
        accumulator.add(
            labels,
            method.predict(output).float(),
            {m: z.float() for m, z in output.unimodal_logits.items()},
            {m: z.float() for m, z in output.embeddings.items()},
            {"cls_loss": cls_loss, "mm_loss": mm_loss},
            int(labels.shape[0]),
        )
        if after_batch is not None:
            after_batch(inputs, labels, output)
    model.train(was_training)
    if distributed.active:
        shards = distributed.gather_objects(accumulator.batch_records())
        merged = MetricAccumulator()
        merged.add_records(interleave_shards(shards))  # the batches in their order
        accumulator = merged
    return accumulator.compute(prefix)
