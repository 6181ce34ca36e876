"""The strategy section of a run's config (``strategy.*``), below :mod:`dmgl_cli.config`: config builds a run's
:class:`StrategyConfig` from these dataclasses, and the strategies validate and read them. No torch, no config
import (config imports this module, never the other way round)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The inverse-Hessian approximations of the step estimator that dmgl_cli.hypergradient implements (named here, torch
# free, where the settings are checked), and with the authors' released rule, every value of strategy.lb.approx.
APPROXIMATIONS = ("identity", "neumann", "cg", "ggn")
ALPHA_GRADIENTS = (*APPROXIMATIONS, "official")


@dataclass(frozen=True)
class LearningBasedConfig:
    """Settings of the learning-based (bilevel) strategy, Eq. (2)-(3) and Algorithm 1; what each computes is in
    :mod:`dmgl_cli.hypergradient` and :mod:`dmgl_cli.strategies.outer_step`. The defaults were chosen with
    bench/lb_replay.py and bench/lb_fidelity.py (figures in bench/README.md)."""

    initial_alpha: float = 0.5
    alpha_lr: float = 0.05  # adam: about how far alpha moves per update; sgd: multiplies the hypergradient
    # adam (step independent of the hypergradient's magnitude) | sgd (Algorithm 1)
    alpha_optimizer: Literal["adam", "sgd"] = "adam"
    alpha_lr_halving: int | None = None  # halve alpha_lr every N epochs (the authors' code: 20); null: never
    # What the hypergradient measures (strategies/outer_step.py):
    # step (the default): one inner batch and one outer batch at the update step, v0.2's estimate; none of the
    #   others beat it or the fixed-sign control in bench/lb_controls.py (10 seeds, paired), so the cheapest stays
    # forward: alpha's effect on the outer loss at the end of the epoch it governed, by forward mode with the
    #   curvature term H Z (one Hessian-vector product per step): exact where training is smooth in alpha
    # epoch: the same without H Z (first order) | average: the mean of the one-step look-ahead over the sampled
    #   steps; both take g_MM - g_CLS every mixed_every steps and v on the whole outer set
    estimator: Literal["epoch", "forward", "average", "step"] = "step"
    mixed_every: int = 4  # epoch / forward / average: g_MM - g_CLS at every N-th step (random offset), weighted N
    # epoch / forward: what alpha's effect is measured over: epoch (Z restarts each epoch: the epoch alpha just
    # governed) | run (Z carried from the first step: the effect of shifting alpha over the whole run so far on the
    # outer loss now, Franceschi et al.'s real-time forward mode)
    horizon: Literal["epoch", "run"] = "epoch"
    # "epoch": once at each epoch's end, after its inner loop (Algorithm 1); N: every N optimiser steps (step
    # estimator only); "epoch_start": before each epoch (the released code, with approx official)
    update_every: int | Literal["epoch", "epoch_start"] = "epoch"
    # The step estimator's H^-1: identity: first-order one-step look-ahead (no curvature) | cg, neumann: Eq. 3's
    # H^-1 | ggn: generalised Gauss-Newton (positive semi-definite) with Levenberg-Marquardt damping, by CG |
    # official: the authors' released rule (dmgl-official)
    approx: Literal["identity", "neumann", "cg", "ggn", "official"] = "identity"
    terms: int = 20  # CG iterations or Neumann terms (Hessian-vector products); identity uses none
    # identity: the look-ahead step (auto: the optimiser's learning rate); neumann: the series step (auto:
    # 1 / lambda_max of H by power iteration, refreshed every curvature_refresh updates); cg, ggn: unused
    scale: float | Literal["auto"] = "auto"
    damping: float = 0.0  # added to H by cg / neumann / ggn, on top of the optimiser's (coupled) weight decay
    relative_damping: float = 0.01  # ggn: Levenberg-Marquardt damping, a fraction of the GGN's lambda_max
    cg_tolerance: float = 1e-6  # cg / ggn stop once ||v - H x|| / ||v|| is below this
    # cg / ggn: a solve whose relative residual is still above this (or that met negative curvature) is not used:
    # the identity value replaces it, and the epoch's metrics count the fallback
    max_residual: float = 0.5
    curvature_refresh: int = 10  # alpha updates between two lambda_max estimates (neumann auto, ggn)
    min_alpha: float = 0.0
    max_alpha: float = 1.0
    # The reviewer's controls: hypergradient (learn) | fixed: every update says "lower alpha" (+1; with adam a
    # fixed decay of alpha_lr per update) | random: a seeded random sign per update. The estimate is still
    # computed and logged, so the control costs what the real strategy costs.
    direction: Literal["hypergradient", "fixed", "random"] = "hypergradient"
    # holdout: outer batches from training samples set aside (never trained on), apart from the validation split
    # that picks the best epoch and drives the scheduler | val: from the validation split (then that split both
    # steers alpha and selects the model, so its scores are optimistic) | train: from the training split
    outer_data: Literal["holdout", "val", "train"] = "holdout"
    holdout: int | float = 0.05  # a fraction of train (stratified) or a count (seeded random), by data.split_seed
    outer_batch_size: int | None = None  # None: the training batch size
    # random: a fresh seeded batch per update | fixed: the first outer_batch_size (step estimator)
    outer_sampling: Literal["random", "fixed"] = "random"
    # which parameters enter H and the gradients: all | head | first (the first parameter tensor only)
    params: Literal["all", "head", "first"] = "all"


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "lb"  # a key of strategies.registry.STRATEGIES (config refuses any other)
    alpha: float = 0.0  # constant
    p: float = 0.05  # stepwise h(p)
    # linear: alpha = max(0, linear_start - linear_rate * epoch), the fixed decay that Adam on the sign of a
    # hypergradient reduces to (the reviewer's control for lb)
    linear_start: float = 0.5
    linear_rate: float = 0.05
    lb: LearningBasedConfig = field(default_factory=LearningBasedConfig)
