"""The learning-based strategy (Ours-LB, Algorithm 1): alpha descends a hypergradient of the outer classification
loss. This module holds what needs no torch: its settings' checks, when it updates, and the step alpha takes
(plain SGD or Adam on the scalar, clipped). What the hypergradient is and how it is computed inside the training
loop is its outer step, :mod:`dmgl_cli.strategies.outer_step` (the training layer builds it; nothing here imports it).
"""

from __future__ import annotations

import math
import random
from typing import Any

from dmgl_cli.errors import DmglError
from dmgl_cli.strategies.schedules import AlphaStrategy, check_epoch, real, unit_interval
from dmgl_cli.strategies.settings import LearningBasedConfig, StrategyConfig

_ADAM_BETAS, _ADAM_EPSILON = (0.9, 0.999), 1e-12


def _positive_int(value: object, setting: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DmglError(f"{setting} must be an integer >= 1, got {value!r}")
    return value


def _choice(value: object, valid: tuple[str, ...], setting: str) -> None:
    if value not in valid:
        raise DmglError(f"{setting} must be one of {', '.join(valid)}, got {value!r}")


def _literal_choices(field_name: str) -> tuple[str, ...]:
    import typing

    hint = typing.get_type_hints(LearningBasedConfig)[field_name]
    return tuple(a for a in typing.get_args(hint) if isinstance(a, str))


def check_settings(s: LearningBasedConfig) -> None:
    """Refuse settings that cannot run, naming the setting (``strategy.lb.*``) and its valid values."""
    p = "strategy.lb."
    low, high = unit_interval(s.min_alpha, p + "min_alpha"), unit_interval(s.max_alpha, p + "max_alpha")
    if low > high:
        raise DmglError(f"{p}min_alpha ({s.min_alpha}) must not exceed {p}max_alpha ({s.max_alpha})")
    initial = real(s.initial_alpha, p + "initial_alpha")
    if not low <= initial <= high:
        raise DmglError(
            f"{p}initial_alpha must be in [{low}, {high}] ({p}min_alpha, {p}max_alpha), got {s.initial_alpha}"
        )
    for name in ("alpha_lr", "cg_tolerance", "max_residual"):
        if real(getattr(s, name), p + name) <= 0:
            raise DmglError(f"{p}{name} must be > 0, got {getattr(s, name)}")
    for name in ("damping", "relative_damping"):
        if real(getattr(s, name), p + name) < 0:
            raise DmglError(f"{p}{name} must be >= 0, got {getattr(s, name)}")
    for name in (
        "alpha_optimizer",
        "estimator",
        "horizon",
        "approx",
        "direction",
        "outer_data",
        "outer_sampling",
        "params",
    ):
        _choice(getattr(s, name), _literal_choices(name), p + name)
    if s.update_every not in ("epoch", "epoch_start"):
        if isinstance(s.update_every, bool) or not isinstance(s.update_every, int) or s.update_every < 1:
            raise DmglError(
                f'{p}update_every must be an integer >= 1, "epoch" or "epoch_start", got {s.update_every!r}'
            )
    if (s.approx == "official") != (s.update_every == "epoch_start"):
        raise DmglError(
            f"{p}approx=official (the authors' rule, from the outer batch alone) goes with {p}update_every="
            "epoch_start and only with it; the other approximations need the inner batch of a training step "
            f"(got approx={s.approx}, update_every={s.update_every})"
        )
    if s.estimator != "step" and s.update_every != "epoch" and s.approx != "official":
        raise DmglError(
            f"{p}estimator={s.estimator} measures alpha's effect over a whole epoch, so alpha moves once per epoch: "
            f"set {p}update_every=epoch, or {p}estimator=step to update every {s.update_every} steps"
        )
    if s.estimator != "step" and s.approx not in ("identity", "official"):
        raise DmglError(
            f"{p}approx={s.approx} is the step estimator's inverse Hessian, which {p}estimator={s.estimator} does not "
            f"use (set {p}estimator=step to use {s.approx})"
        )
    _positive_int(s.mixed_every, p + "mixed_every")
    if s.approx in ("neumann", "cg", "ggn"):
        _positive_int(s.terms, p + "terms")
    if s.scale != "auto" and real(s.scale, p + "scale") <= 0:
        raise DmglError(f'{p}scale must be > 0 or "auto", got {s.scale}')
    if s.alpha_lr_halving is not None:
        _positive_int(s.alpha_lr_halving, p + "alpha_lr_halving")
    _positive_int(s.curvature_refresh, p + "curvature_refresh")
    if s.outer_batch_size is not None:
        _positive_int(s.outer_batch_size, p + "outer_batch_size")


class LearningBasedStrategy(AlphaStrategy):
    """Alpha learnt from the bilevel hypergradient (Algorithm 1).

    Its outer step (:func:`dmgl_cli.strategies.estimators.outer_step_for`, built by the training loop) computes ``g = d L_CLS / d alpha`` as ``settings.estimator`` says and calls
    :meth:`apply_hypergradient`; alpha then takes one step of ``alpha_optimizer`` and is clipped to
    ``[min_alpha, max_alpha]``:

    * ``sgd``: ``alpha - lr * g``, Algorithm 1's plain gradient descent; the step is proportional to ``g``, whose
      size depends on the estimator by orders of magnitude, so ``alpha_lr`` must be tuned to it.
    * ``adam``: Adam on the scalar alpha (betas 0.9/0.999, bias-corrected): its step is about ``lr`` in the
      direction of the recent hypergradients' sign, whatever their magnitude.

    ``direction`` replaces the hypergradient by a fixed (+1) or a seeded random sign: the controls a reviewer asks
    for. ``alpha_lr_halving`` (epochs) halves the step size every that many epochs, as the authors' code does (20).
    State dicts hold plain Python values only (``torch.load(weights_only=True)``); the outer step keeps its own.
    """

    learns_alpha = True

    name = "lb"
    setting_keys = ("strategy.lb.",)

    @classmethod
    def from_settings(cls, settings: StrategyConfig, seed: int) -> AlphaStrategy:
        return cls(settings.lb, seed)

    def __init__(self, settings: LearningBasedConfig, seed: int = 0) -> None:
        check_settings(settings)
        self.settings = settings
        self.seed = seed  # the random-sign control's seed
        super().__init__(float(settings.initial_alpha))
        self.current_lr = float(settings.alpha_lr)
        self.last_hypergradient: float | None = None
        self.updates = 0
        self.skipped = 0  # non-finite hypergradients, not applied
        self.first_moment = 0.0  # Adam's moments on the scalar alpha
        self.second_moment = 0.0
        # neumann with scale auto and ggn: the cached lambda_max and the update at which it was estimated
        self.largest_eigenvalue: float | None = None
        self.eigenvalue_update: int | None = None

    @property
    def scale(self) -> float | None:
        return None if self.settings.scale == "auto" else float(self.settings.scale)

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        check_epoch(epoch, total_epochs)
        if self.settings.alpha_lr_halving is not None:
            self.current_lr = self.settings.alpha_lr * 0.5 ** (epoch // self.settings.alpha_lr_halving)

    @property
    def updates_at_epoch_start(self) -> bool:
        return self.settings.update_every == "epoch_start"

    def needs_hypergradient(self, global_step: int, end_of_epoch: bool) -> bool:
        """Whether alpha updates after optimiser step ``global_step`` (counted from 1)."""
        every = self.settings.update_every
        if every == "epoch_start":
            return False  # the outer step updates before the epoch instead
        if every == "epoch":
            return end_of_epoch
        assert isinstance(every, int)
        return global_step % every == 0

    def cached_largest_eigenvalue(self) -> float | None:
        """The cached lambda_max while it is fresh (fewer than ``curvature_refresh`` updates old), else None."""
        if self.eigenvalue_update is None or self.updates - self.eigenvalue_update >= self.settings.curvature_refresh:
            return None
        return self.largest_eigenvalue

    def remember_largest_eigenvalue(self, value: float | None) -> None:
        if value is not None and value != self.largest_eigenvalue:
            self.largest_eigenvalue, self.eigenvalue_update = float(value), self.updates

    def direction_of(self, grad: float) -> float:
        """What alpha descends: the hypergradient itself, or the control's fixed / random sign in its place."""
        if self.settings.direction == "fixed":
            return 1.0
        if self.settings.direction == "random":
            return random.Random(self.seed * 1_000_003 + self.updates).choice((-1.0, 1.0))
        return grad

    def apply_hypergradient(self, grad: float) -> None:
        grad = float(grad)
        self.last_hypergradient = grad
        if not math.isfinite(grad):
            # a NaN/inf hypergradient would poison alpha for the rest of training; keep alpha and count it
            self.skipped += 1
            return
        grad = self.direction_of(grad)
        self.updates += 1
        if self.settings.alpha_optimizer == "adam":
            beta1, beta2 = _ADAM_BETAS
            self.first_moment = beta1 * self.first_moment + (1 - beta1) * grad
            self.second_moment = beta2 * self.second_moment + (1 - beta2) * grad * grad
            corrected_first = self.first_moment / (1 - beta1**self.updates)
            corrected_second = self.second_moment / (1 - beta2**self.updates)
            step = self.current_lr * corrected_first / (math.sqrt(corrected_second) + _ADAM_EPSILON)
        else:
            step = self.current_lr * grad
        self._alpha = min(self.settings.max_alpha, max(self.settings.min_alpha, self._alpha - step))

    def state_dict(self) -> dict[str, Any]:
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        last = state["last_hypergradient"]
        self.last_hypergradient = None if last is None else float(last)
        self.updates = int(state["updates"])
        # checkpoints of dmgl 0.1 lack the entries below; their runs used plain SGD on alpha and no cached lambda
        self.skipped = int(state.get("skipped", 0))
        self.current_lr = float(state.get("current_lr", self.settings.alpha_lr))
        self.first_moment = float(state.get("first_moment", 0.0))
        self.second_moment = float(state.get("second_moment", 0.0))
        eigenvalue, at = state.get("largest_eigenvalue"), state.get("eigenvalue_update")
        self.largest_eigenvalue = None if eigenvalue is None else float(eigenvalue)
        self.eigenvalue_update = None if at is None else int(at)
