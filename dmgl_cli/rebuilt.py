"""A model rebuilt from a config and a checkpoint, ready to score: the one place it is done (``dmgl eval``,
``dmgl explain``, the embeddings figure through :mod:`dmgl_cli.recorded`, and the logged pyfunc model of the MLflow
layer). It needs no MLflow object: a config or its YAML, the dataset's modality specs and class count, a checkpoint's
state or file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from dmgl_cli.config import Config
    from dmgl_cli.data.transforms import BatchTransform
    from dmgl_cli.methods.base import Method
    from dmgl_cli.models import MultimodalModel


@dataclass
class RebuiltModel:
    """A model rebuilt from a config and a checkpoint: in eval mode on ``device``, with the method that drives it
    and the evaluation transform of its inputs (None when the inputs need none)."""

    config: Config
    method: Method
    model: MultimodalModel
    device: torch.device
    transform: BatchTransform | None
    state: dict[str, Any]  # the checkpoint (its "model" weights, and what training stored beside them)


def rebuild_model(
    config: Config | str,
    modalities: Mapping[str, dict[str, Any]],
    num_classes: int,
    checkpoint: Mapping[str, Any] | str | Path,
    *,
    device: str | None = None,
    source: str = "the checkpoint",
) -> RebuiltModel:
    """The model ``config`` (a Config or its YAML) builds for ``modalities`` (the prepared dataset's modality specs)
    and ``num_classes``, holding ``checkpoint``'s weights (a checkpoint's state, or its file), on ``device`` (default:
    the config's ``train.device``) in eval mode. ``source`` names the checkpoint in a refusal."""
    from dmgl_cli.checkpoint import load_checkpoint, load_model_state
    from dmgl_cli.config import config_from_yaml
    from dmgl_cli.data.transforms import build_transforms, model_input_specs
    from dmgl_cli.device import pick_device
    from dmgl_cli.methods import build_method

    if isinstance(config, str):
        config = config_from_yaml(config)
    state = dict(checkpoint) if isinstance(checkpoint, Mapping) else load_checkpoint(Path(checkpoint))
    method = build_method(config)
    model = method.build_model(model_input_specs(dict(modalities), config), num_classes)
    load_model_state(model, state["model"], source)
    chosen = pick_device(device or config.train.device)
    transform = build_transforms(dict(modalities), config, training=False)
    return RebuiltModel(config, method, model.to(chosen).eval(), chosen, transform, state)
