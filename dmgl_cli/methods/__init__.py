"""Methods as hooks on the shared training loop. What each method *is* (name, strategies, options, refusals) is its
entry in :data:`dmgl_cli.catalogue.METHODS`; this package holds the implementations, which the entries name
(``implementation``) and :func:`method_class` imports."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dmgl_cli.catalogue import METHODS as CATALOGUE
from dmgl_cli.catalogue import method_entry
from dmgl_cli.errors import DmglError
from dmgl_cli.methods.base import ConcatMethod, Method

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config

__all__ = ["METHODS", "ConcatMethod", "Method", "build_method", "method_class"]


def method_class(name: str) -> type[Method]:
    """The implementation of method ``name``: the class its catalogue entry names, whose identity is that entry."""
    entry = method_entry(name)
    module, _, attribute = entry.implementation.partition(":")
    implementation = getattr(importlib.import_module(module), attribute, None)
    if not (isinstance(implementation, type) and issubclass(implementation, Method)) or implementation.entry != entry:
        raise DmglError(
            f"method {name!r}: its catalogue entry names {entry.implementation}, which is not a Method subclass "
            f"declared with method={name!r}"
        )
    return implementation


# The implementations of every method of the catalogue (name -> class), in the catalogue's order.
METHODS: dict[str, type[Method]] = {name: method_class(name) for name in CATALOGUE}


def build_method(config: Config) -> Method:
    """The method a config names, with its checked, typed options (``config.validate`` ran the same checks)."""
    entry = method_entry(config.method.name)
    return method_class(entry.name)(config, entry.check_config(config))
