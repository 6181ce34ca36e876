"""Channel: the multimodal transfer module, MMTM (Joze et al. CVPR 2020) — squeeze-and-excitation across the
modalities' encoders at intermediate stages.

At every fusion point each modality's feature map ``A_j`` [batch, C_j, ...] is squeezed to its channel means
``S_j``; one joint layer mixes them and each modality gets its own excitation::

    Z   = ReLU(W [S_1; ...; S_m] + b)               # size int(2 * sum C_j / ratio), as in the authors' code
    E_j = W_j Z + b_j,   A_j <- gate_scale * sigmoid(E_j) * A_j   (broadcast over the spatial/temporal axes)

so each stream's channels are re-weighted by what all streams saw. Each stream then ends in its own classifier and
the prediction is the average of the streams' logits — the late fusion of the authors' ``MMTNet``
(``pred = (skeleton_pred + vis_pred) / 2``); the streams' logits are the per-modality scores
(``per_modality_source = "own"``). The paper's Eq. gates with ``2 * sigmoid`` (identity at initialisation when
E = 0), the authors' code with ``sigmoid``: ``gate_scale`` (default 2, the paper) picks. More than two modalities
use the same module with one excitation per modality.

Where the modules sit. An encoder is split into *stages* whose composition is the encoder; an MMTM follows every
stage but the last, so the last stage maps the (recalibrated) final feature map to the embedding:

* MLP encoders (the synthetic data) have no spatial maps: each hidden Linear-ReLU block is a stage and its
  activations are treated as 1x1 feature maps (the squeeze is the identity), so MMTM recalibrates hidden units.
* The ResNet encoders of ``models.vision`` (``resnet18``/``resnet50`` on spectrograms, frames and images; the
  3D ``r3d_18``/``r2plus1d_18``/``mc3_18`` on clips) are split into (stem, layer1, layer2), layer3, layer4,
  (pooling, projection): MMTM after layer2, layer3 and layer4, where the ResNet adaptation of the authors' MMTNet
  puts its three modules. Frame encoders fold time into the batch; between stages their maps are held as
  [B, C, T, H, W], so MMTM squeezes over time and space as on 3D maps. Any other encoder takes part if it exposes
  ``stages() -> list[callable]``. Feature-map widths are read from one dry forward pass (eval mode) at build time.
* Text encoders have no channels to exchange; they are refused, as the paper's "-" cells for the text-image
  datasets.

All modalities need the same number of stages. Settings (``method.options.channel.*``): ``ratio`` (4, the
paper's and code's reduction ratio), ``gate_scale`` (2.0). Logged per epoch over the training batches:
``mmtm_gate_<point>_<modality>`` (mean gate) and ``mmtm_gate_std``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmgl_cli.catalogue.options import ChannelOptions
from dmgl_cli.errors import DmglError
from dmgl_cli.methods.fusion_base import (
    FusionMethod,
    FusionModel,
    FusionOutput,
    encoders_for,
)
from dmgl_cli.models.encoders import MLPEncoder
from dmgl_cli.models.vision import ClipEncoder, FrameEncoder, ResNetTrunk, SpectrogramEncoder

Stage = Callable[[Tensor], Tensor]


def _mlp_stages(encoder: MLPEncoder) -> list[Stage]:
    """Each hidden Linear-ReLU(-Dropout) block is a stage; the last Linear (to the embedding) is the final one."""
    blocks = list(encoder.net.children())
    starts = [i for i, block in enumerate(blocks) if isinstance(block, nn.Linear)]
    starts[0] = 0  # the leading Flatten belongs to the first stage
    ends = starts[1:] + [len(blocks)]
    stages: list[Stage] = [nn.Sequential(*blocks[a:b]) for a, b in zip(starts, ends, strict=True)]
    first = stages[0]
    stages[0] = lambda x: first(x.float())  # MLPEncoder.forward casts to float before its layers
    return stages


def _resnet_stages(trunk: ResNetTrunk, stem: Stage, fold: Stage, unfold: Stage, finish: Stage) -> list[Stage]:
    """ResNet stages in [batch, C, ...] layout: (stem, layer1, layer2), layer3, layer4, (pooling + projection).

    ``fold``/``unfold`` move between that layout and the one the trunk's 2D layers take (frames in the batch)."""
    return [
        lambda x: unfold(trunk.layer2(trunk.layer1(stem(x)))),
        lambda x: unfold(trunk.layer3(fold(x))),
        lambda x: unfold(trunk.layer4(fold(x))),
        lambda x: finish(fold(x)),
    ]


