"""What every preparer receives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmgl_cli.errors import DmglError


@dataclass
class PrepareJob:
    name: str  # registered dataset name (defaults to the preparer's name)
    destination: Path  # final folder; write through PreparedWriter so it appears only when complete
    raw: Path | None = None
    seed: int = 0
    workers: int = 1
    skip_bad: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    # progress(done, total, description): called as samples are processed.
    progress: Callable[[int, int, str], None] = lambda done, total, description: None

    def option(self, key: str, kind: type | tuple[type, ...]) -> Any:
        """A preparer-specific ``--option KEY=VALUE`` setting (defaults already merged), checked against its type."""
        value = self.options[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise DmglError(f"option {key}={value!r} must be {names}")
        return value


def resolve_options(declared: dict[str, Any], given: dict[str, Any], preparer: str) -> dict[str, Any]:
    """Merge ``--option`` values over a preparer's declared defaults; unknown keys are errors."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        valid = ", ".join(f"{k} (default {v!r})" for k, v in declared.items()) or "none"
        raise DmglError(f"unknown option {', '.join(unknown)} for `dmgl prepare {preparer}`; valid: {valid}")
    return {**declared, **given}
