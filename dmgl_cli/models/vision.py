"""Convolutional encoders for spectrograms, frames, images and clips (§4.1 and the lineage's choices).

* ``resnet18`` / ``resnet50``: torchvision's BasicBlock/Bottleneck ResNet, built here so that its width is an
  option (``options.width``, 64 = the real network; tests use 4-8 to train in seconds on a CPU). The layer names
  are torchvision's, so ImageNet weights load into it (``weights``: a local state-dict file or a torchvision
  weights name such as ``ResNet18_Weights.IMAGENET1K_V1``; a weights name is fetched by torchvision — from its
  cache or the network — only because the user named it). What the network sees depends on the modality's kind:

  - ``audio`` [B, 257, T] spectrogram: one input channel, as the lineage adapts ResNet18 (§4.1), from scratch;
  - ``video`` [B, T, H, W, C] uint8 frames: frames are folded into the batch, encoded, and averaged over time;
  - ``image`` [B, H, W, C] uint8: one frame.

  uint8 inputs are scaled to [0, 1] and normalised inside the encoder (ImageNet statistics for 3 channels,
  (x - 0.5) / 0.5 otherwise), so the stored arrays stay compact and the loader does no per-sample work.
* ``r3d_18`` / ``r2plus1d_18`` / ``mc3_18``: torchvision's video ResNets for NVGesture's RGB, depth and optical-flow
  clips [B, T, H, W, C] with C = 3 / 1 / 2. The lineage uses I3D, which torchvision does not ship; these are the
  closest torchvision models. The stem takes C channels (Kinetics weights, when named, are averaged over RGB
  into the new channels) and ``options.width`` scales every layer as above.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dmgl_cli.errors import DmglError

if TYPE_CHECKING:
    from dmgl_cli.models.video_resnet import ScaledVideoResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)

# arch -> (torchvision's block class name, blocks per stage). torchvision is imported only when a ResNet is built:
# importing it loads torch._dynamo (~1.5-3 s), which a run of MLP or transformer encoders never needs.
RESNETS: dict[str, tuple[str, list[int]]] = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2]),
    "resnet34": ("BasicBlock", [3, 4, 6, 3]),
    "resnet50": ("Bottleneck", [3, 4, 6, 3]),
}


def _width(cfg, default: int = 64) -> int:
    width = cfg.options.get("width", default)
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise DmglError(f"encoder option width must be a positive integer, got {width!r}")
    return width


# Channels-last (NHWC) convolutions on the CPU only from this base width up: torch 2.14's oneDNN backward corrupts
# memory ("double free", abort) on ResNet18 at width 8 with channels-last 224-px frames, while widths 16-64 on
# 96-299 px inputs ran clean and the real ResNet18 (width 64, 224 px) trains ~1.4x faster than in NCHW.
CPU_CHANNELS_LAST_MIN_WIDTH = 16


class ResNetTrunk(nn.Module):
    """torchvision's ResNet without its classifier, any number of input channels, any base width."""

    def __init__(self, arch: str, in_channels: int, width: int = 64):
        super().__init__()
        from torchvision.models import resnet as tv_resnet

        block_name, layers = RESNETS[arch]
        block = getattr(tv_resnet, block_name)
        self.width = width
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.out_features = width * 8 * block.expansion
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def channels_last_on(self, device: torch.device) -> bool:
        """Whether this trunk runs channels-last on ``device`` (always on CUDA; on the CPU from
        :data:`CPU_CHANNELS_LAST_MIN_WIDTH`)."""
        return device.type == "cuda" or self.width >= CPU_CHANNELS_LAST_MIN_WIDTH

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        from torchvision.models import resnet as tv_resnet

        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                tv_resnet.conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _state_dict_from(weights: str, what: str) -> dict[str, Tensor]:
    """A state dict from a local file or a torchvision weights name."""
    path = Path(weights).expanduser()
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for foreign or corrupt files
            raise DmglError(f"{what}: cannot load weights file {path} ({type(exc).__name__}: {exc})") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise DmglError(f"{what}: weights file {path} does not hold a state dict")
        return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
    if "/" in weights or weights.endswith((".pt", ".pth", ".bin")):
        raise DmglError(f"{what}: weights file {path} does not exist")
    from torchvision.models import get_weight

    try:
        entry = get_weight(weights)
    except (ValueError, KeyError, AttributeError):
        raise DmglError(
            f"{what}: {weights!r} is neither a file nor a torchvision weights name "
            "(e.g. ResNet18_Weights.IMAGENET1K_V1)"
        ) from None
    try:
        return entry.get_state_dict(progress=False)
    except (OSError, RuntimeError) as exc:
        raise DmglError(
            f"{what}: torchvision could not provide {weights} ({exc}); download it once with a network "
            "or pass a local state-dict file"
        ) from None


def _adapt_input_channels(state: dict[str, Tensor], key: str, channels: int) -> None:
    """RGB first-layer weights -> ``channels`` inputs: the RGB mean, repeated and rescaled to keep activations."""
    weight = state.get(key)
    if weight is not None and weight.shape[1] != channels:
        state[key] = weight.mean(dim=1, keepdim=True).repeat(1, channels, *([1] * (weight.dim() - 2))) * (
            weight.shape[1] / channels
        )


