"""What a sweep searches: the tunable hyperparameters (``--tune``), the settings a study is created with, its search
space, and the config of each trial.

Without ``--tune`` the plan is the grid of strategies; with ``--tune`` each trial's remaining parameters are sampled
under per-strategy names (``lr@lb``), so the model of each strategy learns from that strategy's trials only. A plan
is checked when the study is created (every strategy at both ends of every tuned range), not in trial 7.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from dmgl_cli.catalogue.methods import METHODS
from dmgl_cli.config import Config, config_from_dict, derive
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.errors import DmglError
from dmgl_cli.strategies import StrategySpec, parse_strategy
from dmgl_cli.tunables import TUNABLE

SETTINGS_VERSION = 1


@dataclass
class SweepSettings:
    """What a study was created with; stored in the study (user attribute ``dmgl``) so workers need nothing else."""

    recipe: str
    base_config: str  # resolved config YAML (recipe + --set), before strategy and tuned settings
    overrides: list[str]
    strategies: list[str]  # spec keys, in order
    tune: dict[str, list]
    trials_per_strategy: int
    seeds: list[int]
    metric: str  # the validation metric: val_<metric> is the objective
    prune: bool
    heartbeat: int
    experiment: str
    dataset: str
    method: str
    version: int = SETTINGS_VERSION

    @property
    def specs(self) -> list[StrategySpec]:
        return [parse_strategy(k) for k in self.strategies]

    @property
    def total_trials(self) -> int:
        return len(self.strategies) * self.trials_per_strategy

    def search_space(self) -> dict[str, Any]:
        space: dict[str, Any] = {"strategy": {"type": "categorical", "choices": self.strategies}}
        for spec in self.specs:
            for name, (low, high, log) in self.tune.items():
                if TUNABLE[name].applies(spec):
                    space[f"{name}@{spec.key}"] = {
                        "type": "float",
                        "low": low,
                        "high": high,
                        "log": log,
                        "setting": TUNABLE[name].key,
                    }
        return space

    def base_dict(self) -> dict[str, Any]:
        return yaml.safe_load(self.base_config)


def trial_config(base: Mapping[str, Any], settings: Mapping[str, Any]) -> Config:
    """The base config with dotted ``settings`` applied (values kept as Python numbers), validated."""
    return derive(config_from_dict(base), settings)


def tuned_settings(spec: StrategySpec, values: Mapping[str, float]) -> dict[str, Any]:
    """The dotted config settings of one trial: the strategy's own, then each tuned value under its setting."""
    settings = spec.settings()
    for name, value in values.items():
        settings[TUNABLE[name].key] = value
    return settings


def check_plan(settings: SweepSettings) -> None:
    """Fail at creation, not in trial 7: every strategy (at both ends of every tuned range) must make a valid
    config that its method accepts, and the dataset must be prepared."""
    base = settings.base_dict()
    open_dataset(settings.dataset)
    for spec in settings.specs:
        applicable = {n: r for n, r in settings.tune.items() if TUNABLE[n].applies(spec)}
        for end in (0, 1):
            try:
                config = trial_config(base, tuned_settings(spec, {n: r[end] for n, r in applicable.items()}))
                METHODS[config.method.name].check_config(config)  # torch-free: the method's own checks
            except DmglError as exc:
                where = f" with {', '.join(f'{n}={r[end]:g}' for n, r in applicable.items())}" if applicable else ""
                raise DmglError(f"strategy {spec.key}{where}: {exc}") from None
            if not applicable:
                break
    for name in settings.tune:
        if not any(TUNABLE[name].applies(s) for s in settings.specs):
            only = ", ".join(TUNABLE[name].strategies or ())
            raise DmglError(f"--tune {name} applies only to {only}; add it to --strategies or drop {name}")
