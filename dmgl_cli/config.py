"""One typed, frozen configuration object per run: recipe YAML + settings, resolved once and validated.

A recipe (``recipes/<name>.yaml``) is a nested mapping whose keys mirror the dataclasses of
:mod:`dmgl_cli.config_types` (built by :mod:`dmgl_cli.config_tree`). Anything not in the recipe takes the default
written there. :func:`resolve` turns (recipe, ``--set key=value`` overrides, the
CLI's typed flags) into a :class:`Config` once per command; it is passed on unchanged, and the seeds' copies are
made with :func:`with_seed` (``dataclasses.replace``). A method defined by fixed settings (``dmgl-official``)
has them written in here (its catalogue entry's ``pinned_settings``), so the run records what ran;
:func:`validate` only checks, torch-free: the names it accepts and a method's refusals come from
:mod:`dmgl_cli.catalogue`, never from an implementation.
The resolved config is logged whole to every run (flattened as params, and as ``config.yaml``), and
``dmgl train --resume`` / ``dmgl eval`` rebuild the run from that file, never from the current recipe.
See ARCHITECTURE.md for where the config goes from here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dmgl_cli import catalogue
from dmgl_cli.catalogue import setting_applies
from dmgl_cli.config_tree import build, get_dotted, parse_override, rename_recorded, set_dotted
from dmgl_cli.config_types import (
    Config,
    DataConfig,
    EncoderConfig,
    LossConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    flatten,
)
from dmgl_cli.errors import DmglError
from dmgl_cli.paths import recipes_dir, safe_name
from dmgl_cli.strategies.settings import LearningBasedConfig, StrategyConfig

if TYPE_CHECKING:
    from dmgl_cli.strategies import StrategySpec

# The config's types (config_types.py) and the rule of which settings a run records (the catalogue's) are named
# from here too.
__all__ = [
    "Config",
    "DataConfig",
    "EncoderConfig",
    "LearningBasedConfig",
    "LossConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "StrategyConfig",
    "TrainConfig",
    "available_recipes",
    "config_from_dict",
    "config_from_yaml",
    "derive",
    "flatten",
    "load_config",
    "marked_yaml",
    "parse_override",
    "parse_seeds",
    "read_recipe",
    "recipe_path",
    "recorded_params",
    "resolve",
    "set_dotted",
    "setting_applies",
    "setting_origins",
    "validate",
    "with_seed",
]

LOG = logging.getLogger("dmgl")


# ----------------------------------------------------------------------------------------------- building


def _pin_method_settings(tree: dict[str, Any], *, announce: bool) -> None:
    """Write the settings that define the chosen method (its catalogue entry's ``pinned_settings``) into the config
    tree."""
    method = catalogue.METHODS.get(str(get_dotted(tree, "method.name") or MethodConfig.name))
    if method is None or not method.pinned_settings:
        return
    strategy = get_dotted(tree, "strategy.name") or StrategyConfig.name
    if method.strategies is not None and strategy not in method.strategies:
        return  # validate() refuses the combination, naming the strategies the method supports
    changed, defaults = [], Config().flat()
    for key, value in method.pinned_settings.items():
        current = get_dotted(tree, key)
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
    config = build(Config, tree)
    validate(config)
    return config


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A validated config from a nested mapping (a recorded config.yaml, a sweep's stored base config, tests);
    settings recorded under an older name are read under their new one."""
    tree = _tree_of(data)
    rename_recorded(tree)
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
            chosen = get_dotted(tree, "method.name") or MethodConfig.name
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
    build(Config, tree)

    entry = catalogue.METHODS.get(method) if method is not None and strategy is None else None
    published = entry.published_strategy if entry is not None else None
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
    recipe_values = build(Config, read_recipe(recipe)).flat()
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
    """Range and name checks; each failure names the setting and the valid values. Changes nothing. Torch-free:
    names and a method's refusals come from the catalogue."""
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
    _choice(config.model.fusion, catalogue.FUSION_NAMES, "model.fusion")
    for modality, encoder in config.model.encoders.items():
        _choice(
            encoder.name, catalogue.ENCODER_NAMES, f"encoder for modality {modality!r} (model.encoders.{modality}.name)"
        )
    _choice(config.loss.matching, catalogue.MATCHING_LOSS_NAMES, "loss.matching")
    _check(config.loss.tau > 0, f"loss.tau must be > 0, got {config.loss.tau}")
    _choice(config.method.name, catalogue.METHODS, "method")
    method = catalogue.METHODS[config.method.name]
    method.check_config(config)  # strategies it runs with, its pinned settings and options
    _check(
        lb.outer_batch_size is None or lb.outer_batch_size >= 1,
        f"strategy.lb.outer_batch_size must be >= 1 or null, got {lb.outer_batch_size}",
    )
    _check(
        (isinstance(lb.holdout, int) and lb.holdout >= 1) or (isinstance(lb.holdout, float) and 0 < lb.holdout < 1),
        f"strategy.lb.holdout must be a fraction in (0, 1) or a sample count >= 1, got {lb.holdout!r}",
    )
    _choice(config.strategy.name, catalogue.STRATEGIES, "strategy")
    catalogue.strategy_from_config(config.strategy)  # the strategy validates its own numbers (alpha, p, lb.*)
    if config.strategy.name == "lb" and lb.approx == "ggn":  # refused here, before any run is created
        _check(
            config.loss.matching == "infonce",
            "strategy.lb.approx=ggn needs loss.matching=infonce (a cross-entropy of similarity logits), got "
            f"{config.loss.matching}; use approx=cg or identity",
        )
        _check(
            method.plain_classification_loss,
            f"strategy.lb.approx=ggn needs the plain cross-entropy of the fused logits; method {config.method.name} "
            "replaces it; use approx=cg or identity",
        )
