"""Strategies that set alpha from the epoch alone: constant, stepwise h(p) (§4.4), heuristic (§3.3) and linear
(the reviewer's fixed-decay control for the learnt alpha). No torch."""

from __future__ import annotations

import math
from typing import Any

from dmgl_cli.errors import DmglError
from dmgl_cli.strategies.settings import StrategyConfig


def real(value: object, setting: str) -> float:
    # bool is an int subclass, but "alpha: true" in a config is a mistake, not 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DmglError(f"{setting} must be a finite number, got {value!r}")
    return float(value)


def unit_interval(value: object, setting: str) -> float:
    number = real(value, setting)
    if not 0.0 <= number <= 1.0:
        raise DmglError(f"{setting} must be in [0, 1], got {value}")
    return number


def check_epoch(epoch: int, total_epochs: int) -> None:
    if total_epochs < 1 or not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be in [0, {total_epochs}) with total_epochs >= 1, got {epoch}")


class AlphaStrategy:
    """Base class: holds alpha. Schedules override :meth:`start_epoch`; a strategy that learns alpha says so
    (:attr:`learns_alpha`), and the training layer builds its outer step, whose hooks the trainer calls
    (:func:`dmgl_cli.strategies.estimators.outer_step_for`): this layer, torch-free, never imports it.

    A strategy declares what it is here, and :data:`dmgl_cli.strategies.registry.STRATEGIES` lists it: config,
    the CLI's specs, the recorded params and the tables read these attributes, never a list of names of their own.
    """

    learns_alpha = False  # True: alpha moves by an outer step inside the training loop (Ours-LB)

    name = ""
    group = "Dynamic"  # the group of columns tables show it under: Constant, Stepwise, Dynamic or Control
    # Its own settings in the config's strategy section (dotted; a key ending in "." names a group): recorded as
    # params only for its runs (config.setting_applies)
    setting_keys: tuple[str, ...] = ()
    # The setting the value of a spec sets (constant:0.5 -> strategy.alpha) and what the value is, for messages;
    # None: the spec takes no number
    spec_setting: str | None = None
    spec_value: str = ""

    @classmethod
    def from_settings(cls, settings: StrategyConfig, seed: int) -> AlphaStrategy:
        """The strategy from a resolved config's ``strategy`` section; ``seed`` is the training seed. Checks its
        numbers (raises DmglError), so that config validation refuses what it cannot run."""
        raise NotImplementedError(f"strategy {cls.name!r} does not say how it is built from its settings")

    def __init__(self, alpha: float) -> None:
        self._alpha = float(alpha)

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def always_zero(self) -> bool:
        """Whether alpha is 0 for the whole run, so that the matching loss need not be computed."""
        return False

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        """Called before epoch ``epoch`` (0-based) of ``total_epochs``; alpha stays put unless a schedule moves it."""
        check_epoch(epoch, total_epochs)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self._alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise DmglError(
                f"the checkpoint's alpha strategy is '{state.get('name')}' but this run uses '{self.name}'; "
                "resume with the same strategy"
            )
        self._alpha = float(state["alpha"])


class ConstantStrategy(AlphaStrategy):
    """A fixed alpha: 0 is plain Concat (classification only), 1 is modality matching only."""

    name = "constant"
    group = "Constant"
    setting_keys = ("strategy.alpha",)
    spec_setting, spec_value = "strategy.alpha", "alpha"

    def __init__(self, alpha: float) -> None:
        super().__init__(unit_interval(alpha, "alpha"))

    @classmethod
    def from_settings(cls, settings: StrategyConfig, seed: int) -> AlphaStrategy:
        return cls(settings.alpha)

    @property
    def always_zero(self) -> bool:
        return self._alpha == 0.0


class StepwiseStrategy(AlphaStrategy):
    """h(p) of §4.4: alpha = p while the 0-based epoch is below total_epochs / 2, then 1 - p."""

    name = "stepwise"
    group = "Stepwise"
    setting_keys = ("strategy.p",)
    spec_setting, spec_value = "strategy.p", "p"

    def __init__(self, p: float) -> None:
        self.p = unit_interval(p, "p")
        super().__init__(self.p)

    @classmethod
    def from_settings(cls, settings: StrategyConfig, seed: int) -> AlphaStrategy:
        return cls(settings.p)

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        check_epoch(epoch, total_epochs)
        self._alpha = self.p if epoch < total_epochs / 2 else 1.0 - self.p


class HeuristicStrategy(AlphaStrategy):
    """alpha_t = 1 - exp(-1/t) with t = epoch + 1 (§3.3): matching weighs most early and fades."""

    name = "heuristic"

    def __init__(self) -> None:
        super().__init__(self.alpha_at(1))

    @classmethod
    def from_settings(cls, settings: StrategyConfig, seed: int) -> AlphaStrategy:
        return cls()

    @staticmethod
    def alpha_at(t: int) -> float:
        return 1.0 - math.exp(-1.0 / t)

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        check_epoch(epoch, total_epochs)
        self._alpha = self.alpha_at(epoch + 1)


class LinearStrategy(AlphaStrategy):
    """alpha = max(0, start - rate * epoch) (0-based epoch): a fixed decay. Adam on the sign of a hypergradient that
    always says "lower alpha" moves alpha exactly so (``alpha_lr`` per update), so this is the control that tells
    whether Ours-LB's hypergradient carries information beyond its usual sign."""

    name = "linear"
    group = "Control"
    setting_keys = ("strategy.linear_start", "strategy.linear_rate")
    spec_setting, spec_value = "strategy.linear_rate", "rate (alpha's fall per epoch)"

    @classmethod
    def from_settings(cls, settings: StrategyConfig, seed: int) -> AlphaStrategy:
        return cls(settings.linear_start, settings.linear_rate)

    def __init__(self, start: float, rate: float) -> None:
        self.start = unit_interval(start, "strategy.linear_start")
        self.rate = real(rate, "strategy.linear_rate")
        if self.rate < 0:
            raise DmglError(f"strategy.linear_rate must be >= 0 (alpha falls by it per epoch), got {rate}")
        super().__init__(self.start)

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        check_epoch(epoch, total_epochs)
        self._alpha = max(0.0, self.start - self.rate * epoch)
