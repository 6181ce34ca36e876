"""A strategy with its one setting, as the CLI, sweeps and reports name it: ``constant:0.5``, ``stepwise:0.95``
(or ``h(0.95)``), ``heuristic``, ``linear:0.05`` (alpha falls by 0.05 per epoch), ``lb``, Ours-LB's controls
``lb:fixed-sign`` and ``lb:random-sign`` (the hypergradient's direction replaced) and its other estimators
``lb:forward``, ``lb:epoch``, ``lb:average`` (``strategy.lb.estimator``). No torch."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from dmgl_cli.errors import DmglError
from dmgl_cli.strategies.registry import STRATEGIES

_GROUP_ORDER = ("Constant", "Stepwise", "Dynamic", "Control")
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
# Ours-LB against the controls a reviewer asks for: a fixed decay, a fixed and a random direction.
CONTROLS = ("heuristic", "lb", "linear:0.05", "lb:fixed-sign", "lb:random-sign")
STRATEGY_SETS: dict[str, tuple[str, ...]] = {"table4": TABLE4, "controls": CONTROLS}
# Ours-LB's variants: the spec's word -> the settings it sets. The controls replace the hypergradient's direction;
# the estimators are what the hypergradient measures (strategy.lb.estimator; plain lb is the default, step).
LB_DEFAULTS = {"strategy.lb.direction": "hypergradient", "strategy.lb.estimator": "step"}
LB_VARIANTS: dict[str, dict[str, str]] = {
    "fixed-sign": {"strategy.lb.direction": "fixed"},
    "random-sign": {"strategy.lb.direction": "random"},
    "forward": {"strategy.lb.estimator": "forward"},
    "epoch": {"strategy.lb.estimator": "epoch"},
    "average": {"strategy.lb.estimator": "average"},
}
LB_CONTROLS = ("fixed-sign", "random-sign")
_VARIANT_LABELS = {
    "fixed-sign": "LB fixed sign",
    "random-sign": "LB random sign",
    "forward": "LB forward",
    "epoch": "LB epoch",
    "average": "LB average",
}


def _number(value: float) -> str:
    return f"{value:g}"


def setting_of(name: str) -> str | None:
    """The config setting that the value of a spec of strategy ``name`` sets (``constant:0.5`` ->
    ``strategy.alpha``), or None when its spec takes no value."""
    strategy = STRATEGIES.get(name)
    return strategy.spec_setting if strategy is not None else None


@dataclass(frozen=True)
class StrategySpec:
    """One integration strategy with its setting: ``constant:0.5``, ``stepwise:0.95``, ``heuristic``,
    ``linear:0.05``, ``lb``, ``lb:fixed-sign``."""

    name: str
    value: float | None = None
    variant: str | None = None  # lb only: a key of LB_VARIANTS

    @property
    def key(self) -> str:
        if self.variant is not None:
            return f"{self.name}:{self.variant}"
        return self.name if self.value is None else f"{self.name}:{_number(self.value)}"

    @property
    def label(self) -> str:
        """Stand-alone column label: ``const 0.5``, ``h(0.95)``, ``heuristic``, ``LB``, ``LB fixed sign``."""
        if self.name == "constant" and self.value is not None:
            return f"const {_number(self.value)}"
        return self.short

    @property
    def short(self) -> str:
        """Label under its group header (Constant / Stepwise / Dynamic / Control), as in Table 4."""
        if self.variant is not None:
            return _VARIANT_LABELS[self.variant]
        if self.value is None:
            return "LB" if self.name == "lb" else self.name
        if self.name == "constant":
            return _number(self.value)
        if self.name == "stepwise":
            return f"h({_number(self.value)})"
        if self.name == "linear":
            return f"linear({_number(self.value)})"
        return "LB" if self.name == "lb" else self.name

    @property
    def group(self) -> str:
        if self.variant in LB_CONTROLS:
            return "Control"
        return STRATEGIES[self.name].group if self.name in STRATEGIES else self.name

    def settings(self) -> dict[str, Any]:
        """Config settings (dotted keys) that select this strategy."""
        settings: dict[str, Any] = {"strategy.name": self.name}
        setting = setting_of(self.name)
        if self.value is not None and setting is not None:
            settings[setting] = self.value
        if self.variant is not None:  # plain lb leaves strategy.lb.* to the recipe and --set
            settings.update(LB_VARIANTS[self.variant])
        return settings

    def sort_key(self) -> tuple:
        """Table order: by group (Constant, Stepwise, Dynamic, Control), then as Table 4 orders its columns."""
        group = _GROUP_ORDER.index(self.group) if self.group in _GROUP_ORDER else len(_GROUP_ORDER)
        table4 = TABLE4.index(self.key) if self.key in TABLE4 else len(TABLE4)
        order = list(STRATEGIES)
        rank = order.index(self.name) if self.name in order else len(order)
        variant = list(LB_VARIANTS).index(self.variant) + 1 if self.variant else 0
        return (group, rank, table4, variant, self.value if self.value is not None else -1.0, self.name)


_STEPWISE_ALIAS = re.compile(r"^h\((?P<p>[^)]*)\)$")
_EXAMPLES = "constant:A, stepwise:P or h(P), linear:RATE, lb:fixed-sign, lb:random-sign, lb:forward"


def parse_strategy(text: str, *, value_required: bool = True) -> StrategySpec:
    """``constant:0.5`` / ``stepwise:0.95`` (or ``h(0.95)``) / ``heuristic`` / ``linear:0.05`` / ``lb`` /
    ``lb:fixed-sign`` / ``lb:random-sign``, in any case. Without ``value_required`` (``dmgl train --strategy
    constant``), constant, stepwise and linear may come without their value: the recipe's then stays."""
    raw = text.strip()
    alias = _STEPWISE_ALIAS.match(raw)
    name, _, value = ("stepwise", ":", alias["p"]) if alias else raw.partition(":")
    name, value = name.strip().lower(), value.strip()
    if name not in STRATEGIES:
        raise DmglError(
            f"unknown strategy {raw!r}; valid: {', '.join(STRATEGIES)} (with a value: {_EXAMPLES}; in "
            f"--strategies also the sets {', '.join(STRATEGY_SETS)})"
        )
    if setting_of(name) is not None:
        what = STRATEGIES[name].spec_value
        if not value:
            if not value_required:
                return StrategySpec(name)
            raise DmglError(f"strategy {raw!r} needs its {what}, e.g. {name}:{'0.05' if name == 'linear' else '0.5'}")
        try:
            number = float(value)
        except ValueError:
            raise DmglError(f"strategy {raw!r}: {what} must be a number in [0, 1], got {value!r}") from None
        if not (math.isfinite(number) and 0.0 <= number <= 1.0):
            raise DmglError(f"strategy {raw!r}: {what} must be in [0, 1], got {value}")
        return StrategySpec(name, number)
    if name == "lb" and value:
        if value.lower() not in LB_VARIANTS:
            raise DmglError(f"strategy {raw!r}: lb's variants are {', '.join(f'lb:{v}' for v in LB_VARIANTS)}")
        return StrategySpec(name, variant=value.lower())
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
    """A named set (``table4``, ``controls``) or a comma-separated list of specs; duplicates are an error."""
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
    if name not in STRATEGIES:
        return None
    if name == "lb":  # a setting a run did not record (it predates it) had its default value
        recorded = {key: params.get(key, default) for key, default in LB_DEFAULTS.items()}
        variant = next(
            (word for word, settings in LB_VARIANTS.items() if all(recorded[k] == v for k, v in settings.items())),
            None,
        )
        return StrategySpec(name, variant=variant)
    setting = setting_of(name)
    if setting is None:
        return StrategySpec(name)
    try:
        return StrategySpec(name, float(params[setting]))
    except (KeyError, ValueError):
        return None
