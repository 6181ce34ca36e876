"""How alpha, the weight of the matching loss in Eq. 1, moves during training.

* ``constant``: a fixed alpha (0 = plain Concat, 1 = matching only).
* ``stepwise``: h(p) of §4.4, alpha = p in the first half of the epochs and 1 - p in the second.
* ``heuristic``: alpha_t = 1 - exp(-1/t), t the 1-based epoch (§3.3).
* ``linear``: alpha falls by a fixed amount per epoch: the control for a learnt alpha.
* ``lb``: learning-based, alpha descends the bilevel hypergradient (Algorithm 1); what the hypergradient measures
  and how it is taken is its outer step (:mod:`~dmgl_cli.strategies.outer_step`); ``lb:fixed-sign`` and
  ``lb:random-sign`` replace its direction (controls).

The package: ``settings.py`` (the ``strategy.*`` config section), ``schedules.py`` (the strategies that need no
training signal), ``learning_based.py`` (Ours-LB's checks and alpha's own optimiser), ``registry.py`` (the explicit
registry, :data:`STRATEGIES`), ``specs.py`` (how the CLI, sweeps and reports name a strategy), all torch-free, and
the Ours-LB outer step, the only part that needs torch (``outer_step.py``: the hooks through which a learning
strategy takes its outer step inside the trainer's loop; ``estimators.py``, ``forward_mode.py``: what it
measures). The trainer calls :meth:`AlphaStrategy.start_epoch` before each epoch and the hooks of
:meth:`AlphaStrategy.outer_step` (None for a schedule) around each step; it never asks which strategy it runs.
State dicts hold plain Python values (the outer step's tensors go in its own), so that checkpoints load with
``torch.load(weights_only=True)``.

Adding a schedule: a class with ``name``, ``start_epoch`` and ``from_settings`` (and ``group``, ``setting_keys``,
``spec_setting`` if it has a setting of its own) and its line in :data:`STRATEGIES` (``registry.py``);
``tests/test_extending.py`` shows the steps and ``tests/test_strategies.py`` the test to copy.
"""

from __future__ import annotations

import inspect
from typing import Any

from dmgl_cli.errors import DmglError
from dmgl_cli.strategies.learning_based import LearningBasedStrategy, check_settings
from dmgl_cli.strategies.registry import STRATEGIES, strategy_class, strategy_from_config
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
)
from dmgl_cli.strategies.specs import (
    CONTROLS,
    LB_VARIANTS,
    STRATEGY_SETS,
    TABLE4,
    StrategySpec,
    parse_strategies,
    parse_strategy,
    setting_of,
    spec_from_flags,
    spec_from_params,
)

__all__ = [
    "ALPHA_GRADIENTS",
    "APPROXIMATIONS",
    "CONTROLS",
    "LB_VARIANTS",
    "STRATEGIES",
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
    "StrategySpec",
    "build_strategy",
    "check_settings",
    "parse_strategies",
    "parse_strategy",
    "setting_of",
    "spec_from_flags",
    "spec_from_params",
    "strategy_class",
    "strategy_from_config",
]


def build_strategy(name: str, **kwargs: Any) -> AlphaStrategy:
    """The strategy registered as ``name`` in :data:`STRATEGIES`, built from its settings (lb: the fields of
    :class:`LearningBasedConfig`)."""
    if name not in STRATEGIES:
        raise DmglError(f"unknown alpha strategy '{name}'; valid names: {', '.join(STRATEGIES)}")
    target = LearningBasedConfig if name == "lb" else strategy_class(name)
    signature = inspect.signature(target)
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        valid = ", ".join(signature.parameters) or "none"
        raise DmglError(f"alpha strategy '{name}': {error}; its settings are: {valid}") from None
    if name == "lb":
        return LearningBasedStrategy(LearningBasedConfig(**kwargs))
    return STRATEGIES[name](**kwargs)
