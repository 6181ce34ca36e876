"""Strategies that set alpha from the epoch alone: constant, stepwise h(p) (§4.4), heuristic (§3.3) and linear
(the reviewer's fixed-decay control for the learnt alpha). No torch."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from dmgl_cli.errors import DmglError

if TYPE_CHECKING:
    from dmgl_cli.strategies.outer_step import OuterStep, TrainingLoop


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
    """Base class: holds alpha. Schedules override :meth:`start_epoch`; a strategy that learns alpha returns its
    outer step from :meth:`outer_step`, whose hooks the trainer calls (:mod:`dmgl_cli.strategies.outer_step`)."""

    name = ""

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

    def outer_step(self, loop: TrainingLoop) -> OuterStep | None:
        """The hooks that learn alpha inside ``loop``'s training loop; None for a schedule."""
        return None

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

    def __init__(self, alpha: float) -> None:
        super().__init__(unit_interval(alpha, "alpha"))

    @property
    def always_zero(self) -> bool:
        return self._alpha == 0.0


class StepwiseStrategy(AlphaStrategy):
    """h(p) of §4.4: alpha = p while the 0-based epoch is below total_epochs / 2, then 1 - p."""

    name = "stepwise"

    def __init__(self, p: float) -> None:
        self.p = unit_interval(p, "p")
        super().__init__(self.p)

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        check_epoch(epoch, total_epochs)
        self._alpha = self.p if epoch < total_epochs / 2 else 1.0 - self.p


class HeuristicStrategy(AlphaStrategy):
    """alpha_t = 1 - exp(-1/t) with t = epoch + 1 (§3.3): matching weighs most early and fades."""

    name = "heuristic"

    def __init__(self) -> None:
        super().__init__(self.alpha_at(1))

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

    def __init__(self, start: float, rate: float) -> None:
        self.start = unit_interval(start, "strategy.linear_start")
        self.rate = real(rate, "strategy.linear_rate")
        if self.rate < 0:
            raise DmglError(f"strategy.linear_rate must be >= 0 (alpha falls by it per epoch), got {rate}")
        super().__init__(self.start)

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        check_epoch(epoch, total_epochs)
        self._alpha = max(0.0, self.start - self.rate * epoch)
