"""How alpha, the weight of the matching loss in Eq. 1, moves during training.

* ``constant``: a fixed alpha (0 = plain Concat, 1 = matching only).
* ``stepwise``: h(p) of §4.4, alpha = p in the first half of the epochs and 1 - p in the second.
* ``heuristic``: alpha_t = 1 - exp(-1/t), t the 1-based epoch (§3.3).
* ``lb``: learning-based, alpha descends the bilevel hypergradient (Algorithm 1), computed as Eq. 3 with the
  inverse-Hessian approximation ``approx`` (``identity``: the first-order one-step look-ahead; ``cg`` / ``neumann``:
  curvature-corrected), or with the authors' released rule (``official``).

A strategy is named on the command line, in sweeps and in reports by a :class:`StrategySpec` (``constant:0.5``,
``stepwise:0.95``, ``heuristic``, ``lb``), and built from the resolved config by :func:`strategy_from_config`.

The trainer calls :meth:`AlphaStrategy.start_epoch` before each epoch and, after every optimiser step,
:meth:`AlphaStrategy.needs_hypergradient`; when that says yes it computes
:func:`dmgl_cli.hypergradient.implicit_hypergradient` and hands its value to
:meth:`AlphaStrategy.apply_hypergradient`.
State dicts hold plain Python values only, so that checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dmgl_cli.errors import DmglError

if TYPE_CHECKING:
    from dmgl_cli.config import LearningBasedConfig, StrategyConfig

# The inverse-Hessian approximations that dmgl_cli.hypergradient implements (named here, where they are chosen:
# building a strategy needs no torch).
APPROXIMATIONS = ("identity", "neumann", "cg")


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
OUTER_DATA = ("holdout", "val", "train")
OUTER_SAMPLING = ("random", "fixed")
HYPER_PARAMETERS = ("all", "head", "first")
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
        outer_data: str = "holdout",
        holdout: int | float = 0.05,
        outer_batch_size: int | None = None,
        outer_sampling: str = "random",
        params: str = "all",
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
                "strategy.lb.update_every=epoch_start and only with it; the other approximations need the inner batch "
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
            raise DmglError(
                f"strategy.lb.alpha_lr_halving must be an integer >= 1 (epochs) or null, got {alpha_lr_halving!r}"
            )
        self.alpha_lr_halving = alpha_lr_halving
        if isinstance(curvature_refresh, bool) or not isinstance(curvature_refresh, int) or curvature_refresh < 1:
            raise DmglError(f"strategy.lb.curvature_refresh must be an integer >= 1, got {curvature_refresh!r}")
        self.curvature_refresh = curvature_refresh
        # Where the outer batches come from, how many, and which parameters enter H (read by the trainer).
        if outer_data not in OUTER_DATA:
            raise DmglError(f"strategy.lb.outer_data must be one of {', '.join(OUTER_DATA)}, got {outer_data!r}")
        self.outer_data = outer_data
        self.holdout = holdout
        if outer_batch_size is not None and (
            isinstance(outer_batch_size, bool) or not isinstance(outer_batch_size, int) or outer_batch_size < 1
        ):
            raise DmglError(f"strategy.lb.outer_batch_size must be an integer >= 1 or null, got {outer_batch_size!r}")
        self.outer_batch_size = outer_batch_size
        if outer_sampling not in OUTER_SAMPLING:
            raise DmglError(
                f"strategy.lb.outer_sampling must be one of {', '.join(OUTER_SAMPLING)}, got {outer_sampling!r}"
            )
        self.outer_sampling = outer_sampling
        if params not in HYPER_PARAMETERS:
            raise DmglError(f"strategy.lb.params must be one of {', '.join(HYPER_PARAMETERS)}, got {params!r}")
        self.params = params
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

    @classmethod
    def from_config(cls, settings: LearningBasedConfig) -> LearningBasedStrategy:
        """The strategy of a resolved config's ``strategy.lb`` section; ``scale: auto`` becomes ``None``."""
        fields = dataclasses.asdict(settings)
        fields["scale"] = None if settings.scale == "auto" else settings.scale
        return cls(**fields)

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
        if isinstance(self.update_every, str):  # "epoch"
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


def strategy_from_config(settings: StrategyConfig) -> AlphaStrategy:
    """The strategy a resolved config's ``strategy`` section names, with its settings."""
    if settings.name == "constant":
        return ConstantStrategy(settings.alpha)
    if settings.name == "stepwise":
        return StepwiseStrategy(settings.p)
    if settings.name == "heuristic":
        return HeuristicStrategy()
    if settings.name == "lb":
        return LearningBasedStrategy.from_config(settings.lb)
    raise DmglError(f"unknown strategy {settings.name!r}; valid: {', '.join(STRATEGIES)}")


def build_strategy(name: str, **kwargs: Any) -> AlphaStrategy:
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


# ------------------------------------------------------------------------------------------ strategy specs
# A strategy with its one setting, as the CLI, sweeps and reports name it; the schedules' classes are above.


STRATEGY_ORDER = ("constant", "stepwise", "heuristic", "lb")
STRATEGY_GROUPS = {"constant": "Constant", "stepwise": "Stepwise", "heuristic": "Dynamic", "lb": "Dynamic"}
# The columns of the paper's Table 4 / A3, in the paper's order.
TABLE4 = (
    "constant:0",
    "constant:0.5",
    "constant:1",
    "stepwise:0",
    "stepwise:1",
    "stepwise:0.05",
    "stepwise:0.95",
    "heuristic",
    "lb",
)
STRATEGY_SETS: dict[str, tuple[str, ...]] = {"table4": TABLE4}
# The config setting that a spec's value sets: constant's alpha, stepwise's p.
SETTING_OF = {"constant": "strategy.alpha", "stepwise": "strategy.p"}


