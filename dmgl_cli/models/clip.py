"""CLIP's vision and text towers (Radford et al. 2021) as dmgl encoders: the §4.5 / Table 5 experiment, which
replaces ResNet50 and BERT by the encoders of a pretrained CLIP and fine-tunes them.

``weights`` names the CLIP checkpoint, loaded with ``transformers`` the way the BERT encoder is: a local folder
(``save_pretrained`` output of a ``CLIPModel``, or of a ``CLIPVisionModelWithProjection`` /
``CLIPTextModelWithProjection``) or a hub id such as ``openai/clip-vit-base-patch32``. Nothing is downloaded
unless a hub id is named and a network is there (``HF_HUB_OFFLINE=1`` keeps it local). Each encoder keeps only
its own tower (and CLIP's projection into the joint space); every weight it keeps must come from the checkpoint
(a tower left randomly initialised is refused). All weights are trained.

* ``clip_vision``: image [B, H, W, 3] uint8 (or frames [B, T, H, W, 3], encoded one by one and averaged over time).
  Inside the encoder the pixels are scaled to [0, 1], resized (bicubic, antialiased) to the checkpoint's
  ``image_size`` when the stored size differs, and normalised with CLIP's own mean and std
  (0.48145466, 0.4578275, 0.40821073) / (0.26862954, 0.26130258, 0.27577711), not ImageNet's, so the stored
  arrays are the same as for ResNet50 (the stored images are square, so the resize keeps the aspect). The
  feature is the vision transformer's pooled output (the layer-normed class token).
* ``clip_text``: text [B, 2, L] int64 (token ids, attention mask) from CLIP's tokenizer (``dmgl prepare ...
  --text-model <the same checkpoint> -o max_tokens=77``; CLIP's position table has 77 entries, longer sequences
  are refused). ``options.pooling``: ``eos`` (default) is CLIP's own pooled output, the final hidden state at the
  first end-of-text token (what CLIP was trained on); ``last`` takes the state at the last attended token, which
  for a sentence pair (``<bos> A <eos> <eos> B <eos>``, Twitter2015's sentence + target) is the only one that has
  seen both segments, since CLIP's text attention is causal.

``options.features``: ``projection`` (default) passes the pooled feature through CLIP's own linear projection
into its joint image-text space (``visual_projection`` / ``text_projection``, ``projection_dim`` wide);
``pooled`` skips it (then the checkpoint need not hold the projection). Either way a dropout and a linear layer
then project it to ``model.embed_dim``, as for every encoder.

That the text was tokenised by CLIP's tokenizer is checked before training, from the tokenizer the preparer
recorded in the manifest (:func:`dmgl_cli.models.encoders.check_tokenisation`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dmgl_cli.errors import DmglError
from dmgl_cli.models.vision import Projection

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FEATURES = ("projection", "pooled")
POOLINGS = ("eos", "last")


def is_clip_tokenizer(record: dict[str, Any] | None) -> bool:
    """Whether a tokenizer record (``manifest.extra.tokenizer``, written by the text preparers) is CLIP's."""
    return isinstance(record, dict) and str(record.get("class", "")).startswith("CLIPTokenizer")


def _option(cfg, key: str, valid: tuple[str, ...], what: str) -> str:
    value = cfg.options.get(key, valid[0])
    if value not in valid:
        raise DmglError(f"{what} option {key} must be one of {', '.join(valid)}, got {value!r}")
    return value


