"""How alpha, the weight of the matching loss in Eq. 1, moves during training.

* ``constant``: a fixed alpha (0 = plain Concat, 1 = matching only).
* ``stepwise``: h(p) of §4.4, alpha = p in the first half of the epochs and 1 - p in the second.
* ``heuristic``: alpha_t = 1 - exp(-1/t), t the 1-based epoch (§3.3).
* ``lb``: learning-based, alpha descends the bilevel hypergradient of Eq. 3 (Algorithm 1).

The trainer calls :meth:`AlphaStrategy.start_epoch` before each epoch and, after every optimiser step,
:meth:`AlphaStrategy.needs_hypergradient`; when that says yes it computes
:func:`dmgl_cli.hypergradient.alpha_hypergradient` and hands it to :meth:`AlphaStrategy.apply_hypergradient`.
State dicts hold plain Python values only, so that checkpoints load with ``torch.load(weights_only=True)``.
"""

import inspect
import math

from dmgl_cli.errors import DmglError
from dmgl_cli.hypergradient import APPROXIMATIONS


def _real(value: object, setting: str) -> float:
    # bool is an int subclass, but "alpha: true" in a config is a mistake, not 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DmglError(f"{setting} must be a finite number, got {value!r}")
    return float(value)


def _unit_interval(value: object, setting: str) -> float:
    number = _real(value, setting)
    if not 0.0 <= number <= 1.0:
        raise DmglError(f"{setting} must be in [0, 1], got {value}")
    return number


class AlphaStrategy:
    """Base class: holds alpha; schedules override :meth:`start_epoch`, learners the hypergradient methods."""

    name = ""

    def __init__(self, alpha: float) -> None:
        self._alpha = float(alpha)

    @property
    def alpha(self) -> float:
        return self._alpha

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        """Called before epoch ``epoch`` (0-based) of ``total_epochs``; alpha stays put unless a schedule moves it."""
        _check_epoch(epoch, total_epochs)

    def needs_hypergradient(self, global_step: int, end_of_epoch: bool) -> bool:
        """Whether alpha wants a hypergradient after optimiser step ``global_step`` (counted from 1)."""
        return False

    def apply_hypergradient(self, grad: float) -> None:
        raise RuntimeError(f"strategy '{self.name}' does not learn alpha; it never asks for a hypergradient")

    def state_dict(self) -> dict:
        return {"name": self.name, "alpha": self._alpha}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise DmglError(
                f"the checkpoint's alpha strategy is '{state.get('name')}' but this run uses '{self.name}'; "
                "resume with the same strategy"
            )
        self._alpha = float(state["alpha"])


def _check_epoch(epoch: int, total_epochs: int) -> None:
    if total_epochs < 1 or not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be in [0, {total_epochs}) with total_epochs >= 1, got {epoch}")


class ConstantStrategy(AlphaStrategy):
    """A fixed alpha: 0 is plain Concat (classification only), 1 is modality matching only."""

    name = "constant"

    def __init__(self, alpha: float) -> None:
        super().__init__(_unit_interval(alpha, "alpha"))


class StepwiseStrategy(AlphaStrategy):
    """h(p) of §4.4: alpha = p while the 0-based epoch is below total_epochs / 2, then 1 - p."""

    name = "stepwise"

    def __init__(self, p: float) -> None:
        self.p = _unit_interval(p, "p")
        super().__init__(self.p)

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        _check_epoch(epoch, total_epochs)
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
        _check_epoch(epoch, total_epochs)
        self._alpha = self.alpha_at(epoch + 1)


