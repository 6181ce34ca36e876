"""``dmgl-official``: the paper's learning-based method as its authors' published code runs it, for comparison.

The code released with the paper (linked from its checklist) differs from the paper's description. Side by side:

===============================  ========================================  ==========================================
                                 paper (``concat`` + ``--strategy lb``)    official code (``dmgl-official``)
===============================  ========================================  ==========================================
matching loss L_MM               symmetric InfoNCE of the embeddings       Jensen–Shannon divergence between the
                                 (§3.2)                                    modalities' softmax outputs (``js``)
when alpha moves                 every ``update_every`` steps              once per epoch (``update_every: epoch``)
H^-1 v                           configurable approximation                one Hessian-vector product: ``neumann``
                                                                           with ``terms: 1``
parameters in H and gradients    all (or the head)                         the first parameter tensor only
                                                                           (``params: first``)
outer data (v)                   validation batches                        8 samples held out from the training
                                                                           split (``outer_data: holdout``,
                                                                           ``outer_batch_size: 8``), never trained on
starting weights                 ``initial_alpha`` (recipe)                CE weight 0.05, i.e. alpha = 0.95
alpha range                      [0, 1] (Algorithm 1)                      [0.05, 0.95]
===============================  ========================================  ==========================================

Mapping of "one Hessian-vector product": the truncated Neumann series with one term,
``H^-1 v ~ scale * (v + (I - scale H) v)``, is the approximation of the implicit gradient that costs exactly one
HVP; it keeps the recipe's ``scale`` and ``alpha_lr``. ``params: first`` puts only the model's first trainable
tensor (the first encoder's first weight) into H, v and g_MM - g_CLS, as the official code differentiates its
first parameter only.

How the settings are applied: this method *is* that configuration, so :meth:`configure` writes the values above
into the run's config before it is validated and recorded — the run's parameters and ``config.yaml`` show what ran,
and a warning names every setting it changed. It runs with ``--strategy lb`` only, and with the Concat model (the
official code's fusion).
"""

from __future__ import annotations

import logging
from typing import Any

from dmgl_cli.errors import DmglError
from dmgl_cli.methods.base import Method

LOG = logging.getLogger("dmgl")

# (section, setting, value) pinned by the official variant.
OFFICIAL_SETTINGS: tuple[tuple[str, str, Any], ...] = (
    ("loss", "matching", "js"),
    ("strategy.lb", "update_every", "epoch"),
    ("strategy.lb", "approx", "neumann"),
    ("strategy.lb", "terms", 1),
    ("strategy.lb", "params", "first"),
    ("strategy.lb", "outer_data", "holdout"),
    ("strategy.lb", "outer_batch_size", 8),
    ("strategy.lb", "initial_alpha", 0.95),
    ("strategy.lb", "min_alpha", 0.05),
    ("strategy.lb", "max_alpha", 0.95),
)

_warned: set[str] = set()  # the CLI resolves a config more than once; say each change once per process


class DMGLOfficialMethod(Method):
    """The official code's variant of Ours-LB; see the module docstring for how it differs from the paper."""

    name = "dmgl-official"
    strategies = ("lb",)
    published_strategy = ("lb", 0.0)

    @classmethod
    def configure(cls, config) -> None:
        if config.strategy.name != "lb":
            raise DmglError(
                f"method 'dmgl-official' is the official code's learning-based variant and runs with --strategy lb "
                f"only, got --strategy {config.strategy.name}"
            )
        changed = []
        for section, setting, value in OFFICIAL_SETTINGS:
            holder = config
            for part in section.split("."):
                holder = getattr(holder, part)
            current = getattr(holder, setting)
            if current != value:
                changed.append(f"{section}.{setting}={value} (was {current})")
                setattr(holder, setting, value)
        message = "method dmgl-official sets " + ", ".join(changed)
        if changed and message not in _warned:
            _warned.add(message)
            LOG.warning(message)

    def check(self) -> None:
        if self.options:
            raise DmglError(f"method 'dmgl-official' takes no settings, got: {', '.join(sorted(self.options))}")
        if self.config.model.fusion != "concat":
            raise DmglError("method 'dmgl-official' uses the Concat model (the official code's fusion); "
                            f"got model.fusion={self.config.model.fusion}")
