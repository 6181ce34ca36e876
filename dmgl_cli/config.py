"""One typed configuration object per run: recipe YAML + ``--set key=value`` overrides, validated.

A recipe (``recipes/<name>.yaml``) is a nested mapping whose keys mirror the dataclasses below. Anything not in
the recipe takes the default written here. The resolved config is logged whole to every run (flattened as params,
and as ``config.yaml``), and ``dmgl train --resume`` / ``dmgl eval`` rebuild the run from that file, never from
the current recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from dmgl_cli.errors import DmglError
from dmgl_cli.paths import recipes_dir, safe_name


@dataclass
class EncoderConfig:
    """Encoder of one modality. ``name`` picks from ``models.ENCODERS``."""

    name: str = "mlp"
    hidden: int = 64
    layers: int = 2
    # Local path or torchvision weights name / hub id for pretrained encoders; None trains from scratch.
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    embed_dim: int = 64  # every encoder projects to this size so modalities can be matched by cosine similarity
    dropout: float = 0.0
    fusion: str = "concat"
    # Keyed by modality name; "default" applies to modalities not listed.
    encoders: dict[str, EncoderConfig] = field(default_factory=lambda: {"default": EncoderConfig()})


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "plateau"  # none | plateau | step
    # ReduceLROnPlateau on the validation classification loss (§4.1: "reduced x10 on plateau").
    plateau_factor: float = 0.1
    plateau_patience: int = 5
    step_size: int = 30
    step_gamma: float = 0.1
    grad_clip: float | None = None


@dataclass
class LossConfig:
    matching: str = "infonce"  # infonce (paper) | js (official code) | uniform (Figure 1's uniform-label loss)
    tau: float = 0.1


@dataclass
class LearningBasedConfig:
    """Settings of the learning-based (bilevel) strategy, Eq. (2)-(3) and Algorithm 1; what each computes is in
    :mod:`dmgl_cli.hypergradient` and :class:`dmgl_cli.strategies.LearningBasedStrategy`. The defaults were chosen
    with bench/lb_fidelity.py (figures in bench/README.md)."""

    initial_alpha: float = 0.5
    alpha_lr: float = 0.05  # adam: about how far alpha moves per update; sgd: multiplies the hypergradient
    alpha_optimizer: str = "adam"  # adam (step independent of the hypergradient's magnitude) | sgd (Algorithm 1)
    alpha_lr_halving: int | None = None  # halve alpha_lr every N epochs (the authors' code: 20); null: never
    # "epoch": once at each epoch's end, after its inner loop (Algorithm 1); N: every N optimiser steps;
    # "epoch_start": before each epoch (the released code, with approx official)
    update_every: int | str = "epoch"
    # identity: first-order one-step look-ahead (no curvature) | cg, neumann: Eq. 3's H^-1 | official: the
    # authors' released rule (dmgl-official)
    approx: str = "identity"
    terms: int = 20  # CG iterations or Neumann terms (Hessian-vector products); identity uses none
    # identity: the look-ahead step (auto: the optimiser's learning rate); neumann: the series step (auto:
    # 1 / lambda_max of H by power iteration, refreshed every curvature_refresh updates); cg: unused
    scale: float | str = "auto"
    damping: float = 0.0  # added to H by cg / neumann, on top of the optimiser's (coupled) weight decay
    curvature_refresh: int = 10  # alpha updates between two lambda_max estimates (neumann with scale auto)
    min_alpha: float = 0.0
    max_alpha: float = 1.0
    # holdout: outer batches from training samples set aside (never trained on), apart from the validation split
    # that picks the best epoch and drives the scheduler | val: from the validation split (then that split both
    # steers alpha and selects the model, so its scores are optimistic) | train: from the training split
    outer_data: str = "holdout"
    holdout: int | float = 0.05  # a fraction of train (stratified) or a count (seeded random), by data.split_seed
    outer_batch_size: int | None = None  # None: the training batch size
    outer_sampling: str = "random"  # random: a fresh seeded batch per update | fixed: the first outer_batch_size
    params: str = "all"  # all | head | first (the first parameter tensor only): which enter H and the gradients


@dataclass
class StrategyConfig:
    name: str = "lb"  # constant | stepwise | heuristic | lb
    alpha: float = 0.0  # constant
    p: float = 0.05  # stepwise h(p)
    lb: LearningBasedConfig = field(default_factory=LearningBasedConfig)


@dataclass
class MethodConfig:
    name: str = "concat"
    # Per-method hyperparameters, keyed by method name: method.<name>.<setting>.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class DataConfig:
    val_fraction: float = 0.1  # carved from train (seeded, stratified) when the dataset has no validation split
    split_seed: int = 0
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    eval_batch_size: int = 512
    seed: int = 0
    select_metric: str = "acc"  # validation metric that picks the best epoch (never test)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast, used on CUDA only
    deterministic: bool = False
    eval_test_every_epoch: bool = True  # per-epoch test curves; selection still uses validation only


@dataclass
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


# ----------------------------------------------------------------------------------------------- building


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


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except DmglError as exc:
                errors.append(str(exc))
        names = " or ".join(_type_name(o) for o in options)
        raise DmglError(f"setting '{where}' must be {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DmglError(f"setting '{where}' must be a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise DmglError(f"setting '{where}' must be a mapping, got {value!r}")
        _, value_type = typing.get_args(tp)
        return {str(k): _convert(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DmglError(f"setting '{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DmglError(f"setting '{where}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise DmglError(f"setting '{where}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise DmglError(f"setting '{where}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} at {where}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" — did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise DmglError(f"unknown setting '{where}'{hint} (valid here: {', '.join(names)})")
        kwargs[key] = _convert(value, hints[key], where)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data or {})


# ---------------------------------------------------------------------------------------------- recipes


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """A built-in recipe name (``crema-d``) or a path to a YAML file."""
    candidate = Path(name_or_path).expanduser()
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path or "\\" in name_or_path:
        if not candidate.is_file():
            raise DmglError(f"recipe file {candidate} does not exist")
        return candidate
    path = recipes_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise DmglError(
            f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(available_recipes()) or '(none)'} "
            "— or pass a path to a YAML file"
        )
    return path


def read_recipe(name_or_path: str) -> dict[str, Any]:
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DmglError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DmglError(f"recipe {path} must be a mapping of settings, got {type(data).__name__}")
    data.setdefault("recipe", path.stem)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.epochs=5' -> (['train', 'epochs'], 5); the value is read as YAML (numbers, true/false, null)."""
    if "=" not in text:
        raise DmglError(f"--set {text!r} must look like key=value, e.g. --set train.epochs=5")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise DmglError(f"--set {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise DmglError(f"--set {text!r}: '{key}' is a value, not a group of settings")
            node = child
        node[keys[-1]] = value
    return data


def load_config(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data = apply_overrides(read_recipe(recipe), list(overrides))
    config = config_from_dict(data)
    validate(config)
    return config


def config_from_yaml(text: str) -> Config:
    config = config_from_dict(yaml.safe_load(text))
    validate(config)
    return config


def parse_seeds(text: str, base_seed: int) -> list[int]:
    """``--seeds``: a count (``3``: seeds from the recipe's train.seed up) or a list (``0,1,2``)."""
    text = text.strip()
    try:
        if "," in text:
            seeds = [int(part) for part in text.split(",") if part.strip()]
        else:
            count = int(text)
            if count < 1:
                raise DmglError(f"--seeds must be >= 1 (a count) or a list like 0,1,2; got {text}")
            seeds = list(range(base_seed, base_seed + count))
    except ValueError:
        raise DmglError(f"--seeds must be a count (3) or a comma-separated list (0,1,2); got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise DmglError(f"--seeds {text!r} must list distinct seeds")
    return seeds


# ------------------------------------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DmglError(message)


def _choice(value: str, valid: typing.Iterable[str], key: str) -> None:
    valid = list(valid)
    _check(value in valid, f"unknown {key} {value!r}; valid: {', '.join(valid)}")


def validate(config: Config) -> None:
    """Range and name checks; each failure names the setting and the valid values."""
    # Imported here: the registries live with the code they name, and they import config's dataclasses.
    from dmgl_cli.losses import MATCHING_LOSSES
    from dmgl_cli.methods import METHODS
    from dmgl_cli.models import ENCODERS, FUSIONS
    from dmgl_cli.strategies import STRATEGIES

    train, optim, strat = config.train, config.optim, config.strategy
    # Both become folder names (prepared data, the experiment's artifact folder): nothing may climb out.
    safe_name(config.dataset, "dataset")
    if config.experiment is not None:
        safe_name(config.experiment, "experiment")
    _check(train.epochs >= 1, f"train.epochs must be >= 1, got {train.epochs}")
    _check(train.batch_size >= 1, f"train.batch_size must be >= 1, got {train.batch_size}")
    _check(train.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1, got {train.eval_batch_size}")
    _check(train.select_metric in ("acc", "map", "f1"), f"train.select_metric must be acc, map or f1, got {train.select_metric!r}")
    _check(
        train.device in ("auto", "cpu", "cuda") or train.device.startswith("cuda:"),
        f"train.device must be auto, cpu, cuda or cuda:N, got {train.device!r}",
    )
    _check(0.0 < config.data.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {config.data.val_fraction}")
    _check(config.data.num_workers >= 0, f"data.num_workers must be >= 0, got {config.data.num_workers}")
    _choice(optim.name, ("sgd", "adam", "adamw"), "optim.name")
    _check(optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}")
    _check(optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim.weight_decay}")
    _check(0.0 <= optim.momentum < 1.0, f"optim.momentum must be in [0, 1), got {optim.momentum}")
    _choice(optim.scheduler, ("none", "plateau", "step"), "optim.scheduler")
    _check(0.0 < optim.plateau_factor < 1.0, f"optim.plateau_factor must be in (0, 1), got {optim.plateau_factor}")
    _check(optim.grad_clip is None or optim.grad_clip > 0, f"optim.grad_clip must be > 0 or null, got {optim.grad_clip}")
    _check(config.model.embed_dim >= 1, f"model.embed_dim must be >= 1, got {config.model.embed_dim}")
    _check(0.0 <= config.model.dropout < 1.0, f"model.dropout must be in [0, 1), got {config.model.dropout}")
    _choice(config.model.fusion, FUSIONS, "model.fusion")
    for modality, encoder in config.model.encoders.items():
        _choice(encoder.name, ENCODERS, f"encoder for modality {modality!r} (model.encoders.{modality}.name)")
    _choice(config.loss.matching, MATCHING_LOSSES, "loss.matching")
    _check(config.loss.tau > 0, f"loss.tau must be > 0, got {config.loss.tau}")
    _choice(config.method.name, METHODS, "method")
    _choice(strat.name, STRATEGIES, "strategy")
    METHODS[config.method.name].configure(config)  # a method defined by fixed settings pins them (dmgl-official)
    lb = strat.lb
    _choice(lb.outer_data, ("holdout", "val", "train"), "strategy.lb.outer_data")
    _choice(lb.outer_sampling, ("random", "fixed"), "strategy.lb.outer_sampling")
    _choice(lb.params, ("all", "head", "first"), "strategy.lb.params")
    _check(lb.outer_batch_size is None or lb.outer_batch_size >= 1,
           f"strategy.lb.outer_batch_size must be >= 1 or null, got {lb.outer_batch_size}")
    _check(isinstance(lb.scale, float) or lb.scale == "auto",
           f'strategy.lb.scale must be a number > 0 or "auto", got {lb.scale!r}')
    _check((isinstance(lb.holdout, int) and lb.holdout >= 1) or (isinstance(lb.holdout, float) and 0 < lb.holdout < 1),
           f"strategy.lb.holdout must be a fraction in (0, 1) or a sample count >= 1, got {lb.holdout!r}")
    build_strategy_from_config(config)  # the strategy validates its own numbers (alpha, p, lb.*)


def build_strategy_from_config(config: Config):
    from dmgl_cli.strategies import build_strategy

    strat = config.strategy
    if strat.name == "constant":
        return build_strategy("constant", alpha=strat.alpha)
    if strat.name == "stepwise":
        return build_strategy("stepwise", p=strat.p)
    if strat.name == "heuristic":
        return build_strategy("heuristic")
    lb = strat.lb
    return build_strategy(
        "lb",
        initial_alpha=lb.initial_alpha,
        alpha_lr=lb.alpha_lr,
        update_every=lb.update_every,
        approx=lb.approx,
        terms=lb.terms,
        scale=None if lb.scale == "auto" else lb.scale,
        damping=lb.damping,
        min_alpha=lb.min_alpha,
        max_alpha=lb.max_alpha,
        alpha_optimizer=lb.alpha_optimizer,
        alpha_lr_halving=lb.alpha_lr_halving,
        curvature_refresh=lb.curvature_refresh,
    )
