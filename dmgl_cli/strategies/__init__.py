"""How alpha, the weight of the matching loss in Eq. 1, moves during training.

* ``constant``: a fixed alpha (0 = plain Concat, 1 = matching only).
* ``stepwise``: h(p) of §4.4, alpha = p in the first half of the epochs and 1 - p in the second.
* ``heuristic``: alpha_t = 1 - exp(-1/t), t the 1-based epoch (§3.3).
* ``linear``: alpha falls by a fixed amount per epoch: the control for a learnt alpha.
* ``lb``: learning-based, alpha descends the bilevel hypergradient (Algorithm 1); what the hypergradient measures
  and how it is taken is its outer step (:mod:`~dmgl_cli.strategies.outer_step`); ``lb:fixed-sign`` and
  ``lb:random-sign`` replace its direction (controls).

The package: ``settings.py`` (the ``strategy.*`` config section), ``schedules.py`` (the strategies that need no
training signal), ``learning_based.py`` (Ours-LB's checks and alpha's own optimiser), ``specs.py`` (how the CLI,
sweeps and reports name a strategy), and ``outer_step.py``, the only part that needs torch: the hooks through which
a learning strategy takes its outer step inside the trainer's loop. The trainer calls
:meth:`AlphaStrategy.start_epoch` before each epoch and the hooks of :meth:`AlphaStrategy.outer_step` (None for a
schedule) around each step; it never asks which strategy it runs. State dicts hold plain Python values (the outer
step's tensors go in its own), so that checkpoints load with ``torch.load(weights_only=True)``.

Adding a schedule: a class in ``schedules.py`` with ``name`` and ``start_epoch``, an entry in :data:`STRATEGIES`
and in :func:`strategy_from_config`, its name in ``settings.StrategyName``, and its setting (if any) in
``settings.StrategyConfig`` and ``specs.SETTING_OF``; ``tests/test_strategies.py`` shows the test to copy.
"""

from __future__ import annotations

import inspect
from typing import Any

from dmgl_cli.errors import DmglError
from dmgl_cli.strategies.learning_based import LearningBasedStrategy, check_settings
from dmgl_cli.strategies.schedules import (
    AlphaStrategy,
    ConstantStrategy,
    HeuristicStrategy,
    LinearStrategy,
    StepwiseStrategy,
)
from dmgl_cli.strategies.settings import (
    ALPHA_GRADIENTS,
    APPROXIMATIONS,
    LearningBasedConfig,
    StrategyConfig,
    StrategyName,
)
from dmgl_cli.strategies.specs import (
    CONTROLS,
    LB_VARIANTS,
    SETTING_OF,
    STRATEGY_GROUPS,
    STRATEGY_ORDER,
    STRATEGY_SETS,
    TABLE4,
    StrategySpec,
    parse_strategies,
    parse_strategy,
    spec_from_flags,
    spec_from_params,
)

__all__ = [
    "ALPHA_GRADIENTS",
    "APPROXIMATIONS",
    "CONTROLS",
    "LB_VARIANTS",
    "SETTING_OF",
    "STRATEGIES",
    "STRATEGY_GROUPS",
    "STRATEGY_ORDER",
    "STRATEGY_SETS",
    "TABLE4",
    "AlphaStrategy",
    "ConstantStrategy",
    "HeuristicStrategy",
    "LearningBasedConfig",
    "LearningBasedStrategy",
    "LinearStrategy",
    "StepwiseStrategy",
    "StrategyConfig",
    "StrategyName",
    "StrategySpec",
    "build_strategy",
    "check_settings",
    "parse_strategies",
    "parse_strategy",
    "spec_from_flags",
    "spec_from_params",
    "strategy_from_config",
]

STRATEGIES: dict[str, type[AlphaStrategy]] = {
    "constant": ConstantStrategy,
    "stepwise": StepwiseStrategy,
    "heuristic": HeuristicStrategy,
    "linear": LinearStrategy,
    "lb": LearningBasedStrategy,
}


def strategy_from_config(settings: StrategyConfig, seed: int = 0) -> AlphaStrategy:
    """The strategy a resolved config's ``strategy`` section names, with its settings; ``seed`` is the training
    seed (the random-sign control draws from it)."""
    if settings.name == "constant":
        return ConstantStrategy(settings.alpha)
    if settings.name == "stepwise":
        return StepwiseStrategy(settings.p)
    if settings.name == "heuristic":
        return HeuristicStrategy()
    if settings.name == "linear":
        return LinearStrategy(settings.linear_start, settings.linear_rate)
    if settings.name == "lb":
        return LearningBasedStrategy(settings.lb, seed)
    raise DmglError(f"unknown strategy {settings.name!r}; valid: {', '.join(STRATEGIES)}")


def build_strategy(name: str, **kwargs: Any) -> AlphaStrategy:
    """The strategy registered as ``name`` in :data:`STRATEGIES`, built from its settings (lb: the fields of
    :class:`LearningBasedConfig`)."""
    if name not in STRATEGIES:
        raise DmglError(f"unknown alpha strategy '{name}'; valid names: {', '.join(STRATEGIES)}")
    target = LearningBasedConfig if name == "lb" else STRATEGIES[name]
    signature = inspect.signature(target)
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        valid = ", ".join(signature.parameters) or "none"
        raise DmglError(f"alpha strategy '{name}': {error}; its settings are: {valid}") from None
    if name == "lb":
        return LearningBasedStrategy(LearningBasedConfig(**kwargs))
    return STRATEGIES[name](**kwargs)