def _number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class StrategySpec:
    """One integration strategy with its setting: ``constant:0.5``, ``stepwise:0.95``, ``heuristic``, ``lb``."""

    name: str
    value: float | None = None

    @property
    def key(self) -> str:
        return self.name if self.value is None else f"{self.name}:{_number(self.value)}"

    @property
    def label(self) -> str:
        """Stand-alone column label: ``const 0.5``, ``h(0.95)``, ``heuristic``, ``LB``."""
        if self.name == "constant" and self.value is not None:
            return f"const {_number(self.value)}"
        return self.short

    @property
    def short(self) -> str:
        """Label under its group header (Constant / Stepwise / Dynamic), as in Table 4."""
        if self.value is None:
            return "LB" if self.name == "lb" else self.name
        if self.name == "constant":
            return _number(self.value)
        if self.name == "stepwise":
            return f"h({_number(self.value)})"
        return "LB" if self.name == "lb" else self.name

    @property
    def group(self) -> str:
        return STRATEGY_GROUPS.get(self.name, self.name)

    def settings(self) -> dict[str, Any]:
        """Config settings (dotted keys) that select this strategy."""
        settings: dict[str, Any] = {"strategy.name": self.name}
        if self.value is not None and self.name in SETTING_OF:
            settings[SETTING_OF[self.name]] = self.value
        return settings

    def sort_key(self) -> tuple:
        table4 = TABLE4.index(self.key) if self.key in TABLE4 else len(TABLE4)
        rank = STRATEGY_ORDER.index(self.name) if self.name in STRATEGY_ORDER else len(STRATEGY_ORDER)
        return (rank, table4, self.value if self.value is not None else -1.0, self.name)


_STEPWISE_ALIAS = re.compile(r"^h\((?P<p>[^)]*)\)$")


def parse_strategy(text: str, *, value_required: bool = True) -> StrategySpec:
    """``constant:0.5`` / ``stepwise:0.95`` (or ``h(0.95)``) / ``heuristic`` / ``lb``, in any case. Without
    ``value_required`` (``dmgl train --strategy constant``), constant and stepwise may come without their value:
    the recipe's then stays."""
    raw = text.strip()
    alias = _STEPWISE_ALIAS.match(raw)
    name, _, value = ("stepwise", ":", alias["p"]) if alias else raw.partition(":")
    name = name.strip().lower()
    if name not in STRATEGY_ORDER:
        raise DmglError(
            f"unknown strategy {raw!r}; valid: {', '.join(STRATEGY_ORDER)} (with a value: constant:A, "
            f"stepwise:P or h(P); in --strategies also the set {', '.join(STRATEGY_SETS)})"
        )
    if name in ("constant", "stepwise"):
        what = "alpha" if name == "constant" else "p"
        if not value.strip():
            if not value_required:
                return StrategySpec(name)
            raise DmglError(f"strategy {raw!r} needs its {what}, e.g. {name}:0.5")
        try:
            number = float(value)
        except ValueError:
            raise DmglError(f"strategy {raw!r}: {what} must be a number in [0, 1], got {value!r}") from None
        if not (math.isfinite(number) and 0.0 <= number <= 1.0):
            raise DmglError(f"strategy {raw!r}: {what} must be in [0, 1], got {value}")
        return StrategySpec(name, number)
    if value:
        raise DmglError(f"strategy {raw!r}: {name} takes no value (write just {name!r})")
    return StrategySpec(name)


def spec_from_flags(strategy: str | None, alpha: float | None = None, p: float | None = None) -> StrategySpec | None:
    """``dmgl train``'s ``--strategy`` (a name or ``constant:0.5``), ``--alpha`` and ``--p`` as one spec; None when
    none is given (the recipe's strategy stays). ``--alpha`` alone means constant, ``--p`` alone stepwise."""
    spec = parse_strategy(strategy, value_required=False) if strategy is not None else None
    for flag, value, name in (("--alpha", alpha, "constant"), ("--p", p, "stepwise")):
        if value is None:
            continue
        if spec is not None and spec.name != name:
            hint = " (for lb, set strategy.lb.initial_alpha)" if spec.name == "lb" and flag == "--alpha" else ""
            raise DmglError(f"{flag} applies to --strategy {name}, not {spec.name}{hint}")
        if spec is not None and spec.value is not None and spec.value != value:
            raise DmglError(f"--strategy {strategy} and {flag} {value} give two values; give one")
        spec = parse_strategy(f"{name}:{value!r}")
    return spec


def parse_strategies(text: str) -> list[StrategySpec]:
    """A named set (``table4``) or a comma-separated list of specs; duplicates are an error."""
    specs: list[StrategySpec] = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower() in STRATEGY_SETS:
            specs.extend(parse_strategy(k) for k in STRATEGY_SETS[part.lower()])
        elif part:
            specs.append(parse_strategy(part))
    if not specs:
        raise DmglError(f"--strategies {text!r} names no strategy; e.g. table4 or constant:0.5,stepwise:0.95,lb")
    keys = [s.key for s in specs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise DmglError(f"--strategies lists {', '.join(repeated)} more than once")
    return specs


def spec_from_params(params: dict[str, str], tags: dict[str, str] | None = None) -> StrategySpec | None:
    """The strategy spec a run was trained with, from its logged (flattened) config; None if unrecognisable."""
    name = params.get("strategy.name") or (tags or {}).get("dmgl.strategy")
    if name not in STRATEGY_ORDER:
        return None
    setting = SETTING_OF.get(name)
    if setting is None:
        return StrategySpec(name)
    try:
        return StrategySpec(name, float(params[setting]))
    except (KeyError, ValueError):
        return None