def _spectrogram_stages(encoder: SpectrogramEncoder) -> list[Stage]:
    trunk = encoder.trunk

    def stem(x: Tensor) -> Tensor:
        return trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x.float().unsqueeze(1)))))

    def finish(x: Tensor) -> Tensor:
        return encoder.project(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    return _resnet_stages(trunk, stem, lambda x: x, lambda x: x, finish)


def _frame_stages(encoder: FrameEncoder) -> list[Stage]:
    """FrameEncoder folds frames into the batch; between stages the maps are kept as [B, C, T, H, W] so that MMTM
    squeezes over time and space, as it does on 3D CNN maps."""
    trunk = encoder.trunk
    frames: list[int] = []  # T of the current batch, set by the stem

    def stem(x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(1)
        frames[:] = [x.shape[1]]
        x = x.flatten(0, 1).permute(0, 3, 1, 2).float().div(255.0)
        x = (x - encoder.mean) / encoder.std
        return trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))

    def unfold(x: Tensor) -> Tensor:  # [B*T, C, H, W] -> [B, C, T, H, W]
        return x.unflatten(0, (-1, frames[0])).transpose(1, 2)

    def fold(x: Tensor) -> Tensor:  # [B, C, T, H, W] -> [B*T, C, H, W]
        return x.transpose(1, 2).flatten(0, 1)

    def finish(x: Tensor) -> Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return encoder.project(pooled.view(-1, frames[0], pooled.shape[1]).mean(dim=1))

    return _resnet_stages(trunk, stem, fold, unfold, finish)


def _clip_stages(encoder: ClipEncoder) -> list[Stage]:
    backbone = encoder.backbone

    def stem(x: Tensor) -> Tensor:
        x = x.permute(0, 4, 1, 2, 3).float().div(255.0)
        return backbone.layer2(backbone.layer1(backbone.stem((x - encoder.mean) / encoder.std)))

    def finish(x: Tensor) -> Tensor:
        return encoder.project(backbone.fc(torch.flatten(backbone.avgpool(x), 1)))

    return [stem, backbone.layer3, backbone.layer4, finish]


def encoder_stages(encoder: nn.Module) -> list[Stage] | None:
    """The encoder as a list of stages whose composition is its forward pass, or None if it cannot be split."""
    if isinstance(encoder, MLPEncoder):
        return _mlp_stages(encoder)
    if isinstance(encoder, SpectrogramEncoder):
        return _spectrogram_stages(encoder)
    if isinstance(encoder, FrameEncoder):
        return _frame_stages(encoder)
    if isinstance(encoder, ClipEncoder):
        return _clip_stages(encoder)
    stages_method: Callable[[], Iterable[Stage]] | None = getattr(encoder, "stages", None)
    if callable(stages_method):
        return list(stages_method())
    return None


class MMTM(nn.Module):
    """One multimodal transfer module over ``len(channels)`` feature maps."""

    def __init__(self, channels: list[int], ratio: int, gate_scale: float):
        super().__init__()
        self.gate_scale = gate_scale
        self.squeeze = nn.Linear(sum(channels), max(1, int(2 * sum(channels) / ratio)))
        self.excitations = nn.ModuleList([nn.Linear(self.squeeze.out_features, c) for c in channels])

    def gates(self, features: list[Tensor]) -> list[Tensor]:
        """Each modality's channel gate [batch, C_j] from all modalities' squeezed feature maps."""
        squeezed = [f.flatten(2).mean(dim=2) if f.dim() > 2 else f for f in features]
        joint = torch.relu(self.squeeze(torch.cat(squeezed, dim=1)))
        return [self.gate_scale * torch.sigmoid(excite(joint)) for excite in self.excitations]

    @staticmethod
    def recalibrate(features: list[Tensor], gates: list[Tensor]) -> list[Tensor]:
        """Every feature map times its gate, broadcast over the spatial/temporal axes."""
        return [f * g.view(*g.shape, *([1] * (f.dim() - 2))) for f, g in zip(features, gates, strict=True)]

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        gates = self.gates(features)
        return self.recalibrate(features, gates), gates


