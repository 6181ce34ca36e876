"""The explicit registry of alpha strategies (name -> class), in the order tables show them, and what is derived
from it: building a strategy from a config's ``strategy`` section and which ``strategy.*`` settings are a
strategy's own. No torch: config validation builds the strategy to check its numbers.

Adding a schedule: its class (``name``, ``group``, ``setting_keys``, ``spec_setting``, ``from_settings``,
``start_epoch``; see :class:`~dmgl_cli.strategies.schedules.LinearStrategy`) and its line here.
"""

from __future__ import annotations

from dmgl_cli.errors import DmglError
from dmgl_cli.strategies.learning_based import LearningBasedStrategy
from dmgl_cli.strategies.schedules import (
    AlphaStrategy,
    ConstantStrategy,
    HeuristicStrategy,
    LinearStrategy,
    StepwiseStrategy,
)
from dmgl_cli.strategies.settings import StrategyConfig

STRATEGIES: dict[str, type[AlphaStrategy]] = {
    ConstantStrategy.name: ConstantStrategy,
    StepwiseStrategy.name: StepwiseStrategy,
    HeuristicStrategy.name: HeuristicStrategy,
    LinearStrategy.name: LinearStrategy,
    LearningBasedStrategy.name: LearningBasedStrategy,
}


def strategy_class(name: str) -> type[AlphaStrategy]:
    """The registered strategy ``name``; DmglError naming the valid ones otherwise."""
    if name not in STRATEGIES:
        raise DmglError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def strategy_from_config(settings: StrategyConfig, seed: int = 0) -> AlphaStrategy:
    """The strategy a resolved config's ``strategy`` section names, with its settings; ``seed`` is the training
    seed (the random-sign control draws from it)."""
    return strategy_class(settings.name).from_settings(settings, seed)


def _is_setting_of(key: str, strategy: type[AlphaStrategy]) -> bool:
    return any(key == own or (own.endswith(".") and key.startswith(own)) for own in strategy.setting_keys)


def strategy_setting_applies(key: str, strategy: str) -> bool:
    """Whether the flattened ``strategy.*`` setting ``key`` matters to a run of ``strategy``: a strategy's own
    settings (``setting_keys``) only to its runs, any other to every run."""
    owners = [cls for cls in STRATEGIES.values() if _is_setting_of(key, cls)]
    return not owners or any(cls.name == strategy for cls in owners)