class LearningBasedStrategy(AlphaStrategy):
    """Alpha learnt by gradient descent on the bilevel hypergradient (Algorithm 1).

    After every ``update_every`` optimiser steps (or at the end of each epoch with ``update_every="epoch"``) the
    trainer computes ``d L_CLS / d alpha`` with ``approx`` (see :mod:`dmgl_cli.hypergradient`) and alpha becomes
    ``clip(alpha - alpha_lr * grad, min_alpha, max_alpha)``. Algorithm 1 clips to [0, 1]; the bounds are settings
    because the official code clips to [0.05, 0.95]. ``terms`` (Neumann terms or CG iterations) is ignored by
    ``identity``; ``scale`` is used by ``identity`` and ``neumann``; ``damping`` by ``neumann`` and ``cg``.
    """

    name = "lb"

    def __init__(
        self,
        initial_alpha: float,
        alpha_lr: float,
        update_every: int | str,
        approx: str,
        terms: int,
        scale: float,
        damping: float,
        min_alpha: float = 0.0,
        max_alpha: float = 1.0,
    ) -> None:
        self.min_alpha = _unit_interval(min_alpha, "strategy.lb.min_alpha")
        self.max_alpha = _unit_interval(max_alpha, "strategy.lb.max_alpha")
        if self.min_alpha > self.max_alpha:
            raise DmglError(f"strategy.lb.min_alpha ({min_alpha}) must not exceed strategy.lb.max_alpha ({max_alpha})")
        initial = _real(initial_alpha, "strategy.lb.initial_alpha")
        if not self.min_alpha <= initial <= self.max_alpha:
            raise DmglError(
                f"strategy.lb.initial_alpha must be in [{self.min_alpha}, {self.max_alpha}] "
                f"(strategy.lb.min_alpha, strategy.lb.max_alpha), got {initial_alpha}"
            )
        self.alpha_lr = _real(alpha_lr, "strategy.lb.alpha_lr")
        if self.alpha_lr <= 0:
            raise DmglError(f"strategy.lb.alpha_lr must be > 0, got {alpha_lr}")
        if update_every != "epoch" and (
            isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1
        ):
            raise DmglError(f'strategy.lb.update_every must be an integer >= 1 or "epoch", got {update_every!r}')
        self.update_every = update_every
        if approx not in APPROXIMATIONS:
            raise DmglError(f"strategy.lb.approx must be one of {', '.join(APPROXIMATIONS)}, got {approx!r}")
        self.approx = approx
        if approx != "identity" and (isinstance(terms, bool) or not isinstance(terms, int) or terms < 1):
            raise DmglError(f"strategy.lb.terms must be an integer >= 1 for approx '{approx}', got {terms!r}")
        self.terms = terms
        self.scale = _real(scale, "strategy.lb.scale")
        if self.scale <= 0:
            raise DmglError(f"strategy.lb.scale must be > 0, got {scale}")
        self.damping = _real(damping, "strategy.lb.damping")
        if self.damping < 0:
            raise DmglError(f"strategy.lb.damping must be >= 0, got {damping}")
        super().__init__(initial)
        self.last_hypergradient: float | None = None
        self.updates = 0

    @property
    def hypergradient_settings(self) -> dict:
        """Keyword arguments for :func:`dmgl_cli.hypergradient.alpha_hypergradient`, alpha included."""
        return {
            "alpha": self._alpha,
            "approx": self.approx,
            "terms": self.terms,
            "scale": self.scale,
            "damping": self.damping,
        }

    def needs_hypergradient(self, global_step: int, end_of_epoch: bool) -> bool:
        if self.update_every == "epoch":
            return end_of_epoch
        return global_step % self.update_every == 0

    def apply_hypergradient(self, grad: float) -> None:
        grad = float(grad)
        if not math.isfinite(grad):
            # a NaN/inf hypergradient would poison alpha for the rest of training; keep alpha and record it
            self.last_hypergradient = grad
            return
        self._alpha = min(self.max_alpha, max(self.min_alpha, self._alpha - self.alpha_lr * grad))
        self.last_hypergradient = grad
        self.updates += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "last_hypergradient": self.last_hypergradient, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        last = state["last_hypergradient"]
        self.last_hypergradient = None if last is None else float(last)
        self.updates = int(state["updates"])


STRATEGIES: dict[str, type[AlphaStrategy]] = {
    "constant": ConstantStrategy,
    "stepwise": StepwiseStrategy,
    "heuristic": HeuristicStrategy,
    "lb": LearningBasedStrategy,
}


def build_strategy(name: str, **kwargs: object) -> AlphaStrategy:
    """The strategy registered as ``name`` in :data:`STRATEGIES`, built from its settings."""
    if name not in STRATEGIES:
        raise DmglError(f"unknown alpha strategy '{name}'; valid names: {', '.join(STRATEGIES)}")
    strategy_class = STRATEGIES[name]
    signature = inspect.signature(strategy_class)
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        valid = ", ".join(signature.parameters) or "none"
        raise DmglError(f"alpha strategy '{name}': {error}; its settings are: {valid}") from None
    return strategy_class(**kwargs)
