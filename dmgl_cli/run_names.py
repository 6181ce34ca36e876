"""How ``dmgl train`` names its runs: apart from :mod:`dmgl_cli.run.training` (which loads torch and MLflow), so that
``dmgl train --dry-run`` shows the names without loading either."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmgl_cli.config import recorded_params
from dmgl_cli.strategies import spec_from_params

if TYPE_CHECKING:
    from dmgl_cli.config import Config


def default_run_name(config: Config) -> str:
    """METHOD-STRATEGY with the strategy's setting, e.g. ``concat-constant-0.5``, ``concat-stepwise-0.95``,
    ``concat-lb``: short (the UI cuts long names), and distinct for runs that differ in alpha or p."""
    spec = spec_from_params({k: str(v) for k, v in recorded_params(config).items()})
    strategy = spec.key.replace(":", "-") if spec is not None else config.strategy.name
    return f"{config.method.name}-{strategy}"


def seed_run_name(parent_name: str, seed: int) -> str:
    """A seed run's name under its parent: ``concat-lb-seed0``."""
    return f"{parent_name}-seed{seed}"
