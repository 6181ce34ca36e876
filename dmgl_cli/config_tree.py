"""A nested settings mapping (a recipe, ``--set`` overrides, a recorded ``config.yaml``) built into the typed config
dataclasses of :mod:`dmgl_cli.config_types`, each value checked against its field's type, and the one way a dotted
key (``train.epochs``) is read or set. :mod:`dmgl_cli.config` resolves and validates a command's config with these."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Collection
from typing import Any, Literal, Union

import yaml

from dmgl_cli import catalogue
from dmgl_cli.errors import DmglError

# Messages name these fields by what the user typed (--strategy, --method), not by their dotted key.
_FIELD_LABELS = {"strategy.name": "strategy", "method.name": "method"}
# Fields that name a registered thing: refused while the tree is built, from the catalogue's names (read at each
# call: a registry is a dict that may grow).
_NAMED: dict[str, Callable[[], Collection[str]]] = {
    "method.name": lambda: catalogue.METHODS,
    "strategy.name": lambda: catalogue.STRATEGIES,
}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(f'"{choice}"' for choice in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    if where in _NAMED and isinstance(value, str):
        valid = list(_NAMED[where]())
        if value not in valid:
            raise DmglError(f"unknown {_FIELD_LABELS.get(where, where)} {value!r}; valid: {', '.join(valid)}")
        return value
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
        return build(tp, value, where)
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


def rename_recorded(tree: dict[str, Any]) -> None:
    for old, new in RENAMED.items():
        section, _, key = old.rpartition(".")
        values = tree.get(section)
        if isinstance(values, dict) and key in values:
            set_dotted(tree, new, values.pop(key))


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
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


def get_dotted(tree: dict[str, Any], key: str) -> Any:
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
