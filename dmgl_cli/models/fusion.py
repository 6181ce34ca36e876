"""Fusion modules and the multimodal model.

A fusion module takes the per-modality embeddings z_j and returns the fused logits and per-modality
("uni-modal") logits. Concat follows §3.1: z = [z_1; ...; z_m], y_hat = softmax(W z + b); its uni-modal logits
use the head split W_j z_j + b/m, as OGM-GE / PMR / the paper's code do, so that every modality can be scored
inside the joint model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ModelOutput:
    logits: Tensor
    unimodal_logits: dict[str, Tensor]
    embeddings: dict[str, Tensor]


class ConcatFusion(nn.Module):
    def __init__(self, modalities: list[str], embed_dim: int, num_classes: int):
        super().__init__()
        self.modalities = list(modalities)
        self.embed_dim = embed_dim
        self.head = nn.Linear(embed_dim * len(self.modalities), num_classes)

    def forward(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        fused = torch.cat([embeddings[m] for m in self.modalities], dim=1)
        logits = self.head(fused)
        d, bias_share = self.embed_dim, self.head.bias / len(self.modalities)
        unimodal = {
            m: embeddings[m] @ self.head.weight[:, i * d : (i + 1) * d].T + bias_share
            for i, m in enumerate(self.modalities)
        }
        return logits, unimodal


FUSIONS: dict[str, type[nn.Module]] = {"concat": ConcatFusion}


class MultimodalModel(nn.Module):
    def __init__(self, encoders: nn.ModuleDict, fusion: nn.Module):
        super().__init__()
        self.encoders = encoders
        self.fusion = fusion

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders.keys())

    def encode(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.encoders[m](inputs[m]) for m in self.encoders}

    def forward(self, inputs: dict[str, Tensor]) -> ModelOutput:
        embeddings = self.encode(inputs)
        logits, unimodal = self.fusion(embeddings)
        return ModelOutput(logits=logits, unimodal_logits=unimodal, embeddings=embeddings)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.fusion.parameters())
