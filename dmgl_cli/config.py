"""One typed, frozen configuration object per run: recipe YAML + settings, resolved once and validated.

A recipe (``recipes/<name>.yaml``) is a nested mapping whose keys mirror the dataclasses below. Anything not in
the recipe takes the default written here. :func:`resolve` turns (recipe, ``--set key=value`` overrides, the
CLI's typed flags) into a :class:`Config` once per command; it is passed on unchanged, and the seeds' copies are
made with :func:`with_seed` (``dataclasses.replace``). A method defined by fixed settings (``dmgl-official``)
has them written in here (``Method.pinned_settings``), so the run records what ran; :func:`validate` only checks.
The resolved config is logged whole to every run (flattened as params, and as ``config.yaml``), and
``dmgl train --resume`` / ``dmgl eval`` rebuild the run from that file, never from the current recipe.
See ARCHITECTURE.md for where the config goes from here.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import yaml

from dmgl_cli.errors import DmglError
from dmgl_cli.paths import recipes_dir, safe_name
from dmgl_cli.strategies.settings import LearningBasedConfig as LearningBasedConfig  # re-exported: part of Config
from dmgl_cli.strategies.settings import StrategyConfig

if TYPE_CHECKING:
    from dmgl_cli.strategies import StrategySpec

LOG = logging.getLogger("dmgl")


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder of one modality. ``name`` picks from ``models.ENCODERS``."""

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
    fusion: str = "concat"
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
    matching: str = "infonce"  # infonce (paper) | js (official code) | uniform (Figure 1's uniform-label loss)
    tau: float = 0.1


# The names of dmgl_cli.methods.METHODS, written here so that a mistyped --method is refused before the method
# registry (and torch) is imported; tests/test_config.py checks that the two lists agree.
MethodName = Literal[
    "concat",
    "unimodal",
    "sum",
    "weight",
    "affine",
    "channel",
    "ml-lstm",
    "etmc",
    "mses",
    "g-blend",
    "ogm-ge",
    "greedy",
    "domfn",
    "mslr",
    "pmr",
    "agm",
    "mla",
    "dmgl-official",
    "dmgl-official-eq3",
]


@dataclass(frozen=True)
class MethodConfig:
    name: MethodName = "concat"
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


