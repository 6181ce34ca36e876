"""Methods as hooks on the shared training loop; ``METHODS`` is the explicit registry (name -> class)."""

from __future__ import annotations

from dmgl_cli.errors import DmglError
from dmgl_cli.methods.base import ConcatMethod, Method

METHODS: dict[str, type[Method]] = {
    ConcatMethod.name: ConcatMethod,
}


def build_method(config) -> Method:
    name = config.method.name
    if name not in METHODS:
        raise DmglError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    method = METHODS[name](config, config.method_options(name))
    if method.strategies is not None and config.strategy.name not in method.strategies:
        raise DmglError(
            f"method {name!r} cannot be combined with --strategy {config.strategy.name}; "
            f"it supports: {', '.join(method.strategies)}"
        )
    method.check()
    return method
