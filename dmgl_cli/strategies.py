"""How alpha, the weight of the matching loss in Eq. 1, moves during training.

* ``constant``: a fixed alpha (0 = plain Concat, 1 = matching only).
* ``stepwise``: h(p) of §4.4, alpha = p in the first half of the epochs and 1 - p in the second.
* ``heuristic``: alpha_t = 1 - exp(-1/t), t the 1-based epoch (§3.3).
* ``lb``: learning-based, alpha descends the bilevel hypergradient (Algorithm 1), computed as Eq. 3 with the
  inverse-Hessian approximation ``approx`` (``identity``: the first-order one-step look-ahead; ``cg`` / ``neumann``:
  curvature-corrected), or with the authors' released rule (``official``).

The trainer calls :meth:`AlphaStrategy.start_epoch` before each epoch and, after every optimiser step,
:meth:`AlphaStrategy.needs_hypergradient`; when that says yes it computes
:func:`dmgl_cli.hypergradient.implicit_hypergradient` and hands its value to
:meth:`AlphaStrategy.apply_hypergradient`.
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


ALPHA_GRADIENTS = (*APPROXIMATIONS, "official")
ALPHA_OPTIMIZERS = ("sgd", "adam")
_ADAM_BETAS, _ADAM_EPSILON = (0.9, 0.999), 1e-12


class LearningBasedStrategy(AlphaStrategy):
    """Alpha learnt from the bilevel hypergradient (Algorithm 1).

    When :meth:`needs_hypergradient` says so (every ``update_every`` optimiser steps, at the end of each epoch with
    ``"epoch"``, or before each epoch with ``"epoch_start"``) the trainer computes ``g = d L_CLS / d alpha`` with
    ``approx`` (see :mod:`dmgl_cli.hypergradient`; ``official`` is the authors' released rule, used by
    ``dmgl-official``) and alpha takes one step of ``alpha_optimizer``, then is clipped to ``[min_alpha, max_alpha]``:

    * ``sgd``: ``alpha - lr * g``, Algorithm 1's plain gradient descent. The step is proportional to ``g``, whose
      size depends on ``approx`` and ``scale`` by orders of magnitude, so ``alpha_lr`` must be tuned to them.
    * ``adam``: Adam on the scalar alpha (betas 0.9/0.999, bias-corrected). Its step is ``lr * m / sqrt(v)``, about
      ``lr`` in the direction of the recent hypergradients' sign, whatever their magnitude: switching ``approx``
      needs no retuning of ``alpha_lr``, and its first moment averages the last ~10 hypergradients, so one noisy
      batch does not set alpha.

    ``alpha_lr_halving`` (epochs) halves the step size every that many epochs, as the authors' code does (20).
    Algorithm 1 clips to [0, 1]; the bounds are settings because the authors' code clips to [0.05, 0.95]. ``scale``
    is ``identity``'s step and ``neumann``'s series step; ``None`` means: the optimiser's learning rate for
    ``identity`` (the one-step look-ahead), ``1 / lambda_max(H)`` for ``neumann`` (estimated by power iteration and
    cached for ``curvature_refresh`` updates). ``terms`` counts Neumann terms or CG iterations; ``damping`` is added
    to ``H`` by ``neumann`` and ``cg``, on top of the optimiser's weight decay.
    """

    name = "lb"

    def __init__(
        self,
        initial_alpha: float,
        alpha_lr: float,
        update_every: int | str,
        approx: str,
        terms: int,
        scale: float | None,
        damping: float,
        min_alpha: float = 0.0,
        max_alpha: float = 1.0,
        alpha_optimizer: str = "sgd",
        alpha_lr_halving: int | None = None,
        curvature_refresh: int = 10,
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
        if update_every not in ("epoch", "epoch_start") and (
            isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1
        ):
            raise DmglError(
                f'strategy.lb.update_every must be an integer >= 1, "epoch" or "epoch_start", got {update_every!r}'
            )
        self.update_every = update_every
        if approx not in ALPHA_GRADIENTS:
            raise DmglError(f"strategy.lb.approx must be one of {', '.join(ALPHA_GRADIENTS)}, got {approx!r}")
        if (approx == "official") != (update_every == "epoch_start"):
            raise DmglError(
                "strategy.lb.approx=official (the authors' rule, from the outer batch alone) goes with "
                'strategy.lb.update_every=epoch_start and only with it; the other approximations need the inner batch '
                f"of a training step (got approx={approx}, update_every={update_every})"
            )
        self.approx = approx
        if approx in ("neumann", "cg") and (isinstance(terms, bool) or not isinstance(terms, int) or terms < 1):
            raise DmglError(f"strategy.lb.terms must be an integer >= 1 for approx '{approx}', got {terms!r}")
        self.terms = terms
        if scale is None:
            self.scale = None
        else:
            self.scale = _real(scale, "strategy.lb.scale")
            if self.scale <= 0:
                raise DmglError(f'strategy.lb.scale must be > 0 or "auto", got {scale}')
        self.damping = _real(damping, "strategy.lb.damping")
        if self.damping < 0:
            raise DmglError(f"strategy.lb.damping must be >= 0, got {damping}")
        if alpha_optimizer not in ALPHA_OPTIMIZERS:
            raise DmglError(
                f"strategy.lb.alpha_optimizer must be one of {', '.join(ALPHA_OPTIMIZERS)}, got {alpha_optimizer!r}"
            )
        self.alpha_optimizer = alpha_optimizer
        if alpha_lr_halving is not None and (
            isinstance(alpha_lr_halving, bool) or not isinstance(alpha_lr_halving, int) or alpha_lr_halving < 1
        ):
            raise DmglError(f"strategy.lb.alpha_lr_halving must be an integer >= 1 (epochs) or null, "
                            f"got {alpha_lr_halving!r}")
        self.alpha_lr_halving = alpha_lr_halving
        if isinstance(curvature_refresh, bool) or not isinstance(curvature_refresh, int) or curvature_refresh < 1:
            raise DmglError(f"strategy.lb.curvature_refresh must be an integer >= 1, got {curvature_refresh!r}")
        self.curvature_refresh = curvature_refresh
        super().__init__(initial)
        self.current_lr = self.alpha_lr
        self.last_hypergradient: float | None = None
        self.updates = 0
        self.skipped = 0  # non-finite hypergradients, not applied
        # Adam's moments on the scalar alpha
        self.first_moment = 0.0
        self.second_moment = 0.0
        # neumann with scale None: the cached lambda_max and the update at which it was estimated
        self.largest_eigenvalue: float | None = None
        self.eigenvalue_update: int | None = None

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        _check_epoch(epoch, total_epochs)
        if self.alpha_lr_halving is not None:
            self.current_lr = self.alpha_lr * 0.5 ** (epoch // self.alpha_lr_halving)

    @property
    def updates_at_epoch_start(self) -> bool:
        return self.update_every == "epoch_start"

    def needs_hypergradient(self, global_step: int, end_of_epoch: bool) -> bool:
        if self.update_every == "epoch_start":
            return False  # the trainer asks before the epoch instead (updates_at_epoch_start)
        if self.update_every == "epoch":
            return end_of_epoch
        return global_step % self.update_every == 0

    def cached_largest_eigenvalue(self) -> float | None:
        """The cached lambda_max while it is fresh (fewer than ``curvature_refresh`` updates old), else None."""
        if self.eigenvalue_update is None or self.updates - self.eigenvalue_update >= self.curvature_refresh:
            return None
        return self.largest_eigenvalue

    def remember_largest_eigenvalue(self, value: float | None) -> None:
        if value is not None and value != self.largest_eigenvalue:
            self.largest_eigenvalue, self.eigenvalue_update = float(value), self.updates

    def apply_hypergradient(self, grad: float) -> None:
        grad = float(grad)
        self.last_hypergradient = grad
        if not math.isfinite(grad):
            # a NaN/inf hypergradient would poison alpha for the rest of training; keep alpha and count it
            self.skipped += 1
            return
        self.updates += 1
        if self.alpha_optimizer == "adam":
            beta1, beta2 = _ADAM_BETAS
            self.first_moment = beta1 * self.first_moment + (1 - beta1) * grad
            self.second_moment = beta2 * self.second_moment + (1 - beta2) * grad * grad
            corrected_first = self.first_moment / (1 - beta1**self.updates)
            corrected_second = self.second_moment / (1 - beta2**self.updates)
            step = self.current_lr * corrected_first / (math.sqrt(corrected_second) + _ADAM_EPSILON)
        else:
            step = self.current_lr * grad
        self._alpha = min(self.max_alpha, max(self.min_alpha, self._alpha - step))

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "last_hypergradient": self.last_hypergradient,
            "updates": self.updates,
            "skipped": self.skipped,
            "current_lr": self.current_lr,
            "first_moment": self.first_moment,
            "second_moment": self.second_moment,
            "largest_eigenvalue": self.largest_eigenvalue,
            "eigenvalue_update": self.eigenvalue_update,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        last = state["last_hypergradient"]
        self.last_hypergradient = None if last is None else float(last)
        self.updates = int(state["updates"])
        # checkpoints of dmgl 0.1 lack the entries below; their runs used plain SGD on alpha and no cached lambda
        self.skipped = int(state.get("skipped", 0))
        self.current_lr = float(state.get("current_lr", self.alpha_lr))
        self.first_moment = float(state.get("first_moment", 0.0))
        self.second_moment = float(state.get("second_moment", 0.0))
        eigenvalue, at = state.get("largest_eigenvalue"), state.get("eigenvalue_update")
        self.largest_eigenvalue = None if eigenvalue is None else float(eigenvalue)
        self.eigenvalue_update = None if at is None else int(at)


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