def _load_into(module: nn.Module, state: dict[str, Tensor], skip_prefixes: tuple[str, ...], what: str) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
    own = module.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise DmglError(
            f"{what}: pretrained weights do not fit this network ({', '.join(mismatched[:3])} differ in "
            "shape); pretrained weights need options.width=64"
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise DmglError(
            f"{what}: pretrained weights do not match the network (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def _normaliser(channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    if channels == 3:
        return torch.tensor(mean), torch.tensor(std)
    return torch.full((channels,), 0.5), torch.full((channels,), 0.5)


class Projection(nn.Module):
    def __init__(self, in_features: int, embed_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.linear = nn.Linear(in_features, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.dropout(x))


class SpectrogramEncoder(nn.Module):
    """[B, F, T] log-spectrogram -> one-channel ResNet -> [B, embed_dim]."""

    def __init__(self, trunk: ResNetTrunk, embed_dim: int, dropout: float):
        super().__init__()
        self.trunk = trunk
        self.project = Projection(trunk.out_features, embed_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        layout = torch.channels_last if self.trunk.channels_last_on(x.device) else torch.contiguous_format
        return self.project(self.trunk(x.float().unsqueeze(1).contiguous(memory_format=layout)))


class FrameEncoder(nn.Module):
    """[B, T, H, W, C] (or [B, H, W, C]) uint8 -> frames through a 2D ResNet, averaged over time -> [B, embed_dim]."""

    mean: Tensor  # buffers, registered in __init__
    std: Tensor

    def __init__(self, trunk: ResNetTrunk, channels: int, embed_dim: int, dropout: float):
        super().__init__()
        self.trunk = trunk
        mean, std = _normaliser(channels, IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        self.project = Projection(trunk.out_features, embed_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(1)
        batch, frames = x.shape[:2]
        x = x.flatten(0, 1).permute(0, 3, 1, 2).float().div_(255.0)
        # The permuted frames are already channels_last in memory: what the convolutions want, except on the CPU
        # at small widths (see CPU_CHANNELS_LAST_MIN_WIDTH), which get NCHW.
        layout = torch.channels_last if self.trunk.channels_last_on(x.device) else torch.contiguous_format
        x = ((x - self.mean) / self.std).contiguous(memory_format=layout)
        features = self.trunk(x).view(batch, frames, -1).mean(dim=1)
        return self.project(features)


def build_resnet(arch: str, spec: dict[str, Any], cfg, embed_dim: int, dropout: float) -> nn.Module:
    kind, shape = spec["kind"], list(spec["shape"])
    what = f"{arch} encoder"
    if kind == "audio":
        if len(shape) != 2:
            raise DmglError(f"{what}: an audio modality must be a [frequency, time] spectrogram, got shape {shape}")
        channels = 1
    elif kind == "video" and len(shape) == 4:
        channels = shape[-1]
    elif kind == "image" and len(shape) == 3:
        channels = shape[-1]
    else:
        raise DmglError(
            f"{what} takes audio [F, T], video [T, H, W, C] or image [H, W, C] modalities, got {kind} {shape}"
        )
    trunk = ResNetTrunk(arch, channels, _width(cfg))
    if cfg.weights:
        state = _state_dict_from(cfg.weights, what)
        _adapt_input_channels(state, "conv1.weight", channels)
        _load_into(trunk, state, ("fc.",), what)
    if kind == "audio":
        return SpectrogramEncoder(trunk, embed_dim, dropout)
    return FrameEncoder(trunk, channels, embed_dim, dropout)


# ------------------------------------------------------------------------------------------------ video 3D
# The 3D ResNets subclass torchvision's VideoResNet, so they live in models/video_resnet.py, imported when one is
# built; ``VIDEO_ARCHS`` and ``_ScaledVideoResNet`` (its former name here) stay reachable (module ``__getattr__``).


_MOVED_TO_VIDEO_RESNET = {"VIDEO_ARCHS": "VIDEO_ARCHS", "_ScaledVideoResNet": "ScaledVideoResNet"}


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_VIDEO_RESNET:
        from dmgl_cli.models import video_resnet

        return getattr(video_resnet, _MOVED_TO_VIDEO_RESNET[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ClipEncoder(nn.Module):
    """[B, T, H, W, C] uint8 clip -> 3D ResNet -> [B, embed_dim]."""

    mean: Tensor  # buffers, registered in __init__
    std: Tensor

    def __init__(self, backbone: ScaledVideoResNet, channels: int, embed_dim: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        mean, std = _normaliser(channels, KINETICS_MEAN, KINETICS_STD)
        self.register_buffer("mean", mean.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1, 1), persistent=False)
        self.project = Projection(backbone.out_features, embed_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 4, 1, 2, 3).float().div_(255.0)
        return self.project(self.backbone((x - self.mean) / self.std))


def build_video_resnet(arch: str, spec: dict[str, Any], cfg, embed_dim: int, dropout: float) -> nn.Module:
    shape = list(spec["shape"])
    what = f"{arch} encoder"
    if spec["kind"] != "video" or len(shape) != 4:
        raise DmglError(f"{what} takes video modalities [T, H, W, C], got {spec['kind']} {shape}")
    channels = shape[-1]
    from dmgl_cli.models.video_resnet import ScaledVideoResNet

    backbone = ScaledVideoResNet(arch, channels, _width(cfg))
    if cfg.weights:
        state = _state_dict_from(cfg.weights, what)
        _adapt_input_channels(state, "stem.0.weight", channels)
        _load_into(backbone, state, ("fc.",), what)
    return ClipEncoder(backbone, channels, embed_dim, dropout)
