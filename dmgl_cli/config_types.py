"""The dataclasses of a run's configuration (:class:`Config` and its sections), torch-free and below everything
that reads a config: :mod:`dmgl_cli.config` builds and validates them from a recipe, :mod:`dmgl_cli.catalogue`
checks a method's options against them. Choice fields that name a registered thing (method, strategy, encoder,
fusion, matching loss) are plain strings here; :mod:`dmgl_cli.config` checks them against the catalogue."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from dmgl_cli.strategies.settings import StrategyConfig


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder of one modality. ``name`` is one of ``catalogue.ENCODERS``."""

    name: str = "mlp"
    hidden: int = 64
    layers: int = 2
    # Local path or torchvision weights name / hub id for pretrained encoders; None trains from scratch.
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 64  # every encoder projects to this size so modalities can be matched by cosine similarity
    dropout: float = 0.0
    fusion: str = "concat"  # one of catalogue.FUSIONS
    # Keyed by modality name; "default" applies to modalities not listed.
    encoders: dict[str, EncoderConfig] = field(default_factory=lambda: {"default": EncoderConfig()})


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: Literal["none", "plateau", "step"] = "plateau"
    # ReduceLROnPlateau on the validation classification loss (§4.1: "reduced x10 on plateau").
    plateau_factor: float = 0.1
    plateau_patience: int = 5
    step_size: int = 30
    step_gamma: float = 0.1
    grad_clip: float | None = None


@dataclass(frozen=True)
class LossConfig:
    matching: str = "infonce"  # one of catalogue.MATCHING_LOSSES: infonce (paper) | js (official code) | uniform (Figure 1's uniform-label loss)
    tau: float = 0.1


@dataclass(frozen=True)
class MethodConfig:
    name: str = "concat"  # a key of dmgl_cli.catalogue.METHODS
    # Per-method hyperparameters, keyed by method name: method.<name>.<setting>.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    val_fraction: float = 0.1  # carved from train (seeded, stratified) when the dataset has no validation split
    split_seed: int = 0
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    eval_batch_size: int = 512
    seed: int = 0
    select_metric: Literal["acc", "map", "f1"] = "acc"  # validation metric that picks the best epoch (never test)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast, used on CUDA only
    deterministic: bool = False
    # Validation every k epochs (and at the last); the best epoch is chosen among these on validation only, and
    # optim.scheduler=plateau steps at these epochs (its patience counts validations).
    eval_every: int = 1
    # Test scored at every validated epoch (curves), not only at each new best epoch and the last one.
    test_curves: bool = False
    compile: bool = False  # the model's forward through torch.compile (GPU throughput: bench/gpu.sh); off on CPU


@dataclass(frozen=True)
class Config:
    dataset: str = "synthetic"
    recipe: str = ""
    experiment: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())

    def method_options(self, name: str | None = None) -> dict[str, Any]:
        return dict(self.method.options.get(name or self.method.name, {}))

    def encoder_for(self, modality: str) -> EncoderConfig:
        encoders = self.model.encoders
        return encoders.get(modality) or encoders.get("default") or EncoderConfig()


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