class StreamHeads(nn.Module):
    """One classifier per stream; the fused logits are their mean (MMTNet's late fusion)."""

    def __init__(self, modalities: list[str], embed_dim: int, num_classes: int):
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(embed_dim, num_classes) for m in modalities})

    def forward(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
        unimodal = {m: head(embeddings[m]) for m, head in self.heads.items()}
        return torch.stack(list(unimodal.values())).mean(dim=0), unimodal, {}


class MMTMModel(FusionModel):
    """Encoders run stage by stage in lockstep, with an MMTM between consecutive stages."""

    def __init__(
        self, encoders: nn.ModuleDict, fusion: nn.Module, stages: dict[str, list[Stage]], mmtms: nn.ModuleList
    ):
        super().__init__(encoders, fusion)
        self.mmtms = mmtms
        # A plain dict: the stages are the encoders' own blocks, already registered under `encoders`.
        self.stage_lists = stages

    def run(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[list[Tensor]]]:
        names = self.modalities
        features = [inputs[m] for m in names]
        gates: list[list[Tensor]] = []
        for index in range(len(self.stage_lists[names[0]])):
            features = [self.stage_lists[m][index](x) for m, x in zip(names, features, strict=True)]
            if index < len(self.mmtms):
                features, point_gates = self.mmtms[index](features)
                gates.append(point_gates)
        return dict(zip(names, features, strict=True)), gates

    def encode(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.run(inputs)[0]

    def forward(self, inputs: dict[str, Tensor]) -> FusionOutput:
        embeddings, gates = self.run(inputs)
        logits, unimodal, extras = self.fusion(embeddings)
        return FusionOutput(
            logits=logits, unimodal_logits=unimodal, embeddings=embeddings, extras={**extras, "gates": gates}
        )


@torch.no_grad()
def _stage_widths(encoder: nn.Module, stages: list[Stage], spec: dict[str, Any]) -> list[int]:
    """Channel count (dim 1) of every stage's output, from a dry forward pass on two zero samples in eval mode
    (batch-norm statistics untouched)."""
    x = torch.from_numpy(np.zeros((2, *spec["shape"]), dtype=np.dtype(spec["dtype"])))
    was_training = encoder.training
    encoder.eval()
    widths = []
    for stage in stages:
        x = stage(x)
        widths.append(int(x.shape[1]))
    encoder.train(was_training)
    return widths


class ChannelMethod(FusionMethod, method="channel"):
    """MMTM between the encoders' stages; late fusion of per-stream classifiers. Settings: ``ratio`` (4),
    ``gate_scale`` (2.0)."""

    options: ChannelOptions

    def make_mmtm(self, channels: list[int]) -> MMTM:
        """The module at one fusion point, over feature maps of ``channels`` channels (one per modality)."""
        return MMTM(channels, self.options.ratio, float(self.options.gate_scale))

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> MMTMModel:
        method = f"method {self.name!r} (MMTM)"
        for modality, spec in modalities.items():
            if spec.get("kind") == "text":
                raise DmglError(
                    f"{method} exchanges channels between CNN feature maps; modality {modality!r} is "
                    f"text (encoder {self.config.encoder_for(modality).name!r}), which has none — the paper reports "
                    f"no {self.paper_label} result for the text-image datasets. Use another method for this dataset."
                )
        encoders = encoders_for(self.config, modalities, num_classes)
        stages: dict[str, list[Stage]] = {}
        for modality, encoder in encoders.items():
            found = encoder_stages(encoder)
            if found is None:
                raise DmglError(
                    f"{method} needs intermediate feature maps, but the encoder "
                    f"{self.config.encoder_for(modality).name!r} of modality {modality!r} exposes no stages "
                    "(a stages() method listing its blocks); use an mlp or CNN encoder that does"
                )
            if len(found) < 2:
                raise DmglError(
                    f"{method} sits between encoder stages, but the encoder of modality {modality!r} "
                    "has a single stage (an mlp encoder with layers=0); give it hidden layers, e.g. "
                    f"--set model.encoders.{modality}.layers=2"
                )
            stages[modality] = found
        counts = {m: len(s) for m, s in stages.items()}
        if len(set(counts.values())) != 1:
            raise DmglError(
                f"{method} fuses the encoders stage by stage and needs the same number of stages in "
                f"every encoder; got {', '.join(f'{m}: {n}' for m, n in counts.items())}"
            )
        widths = {m: _stage_widths(encoders[m], stages[m], modalities[m]) for m in stages}
        names = list(modalities)
        mmtms = nn.ModuleList(
            [self.make_mmtm([widths[m][point] for m in names]) for point in range(counts[names[0]] - 1)]
        )
        heads = StreamHeads(names, self.config.model.embed_dim, num_classes)
        return MMTMModel(encoders, heads, stages, mmtms)

    def extra_losses(self, output: FusionOutput, labels: Tensor, step: dict[str, Any]) -> dict[str, Tensor]:
        gates = output.extras["gates"]
        names = list(output.embeddings)
        stats = {
            f"mmtm_gate_{point}_{m}": g.float().mean()
            for point, point_gates in enumerate(gates)
            for m, g in zip(names, point_gates, strict=True)
        }
        stats["mmtm_gate_std"] = torch.cat([g.float().flatten() for point_gates in gates for g in point_gates]).std()
        self.track(stats)
        return {}
