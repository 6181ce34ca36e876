"""What a sweep searches: the tunable hyperparameters (``--tune``), the settings a study is created with, its search
space, and the config of each trial.

Without ``--tune`` the plan is the grid of strategies; with ``--tune`` each trial's remaining parameters are sampled
under per-strategy names (``lr@lb``), so the model of each strategy learns from that strategy's trials only. A plan
is checked when the study is created (every strategy at both ends of every tuned range), not in trial 7.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from dmgl_cli.config import Config, config_from_dict, derive
from dmgl_cli.data.registry import open_dataset
from dmgl_cli.errors import DmglError
from dmgl_cli.methods import build_method
from dmgl_cli.strategies import StrategySpec, parse_strategy

SETTINGS_VERSION = 1


@dataclass(frozen=True)
class Tunable:
    key: str  # config setting
    low: float
    high: float
    log: bool
    strategies: tuple[str, ...] | None = None  # strategy names it applies to; None: all
    help: str = ""

    def applies(self, spec: StrategySpec) -> bool:
        if self.strategies is not None and spec.name not in self.strategies:
            return False
        # alpha = 0 has no matching loss, so its settings change nothing there
        return not (self.key.startswith("loss.") and spec.name == "constant" and spec.value == 0.0)


TUNABLE: dict[str, Tunable] = {
    "lr": Tunable("optim.lr", 1e-4, 1e-1, True, help="learning rate"),
    "weight_decay": Tunable("optim.weight_decay", 1e-6, 1e-2, True, help="weight decay"),
    "dropout": Tunable("model.dropout", 0.0, 0.5, False, help="dropout before the head"),
    "tau": Tunable("loss.tau", 0.02, 1.0, True, help="temperature of the matching loss"),
    "alpha_lr": Tunable(
        "strategy.lb.alpha_lr",
        0.005,
        0.5,
        True,
        ("lb",),
        "step size of alpha (lb; with adam, about how far one update moves alpha)",
    ),
    "initial_alpha": Tunable("strategy.lb.initial_alpha", 0.0, 1.0, False, ("lb",), "alpha at the start (lb)"),
    "lb_scale": Tunable(
        "strategy.lb.scale", 1e-3, 1e-1, True, ("lb",), "identity's look-ahead step or Neumann's series step (lb)"
    ),
}


def parse_tune(text: str | None) -> dict[str, list]:
    """``lr,tau`` or ``lr=1e-3:1e-1,alpha_lr`` -> {name: [low, high, log]}."""
    if not text:
        return {}
    tune: dict[str, list] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, bounds = part.partition("=")
        name = name.strip()
        if name not in TUNABLE:
            raise DmglError(
                f"--tune: unknown hyperparameter {name!r}; tunable: "
                + ", ".join(f"{n} ({t.key})" for n, t in TUNABLE.items())
            )
        tunable = TUNABLE[name]
        low, high = tunable.low, tunable.high
        if bounds:
            try:
                low_text, high_text = bounds.split(":")
                low, high = float(low_text), float(high_text)
            except ValueError:
                raise DmglError(f"--tune {part!r}: a range looks like {name}=LOW:HIGH, e.g. lr=0.001:0.1") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise DmglError(f"--tune {part!r}: LOW must be below HIGH, got {low}:{high}")
        if tunable.log and low <= 0:
            raise DmglError(f"--tune {part!r}: {name} is searched on a log scale, so LOW must be > 0")
        if name in tune:
            raise DmglError(f"--tune lists {name} more than once")
        tune[name] = [low, high, tunable.log]
    return tune


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
                build_method(config)
            except DmglError as exc:
                where = f" with {', '.join(f'{n}={r[end]:g}' for n, r in applicable.items())}" if applicable else ""
                raise DmglError(f"strategy {spec.key}{where}: {exc}") from None
            if not applicable:
                break
    for name in settings.tune:
        if not any(TUNABLE[name].applies(s) for s in settings.specs):
            only = ", ".join(TUNABLE[name].strategies or ())
            raise DmglError(f"--tune {name} applies only to {only}; add it to --strategies or drop {name}")
