"""The hyperparameters a sweep can tune within each strategy (``dmgl sweep --tune``), and their parsing.

Kept apart from :mod:`dmgl_cli.sweep.study` (which loads Optuna, torch and MLflow) so that the CLI refuses a bad
``--tune`` before any of them is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dmgl_cli.errors import DmglError
from dmgl_cli.strategies import StrategySpec


@dataclass(frozen=True)
class Tunable:
    key: str  # config setting
    low: float
    high: float
    log: bool
    strategies: tuple[str, ...] | None = None  # strategy names it applies to; None: all
    help: str = ""

    def applies(self, spec: StrategySpec) -> bool:
        if self.strategies is not None and spec.name not in self.strategies:
            return False
        # alpha = 0 has no matching loss, so its settings change nothing there
        return not (self.key.startswith("loss.") and spec.name == "constant" and spec.value == 0.0)


TUNABLE: dict[str, Tunable] = {
    "lr": Tunable("optim.lr", 1e-4, 1e-1, True, help="learning rate"),
    "weight_decay": Tunable("optim.weight_decay", 1e-6, 1e-2, True, help="weight decay"),
    "dropout": Tunable("model.dropout", 0.0, 0.5, False, help="dropout before the head"),
    "tau": Tunable("loss.tau", 0.02, 1.0, True, help="temperature of the matching loss"),
    "alpha_lr": Tunable(
        "strategy.lb.alpha_lr",
        0.005,
        0.5,
        True,
        ("lb",),
        "step size of alpha (lb; with adam, about how far one update moves alpha)",
    ),
    "initial_alpha": Tunable("strategy.lb.initial_alpha", 0.0, 1.0, False, ("lb",), "alpha at the start (lb)"),
    "lb_scale": Tunable(
        "strategy.lb.scale", 1e-3, 1e-1, True, ("lb",), "identity's look-ahead step or Neumann's series step (lb)"
    ),
}


def parse_tune(text: str | None) -> dict[str, list]:
    """``lr,tau`` or ``lr=1e-3:1e-1,alpha_lr`` -> {name: [low, high, log]}."""
    if not text:
        return {}
    tune: dict[str, list] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, bounds = part.partition("=")
        name = name.strip()
        if name not in TUNABLE:
            raise DmglError(
                f"--tune: unknown hyperparameter {name!r}; tunable: "
                + ", ".join(f"{n} ({t.key})" for n, t in TUNABLE.items())
            )
        tunable = TUNABLE[name]
        low, high = tunable.low, tunable.high
        if bounds:
            try:
                low_text, high_text = bounds.split(":")
                low, high = float(low_text), float(high_text)
            except ValueError:
                raise DmglError(f"--tune {part!r}: a range looks like {name}=LOW:HIGH, e.g. lr=0.001:0.1") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise DmglError(f"--tune {part!r}: LOW must be below HIGH, got {low}:{high}")
        if tunable.log and low <= 0:
            raise DmglError(f"--tune {part!r}: {name} is searched on a log scale, so LOW must be > 0")
        if name in tune:
            raise DmglError(f"--tune lists {name} more than once")
        tune[name] = [low, high, tunable.log]
    return tune