# Messages name these fields by what the user typed (--strategy, --method), not by their dotted key.
_FIELD_LABELS = {"strategy.name": "strategy", "method.name": "method"}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(f'"{choice}"' for choice in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        label = _FIELD_LABELS.get(where, where)
        raise DmglError(f"unknown {label} {value!r}; valid: {', '.join(choices)}")
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except DmglError:
                continue
        names = " or ".join(_type_name(o) for o in options)
        raise DmglError(f"setting '{where}' must be {names}, got {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; Python reads it as the number meant
            try:
                return float(value)
            except ValueError:
                pass
        raise DmglError(f"setting '{where}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise DmglError(f"setting '{where}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} at {where}")


# Settings renamed since they were first recorded: a run's recorded config.yaml still reads (resume, eval), a new
# --set of the old name is refused with the new one.
RENAMED = {"train.eval_test_every_epoch": "train.test_curves"}


def _rename_recorded(tree: dict[str, Any]) -> None:
    for old, new in RENAMED.items():
        section, _, key = old.rpartition(".")
        values = tree.get(section)
        if isinstance(values, dict) and key in values:
            set_dotted(tree, new, values.pop(key))


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            if where in RENAMED:
                raise DmglError(f"setting '{where}' is now '{RENAMED[where]}'; use that name")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" — did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise DmglError(f"unknown setting '{where}'{hint} (valid here: {', '.join(names)})")
        kwargs[key] = _convert(value, hints[key], where)
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------ dotted settings


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree['a']['b'] = value`` for ``key='a.b'``, creating groups on the way — the one way the CLI's ``--set``,
    a sweep trial and a method's pinned settings change a config."""
    parts = key.split(".")
    if not all(parts):
        raise DmglError(f"setting {key!r} has an empty key part")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise DmglError(f"setting {key!r}: '{part}' is a value, not a group of settings")
        node = child
    node[parts[-1]] = value


def _get_dotted(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=5' -> ('train.epochs', 5); the value is read as YAML (numbers, true/false, null)."""
    if "=" not in text:
        raise DmglError(f"--set {text!r} must look like key=value, e.g. --set train.epochs=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not all(key.split(".")):
        raise DmglError(f"--set {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _pin_method_settings(tree: dict[str, Any], *, announce: bool) -> None:
    """Write the settings that define the chosen method (``Method.pinned_settings``) into the config tree."""
    from dmgl_cli.methods import METHODS

    method = METHODS.get(str(_get_dotted(tree, "method.name") or MethodConfig.name))
    if method is None or not method.pinned_settings:
        return
    strategy = _get_dotted(tree, "strategy.name") or StrategyConfig.name
    if method.strategies is not None and strategy not in method.strategies:
        return  # validate() refuses the combination, naming the strategies the method supports
    changed, defaults = [], Config().flat()
    for key, value in method.pinned_settings.items():
        current = _get_dotted(tree, key)
        current = defaults.get(key) if current is None else current
        if current != value or type(current) is not type(value):
            changed.append(f"{key}={value} (was {current})")
        set_dotted(tree, key, value)
    if changed and announce:
        LOG.warning("method %s sets %s", method.name, ", ".join(changed))


def _tree_of(data: Mapping[str, Any] | None) -> dict[str, Any]:
    return copy.deepcopy(dict(data or {}))  # a caller's mapping is never changed


def _finish(tree: dict[str, Any], *, announce: bool) -> Config:
    _pin_method_settings(tree, announce=announce)
    config = _build(Config, tree)
    validate(config)
    return config


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A validated config from a nested mapping (a recorded config.yaml, a sweep's stored base config, tests);
    settings recorded under an older name are read under their new one."""
    tree = _tree_of(data)
    _rename_recorded(tree)
    return _finish(tree, announce=False)


def config_from_yaml(text: str) -> Config:
    """A recorded ``config.yaml``, as resume and eval rebuild the run."""
    return config_from_dict(yaml.safe_load(text) or {})


def derive(config: Config, settings: Mapping[str, Any]) -> Config:
    """A new validated config: ``config`` with dotted ``settings`` (``{"optim.lr": 0.01}``) applied — a sweep
    trial's configuration."""
    tree = config.to_dict()
    for key, value in settings.items():
        set_dotted(tree, key, value)
    return _finish(tree, announce=False)


def setting_applies(key: str, strategy: str, method: str) -> bool:
    """Whether the flattened setting ``key`` is a setting of a run with this strategy and method: ``strategy.alpha``
    only with constant, ``strategy.p`` only with stepwise, ``strategy.linear_*`` only with linear, ``strategy.lb.*``
    only with lb, and
    ``method.options.*`` of the chosen method only."""
    if key == "strategy.alpha":
        return strategy == "constant"
    if key == "strategy.p":
        return strategy == "stepwise"
    if key.startswith("strategy.lb."):
        return strategy == "lb"
    if key.startswith("strategy.linear_"):
        return strategy == "linear"
    if key.startswith("method.options."):
        return key.startswith(f"method.options.{method}.")
    return True


def recorded_params(config: Config) -> dict[str, Any]:
    """The flattened settings that apply to this run (:func:`setting_applies`), as logged to MLflow;
    ``config.yaml`` keeps the whole config."""
    strategy, method = config.strategy.name, config.method.name
    return {key: value for key, value in config.flat().items() if setting_applies(key, strategy, method)}


def with_seed(config: Config, seed: int) -> Config:
    """The config of one seed's run."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))


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


def resolve(
    recipe: str,
    overrides: Sequence[str] = (),
    *,
    strategy: StrategySpec | None = None,
    method: str | None = None,
    modality: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Config:
    """The one resolution of a command's configuration, in order of precedence (later wins):

    the recipe; the published strategy of ``method`` when no ``strategy`` is given (a comparison method trains as
    published: constant alpha 0); ``overrides`` (``--set key=value``); ``method``, ``strategy`` (a
    :class:`~dmgl_cli.strategies.StrategySpec`: its name and, if given, its alpha or p), ``modality`` (for the
    ``unimodal`` method) and ``settings`` (dotted keys, from the CLI's typed flags such as ``--epochs``); then the
    method's pinned settings. Returns a frozen, validated :class:`Config`.
    """

    def with_given_settings(base: dict[str, Any]) -> dict[str, Any]:
        tree = copy.deepcopy(base)
        for text in overrides:
            set_dotted(tree, *parse_override(text))
        if method is not None:
            set_dotted(tree, "method.name", method)
        if strategy is not None:
            for key, value in strategy.settings().items():
                set_dotted(tree, key, value)
        if modality is not None:
            chosen = _get_dotted(tree, "method.name") or MethodConfig.name
            if chosen != "unimodal":
                raise DmglError(
                    f"--modality picks the one modality of --method unimodal; method {chosen!r} uses every "
                    "modality, drop --modality"
                )
            set_dotted(tree, "method.options.unimodal.modality", modality)
        for key, value in (settings or {}).items():
            set_dotted(tree, key, value)
        return tree

    recipe_tree = read_recipe(recipe)
    tree = with_given_settings(recipe_tree)
    # Unknown keys, wrong types and unknown choices are refused here, before the registries (and torch) load.
    _build(Config, tree)

    from dmgl_cli.methods import METHODS

    published = METHODS[method].published_strategy if method in METHODS and strategy is None else None
    if published is not None:  # below --set and the flags in precedence
        base = copy.deepcopy(recipe_tree)
        for key, value in published.settings().items():
            set_dotted(base, key, value)
        tree = with_given_settings(base)
    return _finish(tree, announce=True)


def load_config(recipe: str, overrides: Sequence[str] = ()) -> Config:
    """A recipe with ``--set`` overrides (:func:`resolve` without the CLI's typed flags)."""
    return resolve(recipe, overrides)


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


# ------------------------------------------------------------------------------------------- --print-config

_YAML_KEY = re.compile(r"^( *)([^\s:#'\"-][^:]*|'[^']*'|\"[^\"]*\"):(?: (.*))?$")


def setting_origins(config: Config, recipe: str, overrides: Sequence[str] = ()) -> dict[str, str]:
    """{dotted key: ``--set`` or ``flag``} for each setting of ``config`` that differs from the recipe's own value
    (the recipe as written, with dmgl's defaults for what it leaves out): ``--set`` where a ``--set`` named the key
    (or a group above it), ``flag`` where a typed flag gave it, or what ``--method`` or ``--strategy`` implies."""
    recipe_values = _build(Config, read_recipe(recipe)).flat()
    given = [parse_override(text)[0] for text in overrides]
    origins = {}
    for key, value in config.flat().items():
        if key == "recipe" or (key in recipe_values and recipe_values[key] == value):
            continue
        named = any(key == g or key.startswith(f"{g}.") for g in given)
        origins[key] = "--set" if named else "flag"
    return origins


def marked_yaml(config: Config, origins: Mapping[str, str]) -> str:
    """``config.to_yaml()`` with a trailing ``# --set`` / ``# flag`` comment on each setting in ``origins``
    (:func:`setting_origins`), so that what differs from the recipe stands out in ``--print-config``."""
    lines, path = [], []  # path: (indent, key) of the groups the current line is in
    for line in config.to_yaml().splitlines():
        match = _YAML_KEY.match(line)
        if match is None:
            lines.append(line)  # a list item or a continued value: no key of its own
            continue
        indent, key, value = len(match.group(1)), match.group(2).strip("'\""), match.group(3)
        while path and path[-1][0] >= indent:
            path.pop()
        dotted = ".".join([k for _, k in path] + [key])
        path.append((indent, key))
        origin = origins.get(dotted) if value else None
        lines.append(f"{line}  # {origin}" if origin else line)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DmglError(message)


def _choice(value: str, valid: typing.Iterable[str], key: str) -> None:
    valid = list(valid)
    _check(value in valid, f"unknown {key} {value!r}; valid: {', '.join(valid)}")


def validate(config: Config) -> None:
    """Range and name checks; each failure names the setting and the valid values. Changes nothing."""
    # Imported here: the registries live with the code they name (and import torch).
    from dmgl_cli.losses import MATCHING_LOSSES
    from dmgl_cli.methods import METHODS
    from dmgl_cli.models import ENCODERS, FUSIONS
    from dmgl_cli.strategies import strategy_from_config

    train, optim, lb = config.train, config.optim, config.strategy.lb
    # Both become folder names (prepared data, the experiment's artifact folder): nothing may climb out.
    safe_name(config.dataset, "dataset")
    if config.experiment is not None:
        safe_name(config.experiment, "experiment")
    _check(train.epochs >= 1, f"train.epochs must be >= 1, got {train.epochs}")
    _check(train.batch_size >= 1, f"train.batch_size must be >= 1, got {train.batch_size}")
    _check(train.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1, got {train.eval_batch_size}")
    _check(train.eval_every >= 1, f"train.eval_every must be >= 1, got {train.eval_every}")
    _check(
        train.device in ("auto", "cpu", "cuda") or train.device.startswith("cuda:"),
        f"train.device must be auto, cpu, cuda or cuda:N, got {train.device!r}",
    )
    _check(0.0 < config.data.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {config.data.val_fraction}")
    _check(config.data.num_workers >= 0, f"data.num_workers must be >= 0, got {config.data.num_workers}")
    _check(optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}")
    _check(optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim.weight_decay}")
    _check(0.0 <= optim.momentum < 1.0, f"optim.momentum must be in [0, 1), got {optim.momentum}")
    _check(0.0 < optim.plateau_factor < 1.0, f"optim.plateau_factor must be in (0, 1), got {optim.plateau_factor}")
    _check(
        optim.grad_clip is None or optim.grad_clip > 0, f"optim.grad_clip must be > 0 or null, got {optim.grad_clip}"
    )
    _check(config.model.embed_dim >= 1, f"model.embed_dim must be >= 1, got {config.model.embed_dim}")
    _check(0.0 <= config.model.dropout < 1.0, f"model.dropout must be in [0, 1), got {config.model.dropout}")
    _choice(config.model.fusion, FUSIONS, "model.fusion")
    for modality, encoder in config.model.encoders.items():
        _choice(encoder.name, ENCODERS, f"encoder for modality {modality!r} (model.encoders.{modality}.name)")
    _choice(config.loss.matching, MATCHING_LOSSES, "loss.matching")
    _check(config.loss.tau > 0, f"loss.tau must be > 0, got {config.loss.tau}")
    _choice(config.method.name, METHODS, "method")
    METHODS[config.method.name].check_config(config)  # strategies it runs with, its pinned settings and options
    _check(
        lb.outer_batch_size is None or lb.outer_batch_size >= 1,
        f"strategy.lb.outer_batch_size must be >= 1 or null, got {lb.outer_batch_size}",
    )
    _check(
        (isinstance(lb.holdout, int) and lb.holdout >= 1) or (isinstance(lb.holdout, float) and 0 < lb.holdout < 1),
        f"strategy.lb.holdout must be a fraction in (0, 1) or a sample count >= 1, got {lb.holdout!r}",
    )
    strategy_from_config(config.strategy)  # the strategy validates its own numbers (alpha, p, lb.*)
    if config.strategy.name == "lb" and lb.approx == "ggn":  # refused here, before any run is created
        from dmgl_cli.methods.base import Method

        _check(
            config.loss.matching == "infonce",
            "strategy.lb.approx=ggn needs loss.matching=infonce (a cross-entropy of similarity logits), got "
            f"{config.loss.matching}; use approx=cg or identity",
        )
        _check(
            METHODS[config.method.name].classification_loss is Method.classification_loss,
            f"strategy.lb.approx=ggn needs the plain cross-entropy of the fused logits; method {config.method.name} "
            "replaces it; use approx=cg or identity",
        )
