"""The text encoder: a BERT-family ``transformers`` model (§4.1 uses BERT for Sarcasm and Twitter2015).

``weights`` names the model: a local folder (``save_pretrained`` output) or a hub id. It must be the model whose
tokenizer prepared the dataset (``dmgl prepare ... --text-model``, recorded in the manifest's ``extra``); the
recipes use the same default for both. A dataset tokenised by CLIP's tokenizer is refused before training
(``check_tokenisation`` in ``encoders.py``; CLIP's text tower is the ``clip_text`` encoder of ``clip.py``).
Nothing is downloaded unless a hub id is named and a network is there (``HF_HUB_OFFLINE=1`` keeps it local). Input: int64 [B, 2, L] (token ids, attention mask); output: the final
hidden state of the first ([CLS]) token, projected to embed_dim — or the masked mean over tokens with
``options.pooling: mean``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dmgl_cli.errors import DmglError
from dmgl_cli.models.vision import Projection


class TextEncoder(nn.Module):
    def __init__(
        self, model: nn.Module, hidden: int, embed_dim: int, dropout: float, pooling: str, vocab_size: int | None
    ):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.vocab_size = vocab_size
        self._ids_checked = False
        self.project = Projection(hidden, embed_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = x[:, 0].long(), x[:, 1].long()
        if not self._ids_checked and self.vocab_size is not None:
            # Once per process: ids beyond the vocabulary mean the data was tokenised for another model.
            largest = int(ids.max())
            if largest >= self.vocab_size:
                raise DmglError(
                    f"token id {largest} is outside the text model's vocabulary ({self.vocab_size}); "
                    "the dataset was tokenised with another model — use the same --text-model for "
                    "`dmgl prepare` and model.encoders.<text>.weights"
                )
            self._ids_checked = True
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        else:
            pooled = hidden[:, 0]
        return self.project(pooled.float())


def build_bert(spec: dict[str, Any], cfg, embed_dim: int, dropout: float) -> nn.Module:
    from transformers import AutoModel

    shape = list(spec["shape"])
    if spec["kind"] != "text" or len(shape) != 2 or shape[0] != 2:
        raise DmglError(f"bert encoder takes text modalities stored as [2, L] (ids, mask), got {spec['kind']} {shape}")
    if not cfg.weights:
        raise DmglError(
            "bert encoder needs `weights`: the text model the dataset was tokenised with (a local folder "
            "or a hub id), e.g. --set model.encoders.text.weights=bert-base-uncased"
        )
    pooling = cfg.options.get("pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise DmglError(f"bert encoder option pooling must be cls or mean, got {pooling!r}")
    try:
        model = AutoModel.from_pretrained(cfg.weights)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DmglError(
            f"cannot load text model {cfg.weights!r} ({first}); name a local folder, or a hub id with a network"
        ) from None
    hidden = getattr(model.config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise DmglError(f"text model {cfg.weights!r} has no hidden_size; use a BERT-family encoder")
    return TextEncoder(model, hidden, embed_dim, dropout, pooling, getattr(model.config, "vocab_size", None))
