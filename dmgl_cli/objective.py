"""The two losses of Eq. 1 on one batch, as training, evaluation and the outer step compute them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from dmgl_cli.losses import modality_matching_loss

if TYPE_CHECKING:
    from dmgl_cli.config import Config
    from dmgl_cli.methods.base import Method
    from dmgl_cli.models import ModelOutput


def compute_losses(
    method: Method, config: Config, output: ModelOutput, labels: Tensor, matching: bool = True
) -> tuple[Tensor, Tensor]:
    """(L_CLS, L_MM) of one batch. L_MM is 0 for methods with one modality, and is not computed (0) with
    ``matching=False``: a run whose alpha is 0 throughout (constant 0, a method that pins it) would multiply it by
    0 anyway, so its cost and its projections are saved."""
    cls_loss = method.classification_loss(output, labels)
    if matching and method.uses_matching and len(output.embeddings) >= 2:
        mm_loss = modality_matching_loss(
            config.loss.matching,
            {m: z.float() for m, z in output.embeddings.items()},
            {m: z.float() for m, z in output.unimodal_logits.items()},
            output.logits.float(),
            config.loss.tau,
        )
    else:
        mm_loss = cls_loss.new_zeros(())
    return cls_loss, mm_loss