def _load(tower: str, weights: str | None, features: str, what: str) -> nn.Module:
    """The ``tower`` (vision | text) of the CLIP checkpoint ``weights``, with its projection."""
    if not weights:
        raise DmglError(
            f"{what} needs `weights`: a CLIP checkpoint (a local folder or a hub id), e.g. "
            f"--set model.encoders.<modality>.weights=openai/clip-vit-base-patch32"
        )
    from transformers import AutoConfig, CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    def cannot(exc: Exception) -> DmglError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return DmglError(
            f"{what}: cannot load CLIP model {weights!r} ({first}); name a local folder, or a hub id with a network"
        )

    try:
        model_type = AutoConfig.from_pretrained(weights).model_type
    except (OSError, ValueError) as exc:
        raise cannot(exc) from None
    if model_type not in ("clip", f"clip_{tower}_model"):
        raise DmglError(
            f"{what}: {weights!r} is a {model_type} model, not CLIP; name a CLIP checkpoint such as "
            "openai/clip-vit-base-patch32"
        )
    cls = CLIPVisionModelWithProjection if tower == "vision" else CLIPTextModelWithProjection
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the other tower's weights are "unexpected": a long, expected report
    try:
        loaded: Any = cls.from_pretrained(weights, output_loading_info=True)
        model, info = loaded
    except (OSError, ValueError) as exc:
        raise cannot(exc) from None
    except RuntimeError as exc:
        if "mismatched" not in str(exc):
            raise
        raise DmglError(  # transformers refuses weights whose shapes disagree with config.json
            f"{what}: the {tower} weights of {weights!r} do not have the shapes its config.json gives "
            "(e.g. a projection_dim that differs); name a checkpoint saved by save_pretrained"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    projection = "visual_projection." if tower == "vision" else "text_projection."
    missing = sorted(k for k in info["missing_keys"] if features == "projection" or not k.startswith(projection))
    if missing:
        advice = "; or set options.features: pooled" if all(k.startswith(projection) for k in missing) else ""
        raise DmglError(
            f"{what}: {weights!r} does not hold the {tower} tower's weights {', '.join(missing[:3])}"
            f"{' and more' if len(missing) > 3 else ''} (they would start random); name a full CLIP checkpoint{advice}"
        )
    return model


class ClipVisionEncoder(nn.Module):
    """[B, H, W, 3] (or [B, T, H, W, 3]) uint8 -> CLIP normalisation -> CLIP vision tower -> [B, embed_dim]."""

    model: Any  # CLIPVisionModelWithProjection (vision_model, visual_projection)
    mean: Tensor  # buffers, registered in __init__
    std: Tensor

    def __init__(self, model: nn.Module, image_size: int, features: str, width: int, embed_dim: int, dropout: float):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.features = features
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, -1, 1, 1), persistent=False)
        self.project = Projection(width, embed_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(1)
        batch, frames = x.shape[:2]
        x = x.flatten(0, 1).permute(0, 3, 1, 2).float().div_(255.0)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 1.0)
        pixels = ((x - self.mean) / self.std).contiguous()
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        if self.features == "projection":
            pooled = self.model.visual_projection(pooled)
        return self.project(pooled.float().view(batch, frames, -1).mean(dim=1))


class ClipTextEncoder(nn.Module):
    """[B, 2, L] int64 (CLIP token ids, attention mask) -> CLIP text tower -> [B, embed_dim]."""

    model: Any  # CLIPTextModelWithProjection (text_model, text_projection)

    def __init__(
        self, model: nn.Module, pooling: str, features: str, width: int, vocab_size: int, embed_dim: int, dropout: float
    ):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.features = features
        self.vocab_size = vocab_size
        self._ids_checked = False
        self.project = Projection(width, embed_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = x[:, 0].long(), x[:, 1].long()
        if not self._ids_checked:
            # Once per process: ids beyond the vocabulary mean the data was tokenised for another model.
            largest = int(ids.max())
            if largest >= self.vocab_size:
                raise DmglError(
                    f"token id {largest} is outside the CLIP text model's vocabulary ({self.vocab_size}); the "
                    "dataset was tokenised for another model — prepare it with --text-model naming this checkpoint"
                )
            self._ids_checked = True
        out = self.model.text_model(input_ids=ids, attention_mask=mask)
        if self.pooling == "eos":
            pooled = out.pooler_output
        else:
            positions = torch.arange(ids.shape[1], device=ids.device)
            last = (mask * positions).argmax(dim=1)
            pooled = out.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), last]
        if self.features == "projection":
            pooled = self.model.text_projection(pooled)
        return self.project(pooled.float())


def build_clip_vision(spec: dict[str, Any], cfg, embed_dim: int, dropout: float) -> nn.Module:
    what = "clip_vision encoder"
    shape = list(spec["shape"])
    if spec["kind"] not in ("image", "video") or len(shape) not in (3, 4) or shape[-1] != 3:
        raise DmglError(
            f"{what} takes RGB images [H, W, 3] or frames [T, H, W, 3] stored as uint8, got {spec['kind']} {shape}"
        )
    features = _option(cfg, "features", FEATURES, what)
    model = _load("vision", cfg.weights, features, what)
    config: Any = model.config
    width = config.projection_dim if features == "projection" else config.hidden_size
    return ClipVisionEncoder(model, int(config.image_size), features, int(width), embed_dim, dropout)


def build_clip_text(spec: dict[str, Any], cfg, embed_dim: int, dropout: float) -> nn.Module:
    what = "clip_text encoder"
    shape = list(spec["shape"])
    if spec["kind"] != "text" or len(shape) != 2 or shape[0] != 2:
        raise DmglError(f"{what} takes text modalities stored as [2, L] (ids, mask), got {spec['kind']} {shape}")
    features = _option(cfg, "features", FEATURES, what)
    pooling = _option(cfg, "pooling", POOLINGS, what)
    model = _load("text", cfg.weights, features, what)
    config: Any = model.config
    if shape[1] > config.max_position_embeddings:
        raise DmglError(
            f"{what}: the text is stored as {shape[1]} tokens, but CLIP reads at most {config.max_position_embeddings}; "
            f"prepare it again with -o max_tokens={config.max_position_embeddings}"
        )
    width = config.projection_dim if features == "projection" else config.hidden_size
    return ClipTextEncoder(model, pooling, features, int(width), int(config.vocab_size), embed_dim, dropout)
