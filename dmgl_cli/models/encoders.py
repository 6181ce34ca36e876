"""Encoders, one per modality, each mapping a batch of prepared samples to [batch, embed_dim].

``ENCODERS`` maps a config name to a builder ``(spec, encoder_config, embed_dim, dropout) -> nn.Module``, where
``spec`` is the modality's manifest entry (kind, dtype, per-sample shape).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from dmgl_cli.errors import DmglError
from dmgl_cli.models.text import build_bert
from dmgl_cli.models.vision import build_resnet, build_video_resnet


class MLPEncoder(nn.Module):
    """Flatten -> ``layers`` x (Linear, ReLU) -> Linear to embed_dim. For vector data (the synthetic dataset)."""

    def __init__(self, in_features: int, hidden: int, layers: int, embed_dim: int, dropout: float):
        super().__init__()
        blocks: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                blocks.append(nn.Dropout(dropout))
            width = hidden
        blocks.append(nn.Linear(width, embed_dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float())


def _mlp(spec: dict[str, Any], cfg, embed_dim: int, dropout: float) -> nn.Module:
    if cfg.layers < 0 or cfg.hidden < 1:
        raise DmglError(f"mlp encoder needs layers >= 0 and hidden >= 1, got layers={cfg.layers} hidden={cfg.hidden}")
    return MLPEncoder(math.prod(spec["shape"]), cfg.hidden, cfg.layers, embed_dim, dropout)


def _auto(spec: dict[str, Any], cfg, embed_dim: int, dropout: float) -> nn.Module:
    """By the modality's kind: ResNet18 for audio, frames and images, BERT for text (``weights`` names the text
    model and is used for text only), MLP for vectors. For datasets of the user's own (``dmgl prepare custom``)."""
    by_kind = {"audio": "resnet18", "video": "resnet18", "image": "resnet18", "text": "bert", "vector": "mlp"}
    name = by_kind[spec["kind"]]
    if name != "bert" and cfg.weights:
        cfg = dataclasses.replace(cfg, weights=None)
    return ENCODERS[name](spec, cfg, embed_dim, dropout)


ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "resnet18": functools.partial(build_resnet, "resnet18"),  # audio (1 channel), frames, images
    "resnet50": functools.partial(build_resnet, "resnet50"),  # images (Sarcasm, Twitter2015)
    "bert": build_bert,  # text: a BERT-family transformers model (weights = local folder or hub id)
    "r3d_18": functools.partial(build_video_resnet, "r3d_18"),  # NVGesture clips (RGB 3 / depth 1 / flow 2 ch)
    "r2plus1d_18": functools.partial(build_video_resnet, "r2plus1d_18"),
    "mc3_18": functools.partial(build_video_resnet, "mc3_18"),
    "auto": _auto,
}


def build_encoder(spec: dict[str, Any], cfg, embed_dim: int, dropout: float) -> nn.Module:
    if cfg.name not in ENCODERS:
        raise DmglError(f"unknown encoder {cfg.name!r}; valid: {', '.join(ENCODERS)}")
    return ENCODERS[cfg.name](spec, cfg, embed_dim, dropout)
