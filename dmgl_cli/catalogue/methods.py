"""What each method *is*, torch-free: the explicit registry :data:`METHODS` (name -> :class:`MethodEntry`).

An entry holds everything that is decided before a model exists: the paper's label, the strategies the method can
run with and the one it is published with, the settings that define it, its options dataclass (its
``method.options.NAME.*`` with their defaults and checks), why it cannot train data-parallel, where its
per-modality scores come from, and where its implementation lives. Config validation, ``--print-config``,
``--dry-run``, the run's tags and the report's labels read the entry; only training imports the implementation
(``dmgl_cli.methods.method_class``), whose class reads its identity from the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from dmgl_cli.catalogue.options import (
    AffineOptions,
    AGMOptions,
    ChannelOptions,
    DOMFNOptions,
    ETMCOptions,
    GBlendOptions,
    GreedyOptions,
    MethodOptions,
    MLAOptions,
    MLLSTMOptions,
    MSESOptions,
    MSLROptions,
    OGMGEOptions,
    PMROptions,
    UnimodalOptions,
    WeightOptions,
    options_of,
)
from dmgl_cli.errors import DmglError
from dmgl_cli.strategies.specs import StrategySpec

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config

# The settings that make the released code's variant of Ours-LB (dotted key -> value).
OFFICIAL_SETTINGS: dict[str, Any] = {
    "loss.matching": "mixture_kl",
    "strategy.lb.approx": "official",
    "strategy.lb.estimator": "step",  # one outer batch, as released
    "strategy.lb.update_every": "epoch_start",
    "strategy.lb.alpha_optimizer": "sgd",
    "strategy.lb.alpha_lr": 1e-4,
    "strategy.lb.alpha_lr_halving": 20,
    "strategy.lb.initial_alpha": 0.95,
    "strategy.lb.min_alpha": 0.05,
    "strategy.lb.max_alpha": 0.95,
    "strategy.lb.outer_data": "holdout",
    "strategy.lb.holdout": 16,
    "strategy.lb.outer_batch_size": 8,
    "strategy.lb.outer_sampling": "fixed",
    "strategy.lb.params": "all",
}

# dmgl-official-eq3: the same, with Eq. 3 (CG, weight decay in H) at each epoch's end, stepped by Adam.
EQ3_SETTINGS: dict[str, Any] = {
    **OFFICIAL_SETTINGS,
    "strategy.lb.approx": "cg",
    "strategy.lb.estimator": "step",  # Eq. 3 at the epoch's last step, on one inner and one outer batch
    "strategy.lb.update_every": "epoch",
    "strategy.lb.alpha_optimizer": "adam",
    "strategy.lb.alpha_lr": 0.05,
    "strategy.lb.alpha_lr_halving": 20,
}

# A comparison method trains as published (Table 1's rows): without the matching loss.
AS_PUBLISHED = StrategySpec("constant", 0.0)

PerModalitySource = Literal["head-split", "own", "probe"]


@dataclass(frozen=True)
class MethodEntry:
    """One method as config, the CLI and the report see it."""

    name: str  # what --method takes, the run's dmgl.method tag
    paper_label: str  # the row name in the paper's tables
    # "module:Class" of its Method subclass; only dmgl_cli.methods imports it
    implementation: str
    options: type[MethodOptions] = MethodOptions
    # Strategies it can be combined with; None: all of them
    strategies: tuple[str, ...] | None = None
    # `dmgl train --method NAME` without --strategy; None keeps the recipe's strategy (the paper's own method)
    published_strategy: StrategySpec | None = AS_PUBLISHED
    # Settings (dotted key -> value) that define it: config.resolve writes them in, validate refuses a config that
    # lost them (a hand-edited config.yaml)
    pinned_settings: Mapping[str, Any] = field(default_factory=dict)
    # Where per-modality scores come from (a run tag): Concat's head split per modality, the method's own
    # uni-modal outputs, or linear probes on detached embeddings
    per_modality_source: PerModalitySource = "head-split"
    # Whether L_MM is computed (a single modality has nothing to match)
    uses_matching: bool = True
    # Whether L_CLS is the plain cross-entropy of the fused logits (approx=ggn linearises exactly that)
    plain_classification_loss: bool = True
    # Why it cannot train data-parallel (`dmgl train --nproc N`), or None
    data_parallel_refusal: str | None = None
    # A refusal in the method's own words, checked before the others (MLA: no alpha but 0)
    refuse: Callable[[Config], None] | None = None

    def check_config(self, config: Config) -> MethodOptions:
        """Refuse a configuration the method cannot run (raise DmglError) and return its checked options: a strategy
        it cannot be combined with, settings that no longer hold its pinned values, bad ``method.options``."""
        if self.refuse is not None:
            self.refuse(config)
        if self.strategies is not None and config.strategy.name not in self.strategies:
            raise DmglError(
                f"method {self.name!r} cannot be combined with --strategy {config.strategy.name}; "
                f"it supports: {', '.join(self.strategies)}"
            )
        recorded = config.flat()
        differing = [
            f"{key}={recorded.get(key)!r} (it is defined by {value!r})"
            for key, value in self.pinned_settings.items()
            if recorded.get(key) != value
        ]
        if differing:
            raise DmglError(f"method {self.name!r} cannot run with {', '.join(differing)}")
        return options_of(self.options, self.name, config)


def _mla_refusal(config: Config) -> None:
    strategy = config.strategy
    if strategy.name != "constant" or strategy.alpha != 0:
        given = f"--strategy {strategy.name}" if strategy.name != "constant" else f"alpha {strategy.alpha}"
        raise DmglError(
            "method 'mla' trains one modality per optimiser step, so there is no pair of modalities to match: "
            f"it runs with --strategy constant --alpha 0 only, got {given}"
        )


def _official_refusal(config: Config) -> None:
    if config.strategy.name != "lb":
        raise DmglError(
            f"method '{config.method.name}' is the released code's learning-based variant and runs with --strategy lb "
            f"only, got --strategy {config.strategy.name}"
        )


_GREEDY_REFUSAL = (
    "its forward updates the running gate averages in place from the batch it sees, in training and in scoring "
    "(as released), so ranks that each see a slice of a batch, or their own evaluation batches, would hold "
    "different gates"
)

# In the paper's order: Concat and the comparison methods as Table 1 lists them, then the released code's variants.
METHODS: dict[str, MethodEntry] = {
    entry.name: entry
    for entry in (
        MethodEntry("concat", "Concat", "dmgl_cli.methods.base:ConcatMethod", published_strategy=None),
        MethodEntry(
            "unimodal",
            "Uni-modal",
            "dmgl_cli.methods.unimodal:UnimodalMethod",
            UnimodalOptions,
            strategies=("constant",),
            per_modality_source="own",
            uses_matching=False,
        ),
        MethodEntry("sum", "Sum", "dmgl_cli.methods.sum:SumMethod", per_modality_source="own"),
        MethodEntry(
            "weight", "Weight", "dmgl_cli.methods.weight:WeightMethod", WeightOptions, per_modality_source="own"
        ),
        MethodEntry(
            "affine", "Affine", "dmgl_cli.methods.affine:AffineMethod", AffineOptions, per_modality_source="probe"
        ),
        MethodEntry(
            "channel", "Channel", "dmgl_cli.methods.channel:ChannelMethod", ChannelOptions, per_modality_source="own"
        ),
        MethodEntry(
            "ml-lstm", "ML-LSTM", "dmgl_cli.methods.ml_lstm:MLLSTMMethod", MLLSTMOptions, per_modality_source="probe"
        ),
        MethodEntry(
            "etmc",
            "ETMC",
            "dmgl_cli.methods.etmc:ETMCMethod",
            ETMCOptions,
            per_modality_source="own",
            plain_classification_loss=False,
        ),
        MethodEntry("mses", "MSES", "dmgl_cli.methods.mses:MSESMethod", MSESOptions),
        MethodEntry("g-blend", "G-Blending", "dmgl_cli.methods.g_blend:GBlendMethod", GBlendOptions),
        MethodEntry("ogm-ge", "OGM-GE", "dmgl_cli.methods.ogm_ge:OGMGEMethod", OGMGEOptions),
        MethodEntry(
            "greedy",
            "Greedy",
            "dmgl_cli.methods.greedy:GreedyMethod",
            GreedyOptions,
            per_modality_source="own",
            plain_classification_loss=False,
            data_parallel_refusal=_GREEDY_REFUSAL,
        ),
        MethodEntry("domfn", "DOMFN", "dmgl_cli.methods.domfn:DOMFNMethod", DOMFNOptions, per_modality_source="own"),
        MethodEntry("mslr", "MSLR", "dmgl_cli.methods.mslr:MSLRMethod", MSLROptions),
        MethodEntry("pmr", "PMR", "dmgl_cli.methods.pmr:PMRMethod", PMROptions),
        MethodEntry("agm", "AGM", "dmgl_cli.methods.agm:AGMMethod", AGMOptions, per_modality_source="own"),
        MethodEntry(
            "mla",
            "MLA",
            "dmgl_cli.methods.mla:MLAMethod",
            MLAOptions,
            strategies=("constant",),
            per_modality_source="own",
            refuse=_mla_refusal,
        ),
        MethodEntry(
            "dmgl-official",
            "Ours-LB (released code)",
            "dmgl_cli.methods.dmgl_official:DMGLOfficialMethod",
            strategies=("lb",),
            published_strategy=StrategySpec("lb"),
            pinned_settings=OFFICIAL_SETTINGS,
            per_modality_source="own",
            refuse=_official_refusal,
        ),
        MethodEntry(
            "dmgl-official-eq3",
            "Ours-LB (released code, Eq. 3)",
            "dmgl_cli.methods.dmgl_official:DMGLOfficialEq3Method",
            strategies=("lb",),
            published_strategy=StrategySpec("lb"),
            pinned_settings=EQ3_SETTINGS,
            per_modality_source="own",
            refuse=_official_refusal,
        ),
    )
}


def method_entry(name: str) -> MethodEntry:
    """The catalogue's entry of method ``name``; DmglError naming the valid ones otherwise."""
    if name not in METHODS:
        raise DmglError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]
