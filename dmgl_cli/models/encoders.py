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
from dmgl_cli.models.clip import build_clip_text, build_clip_vision, is_clip_tokenizer
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
    "clip_vision": build_clip_vision,  # images: CLIP's vision tower (weights = CLIP folder or hub id; §4.5)
    "clip_text": build_clip_text,  # text tokenised by CLIP's tokenizer: CLIP's text tower (§4.5)
    "r3d_18": functools.partial(build_video_resnet, "r3d_18"),  # NVGesture clips (RGB 3 / depth 1 / flow 2 ch)
    "r2plus1d_18": functools.partial(build_video_resnet, "r2plus1d_18"),
    "mc3_18": functools.partial(build_video_resnet, "mc3_18"),
    "auto": _auto,
}


def build_encoder(spec: dict[str, Any], cfg, embed_dim: int, dropout: float) -> nn.Module:
    if cfg.name not in ENCODERS:
        raise DmglError(f"unknown encoder {cfg.name!r}; valid: {', '.join(ENCODERS)}")
    return ENCODERS[cfg.name](spec, cfg, embed_dim, dropout)


def check_tokenisation(config, manifest: dict[str, Any]) -> None:
    """Refuse a text encoder fed with another tokenizer's ids, before any run starts: ``clip_text`` reads only text
    tokenised by CLIP's tokenizer, ``bert`` (and ``auto``, which picks BERT for text) never. ``manifest`` is the
    prepared dataset's manifest; the text preparers record the tokenizer in its ``extra.tokenizer``
    (``{name, class, vocab_size}``). A dataset prepared before that record existed passes for ``bert`` and is
    refused for ``clip_text``."""
    name, preparer = manifest.get("name", "?"), manifest.get("preparer", "<dataset>")
    record = (manifest.get("extra") or {}).get("tokenizer")
    used = f"{record.get('name')} ({record.get('class')})" if isinstance(record, dict) else None
    for modality, spec in manifest.get("modalities", {}).items():
        if spec.get("kind") != "text":
            continue
        encoder = config.encoder_for(modality)
        key = f"model.encoders.{modality}.name"
        if encoder.name == "clip_text" and not is_clip_tokenizer(record):
            found = f"was tokenised with {used}" if used else "does not record its tokenizer (an older dmgl made it)"
            raise DmglError(
                f"dataset {name!r} {found}, but {key} is clip_text, which reads CLIP's tokens only; prepare the raw "
                f"files again with CLIP's tokenizer under another name (`dmgl prepare {preparer} ... --name "
                f"{name}-clip --text-model {encoder.weights or 'openai/clip-vit-base-patch32'} -o max_tokens=77`) "
                "and train on that, as recipes sarcasm-clip and twitter2015-clip do"
            )
        if encoder.name in ("bert", "auto") and is_clip_tokenizer(record):
            raise DmglError(
                f"dataset {name!r} was tokenised with {used}, but {key} is {encoder.name}, a BERT-family encoder; "
                "use clip_text for it (as recipes sarcasm-clip and twitter2015-clip do), or prepare the dataset "
                "again with the text model's tokenizer (--text-model)"
            )
