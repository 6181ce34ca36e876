"""What dmgl can run, torch-free and below :mod:`dmgl_cli.config`: the methods (:data:`METHODS`, with each one's
options, strategies and refusals), the alpha strategies (:data:`STRATEGIES`) and which ``strategy.*`` settings are
whose, and the names of the encoders, fusions and matching losses a config may choose. Config derives its choices
and checks from here and never imports an implementation, so ``--print-config`` and ``--dry-run`` do not load
torch. The implementations' own registries (``methods``, ``models.ENCODERS``, ``losses.MATCHING_LOSSES``) are
checked against these names by ``tests/test_config.py``.
"""

from __future__ import annotations

from dmgl_cli.catalogue.methods import METHODS, MethodEntry, method_entry
from dmgl_cli.catalogue.options import MethodOptions, options_of
from dmgl_cli.strategies.registry import STRATEGIES, strategy_class, strategy_from_config, strategy_setting_applies
from dmgl_cli.strategies.settings import LearningBasedConfig, StrategyConfig

__all__ = [
    "ENCODER_NAMES",
    "FUSION_NAMES",
    "MATCHING_LOSS_NAMES",
    "METHODS",
    "STRATEGIES",
    "LearningBasedConfig",
    "MethodEntry",
    "MethodOptions",
    "StrategyConfig",
    "method_entry",
    "options_of",
    "setting_applies",
    "strategy_class",
    "strategy_from_config",
]

# The encoders of models/encoders.py (model.encoders.MODALITY.name).
ENCODER_NAMES = (
    "mlp",
    "resnet18",
    "resnet50",
    "bert",
    "clip_vision",
    "clip_text",
    "r3d_18",
    "r2plus1d_18",
    "mc3_18",
    "auto",
)
FUSION_NAMES = ("concat",)  # model.fusion: models/fusion.py
# loss.matching: infonce (the paper) | js (the official code) | mixture_kl | uniform (Figure 1's uniform labels)
MATCHING_LOSS_NAMES = ("infonce", "js", "mixture_kl", "uniform")


def setting_applies(key: str, strategy: str, method: str) -> bool:
    """Whether the flattened setting ``key`` is a setting of a run with this strategy and method: a strategy's own
    settings (``strategy.alpha`` of constant, ``strategy.lb.*`` of lb, ...) only with that strategy,
    ``method.options.*`` of the chosen method only, everything else always."""
    if key.startswith("strategy."):
        return strategy_setting_applies(key, strategy)
    if key.startswith("method.options."):
        return key.startswith(f"method.options.{method}.")
    return True
