"""Each method's settings (``method.options.NAME.*``) as a typed, frozen dataclass with its defaults, and the
torch-free checks that refuse what the method cannot run (before any run is created).

:func:`options_of` turns a config's raw mapping into the method's options: a key the dataclass lacks is refused,
:meth:`MethodOptions.check` refuses bad values (naming ``method.options.NAME.KEY``), and whole numbers given for a
``float`` setting become floats. The implementation in ``dmgl_cli/methods/`` receives the result and reads
``self.options.KEY``; a choice setting is a ``Literal``, whose values are the only list of its choices.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from dmgl_cli.errors import DmglError

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config


class Checks:
    """The value checks of one method's settings; every message names ``method.options.NAME.KEY``."""

    def __init__(self, method: str, options: MethodOptions) -> None:
        self.method = method
        self.options = options

    def key(self, setting: str) -> str:
        return f"method.options.{self.method}.{setting}"

    def value(self, setting: str) -> Any:
        return getattr(self.options, setting)

    def number(self, setting: str, low: float | None = None, high: float | None = None, *, low_open=False) -> None:
        value = self.value(setting)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DmglError(f"{self.key(setting)} must be a number, got {value!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            lower = "" if low is None else f"{'>' if low_open else '>='} {low}"
            upper = "" if high is None else f"<= {high}"
            raise DmglError(
                f"{self.key(setting)} must be {' and '.join(p for p in (lower, upper) if p)}, got {float(value)}"
            )

    def positive(self, setting: str) -> None:
        value = self.value(setting)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise DmglError(f"{self.key(setting)} must be a number > 0, got {value!r}")

    def non_negative(self, setting: str) -> None:
        value = self.value(setting)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise DmglError(f"{self.key(setting)} must be a number >= 0, got {value!r}")

    def integer(self, setting: str, low: int = 0) -> None:
        value = self.value(setting)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DmglError(f"{self.key(setting)} must be an integer >= {low}, got {value!r}")

    def flag(self, setting: str) -> None:
        if not isinstance(self.value(setting), bool):
            raise DmglError(f"{self.key(setting)} must be true or false, got {self.value(setting)!r}")

    def choice(self, setting: str) -> None:
        """One of the values of the setting's ``Literal`` type."""
        choices = choices_of(type(self.options), setting)
        if self.value(setting) not in choices:
            raise DmglError(f"{self.key(setting)} must be one of {', '.join(choices)}, got {self.value(setting)!r}")

    def modality(self, setting: str) -> None:
        value = self.value(setting)
        if value is not None and (not isinstance(value, str) or not value):
            raise DmglError(f"{self.key(setting)} must be a modality name, got {value!r}")

    def epoch_window(self) -> None:
        """``start_epoch`` and ``end_epoch`` (both >= 1, in order): the epochs a rebalancing method acts in."""
        self.integer("start_epoch", 1)
        self.integer("end_epoch", 1)
        start, end = self.value("start_epoch"), self.value("end_epoch")
        if end < start:
            raise DmglError(f"{self.key('end_epoch')} ({end}) must be >= {self.key('start_epoch')} ({start})")


def choices_of(options: type, setting: str) -> tuple[str, ...]:
    """The values of a ``Literal`` setting of an options dataclass, in order."""
    return tuple(typing.get_args(typing.get_type_hints(options)[setting]))


@dataclass(frozen=True)
class MethodOptions:
    """A method with no settings of its own; subclasses add fields (with their defaults) and :meth:`check`."""

    def check(self, config: Config, checks: Checks) -> None:
        """Refuse values (and combinations with the rest of ``config``) the method cannot run: raise DmglError."""


def options_of(options: type[MethodOptions], method: str, config: Config) -> MethodOptions:
    """The checked options of ``method`` from ``config.method.options[method]``; refuses unknown keys."""
    raw = dict(config.method.options.get(method, {}))
    names = [f.name for f in dataclasses.fields(options)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise DmglError(
            f"unknown setting {', '.join(f'method.options.{method}.{k}' for k in unknown)}; "
            f"method {method!r} takes: {', '.join(names) or '(none)'}"
        )
    built = options(**raw)
    built.check(config, Checks(method, built))
    hints = typing.get_type_hints(options)
    as_floats = {  # a whole number given for a float setting (YAML's 1) is that float
        name: float(value)
        for name, value in raw.items()
        if hints[name] in (float, float | None) and isinstance(value, int) and not isinstance(value, bool)
    }
    return dataclasses.replace(built, **as_floats)


# ----------------------------------------------------------------------------------------------- shared checks


def refuse_probe_matching(config: Config, method: str) -> None:
    """Probe logits see detached embeddings, so a matching loss over predictions (``js``, ``mixture_kl``) would
    match probes, not modalities: refused for a method whose per-modality scores are probes, whenever alpha can
    be non-zero."""
    strategy = config.strategy
    if config.loss.matching in ("js", "mixture_kl") and not (strategy.name == "constant" and strategy.alpha == 0):
        raise DmglError(
            f"method {method!r} has no per-modality predictions of its own (its per-modality scores come from "
            f"linear probes on detached embeddings), so loss.matching={config.loss.matching} (which matches "
            "predictions) has nothing to match; use loss.matching=infonce"
        )


@dataclass(frozen=True)
class RebalanceOptions(MethodOptions):
    """A rebalancing method works on Concat's head (its per-modality split)."""

    def check(self, config: Config, checks: Checks) -> None:
        if config.model.fusion != "concat":
            raise DmglError(
                f"method {checks.method!r} works on Concat's head (its per-modality split); it cannot be combined "
                f"with model.fusion={config.model.fusion}"
            )


# ----------------------------------------------------------------------------------------------- fusion methods


@dataclass(frozen=True)
class UnimodalOptions(MethodOptions):
    modality: str | None = None  # required: a modality of the dataset (--modality NAME)

    def check(self, config: Config, checks: Checks) -> None:
        if self.modality is None:
            raise DmglError(
                "method 'unimodal' needs the modality to train: pass --modality NAME "
                f"(or --set {checks.key('modality')}=NAME)"
            )
        checks.modality("modality")
        if config.strategy.alpha != 0:
            raise DmglError(
                f"method 'unimodal' trains one modality, which has nothing to match: it needs alpha = 0 "
                f"(--strategy constant --alpha 0), got alpha {config.strategy.alpha}"
            )


@dataclass(frozen=True)
class WeightOptions(MethodOptions):
    unimodal_weight: float = 0.5  # weight of the per-modality losses (CMML)

    def check(self, config: Config, checks: Checks) -> None:
        checks.non_negative("unimodal_weight")


@dataclass(frozen=True)
class AffineOptions(MethodOptions):
    condition: str | None = None  # the modality that scales and shifts the other (None: the first)
    probe_lr: float = 1e-3

    def check(self, config: Config, checks: Checks) -> None:
        checks.positive("probe_lr")
        checks.modality("condition")
        refuse_probe_matching(config, checks.method)


@dataclass(frozen=True)
class ChannelOptions(MethodOptions):
    ratio: int = 4  # MMTM's squeeze ratio
    gate_scale: float = 2.0

    def check(self, config: Config, checks: Checks) -> None:
        checks.integer("ratio", 1)
        checks.positive("gate_scale")


@dataclass(frozen=True)
class MLLSTMOptions(MethodOptions):
    layers: int = 2
    hidden: int | None = None  # None: model.embed_dim
    dropout: float = 0.0
    probe_lr: float = 1e-3

    def check(self, config: Config, checks: Checks) -> None:
        checks.integer("layers", 1)
        if self.hidden is not None:
            checks.integer("hidden", 1)
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise DmglError(f"{checks.key('dropout')} must be in [0, 1), got {dropout!r}")
        checks.positive("probe_lr")
        refuse_probe_matching(config, checks.method)


@dataclass(frozen=True)
class ETMCOptions(MethodOptions):
    annealing_epochs: int = 10  # epochs over which the KL term's weight rises to 1

    def check(self, config: Config, checks: Checks) -> None:
        checks.integer("annealing_epochs", 1)


@dataclass(frozen=True)
class GreedyOptions(ChannelOptions):
    gate_scale: float = 1.0
    epsilon: float = 0.01
    window: int = 5
    starting_epoch: int = 2
    running_average: Literal["first-modality", "own"] = "first-modality"
    average_eval_batches: bool = True
    training_loss: Literal["streams", "fused"] = "streams"

    def check(self, config: Config, checks: Checks) -> None:
        super().check(config, checks)
        checks.non_negative("epsilon")
        checks.integer("window", 1)
        checks.integer("starting_epoch", 1)
        checks.choice("running_average")
        checks.choice("training_loss")
        checks.flag("average_eval_batches")


# ------------------------------------------------------------------------------------------ rebalancing methods


@dataclass(frozen=True)
class MSESOptions(RebalanceOptions):
    patience: int = 10
    min_delta: float = 0.0
    restore: Literal["model", "branch", "none"] = "model"
    start_epoch: int = 1
    end_epoch: int = 20

    def check(self, config: Config, checks: Checks) -> None:
        super().check(config, checks)
        checks.integer("patience", 0)
        checks.number("min_delta", 0.0)
        checks.choice("restore")
        checks.epoch_window()


@dataclass(frozen=True)
class GBlendOptions(RebalanceOptions):
    mode: Literal["online", "offline"] = "online"
    super_epoch: int = 10
    copy_epochs: int | None = None  # None: 10, or train.epochs with mode=offline
    copy_batches: int = 0  # 0: whole epochs
    loss_reduction: Literal["batch-sum", "mean"] = "batch-sum"

    def copies_epochs(self, config: Config) -> int:
        """How many epochs each temporary copy trains."""
        if self.copy_epochs is not None:
            return self.copy_epochs
        return config.train.epochs if self.mode == "offline" else 10

    def check(self, config: Config, checks: Checks) -> None:
        super().check(config, checks)
        checks.choice("mode")
        checks.integer("super_epoch", 1)
        if self.copy_epochs is not None:
            checks.integer("copy_epochs", 0)
        checks.integer("copy_batches", 0)
        checks.choice("loss_reduction")
        copies = self.copies_epochs(config)
        if copies < 2:
            where = checks.key("copy_epochs")
            if self.copy_epochs is None:
                where = f"train.epochs (the copies' epochs under {checks.key('mode')}=offline)"
            raise DmglError(
                f"{where} must be >= 2, got {copies}: the estimate compares the copies' losses "
                "after their first and their last epoch"
            )


@dataclass(frozen=True)
class ModulationOptions(RebalanceOptions):
    """``alpha`` (> 0) and the epochs ``[start_epoch, end_epoch]`` in which gradients are modulated."""

    alpha: float = 1.0
    start_epoch: int = 1
    end_epoch: int = 20

    def check(self, config: Config, checks: Checks) -> None:
        super().check(config, checks)
        checks.number("alpha", 0.0, low_open=True)
        checks.epoch_window()


@dataclass(frozen=True)
class OGMGEOptions(ModulationOptions):
    alpha: float = 0.8
    end_epoch: int = 51
    noise: bool = True  # the generalisation enhancement (Gaussian noise on the modulated gradients)
    params: Literal["conv2d", "conv", "weights"] = "conv2d"  # which encoder gradients are modulated

    def check(self, config: Config, checks: Checks) -> None:
        super().check(config, checks)
        checks.flag("noise")
        checks.choice("params")


@dataclass(frozen=True)
class DOMFNOptions(RebalanceOptions):
    margin: float = 0.3
    beta: float = 1.0

    def check(self, config: Config, checks: Checks) -> None:
        super().check(config, checks)
        checks.number("margin", 0.0, math.log(2.0), low_open=True)
        checks.number("beta", 0.0)


@dataclass(frozen=True)
class MSLROptions(RebalanceOptions):
    lr_scale: float | dict[str, float] = 1.0  # one number, or {modality: number} (others 1)
    schedule: Literal["keep", "dynamic"] = "dynamic"
    window: int = 5
    start_epoch: int = 1
    end_epoch: int = 20
    scaling: Literal["gradient", "learning-rate"] = "gradient"

    def check(self, config: Config, checks: Checks) -> None:
        super().check(config, checks)
        checks.choice("schedule")
        checks.choice("scaling")
        checks.integer("window", 1)
        checks.epoch_window()
        if self.schedule == "dynamic" and config.train.eval_every != 1:
            raise DmglError(
                f"{checks.key('schedule')}=dynamic reads every epoch's validation accuracies; with "
                f"train.eval_every={config.train.eval_every} set train.eval_every=1 or {checks.key('schedule')}=keep"
            )


@dataclass(frozen=True)
class PMROptions(RebalanceOptions):
    alpha: float = 1.0
    momentum: float = 0.2
    start_epoch: int = 1
    end_epoch: int = 101
    proto_fraction: float = 0.1
    mu: float = 0.0
    entropy_epochs: int = 5

    def check(self, config: Config, checks: Checks) -> None:
        super().check(config, checks)
        checks.number("alpha", 0.0)
        checks.number("momentum", 0.0, 1.0)
        if self.momentum >= 1.0:
            raise DmglError(f"{checks.key('momentum')} must be < 1, got {float(self.momentum)}")
        checks.epoch_window()
        checks.number("proto_fraction", 0.0, 1.0, low_open=True)
        checks.number("mu", 0.0)
        checks.integer("entropy_epochs", 0)


@dataclass(frozen=True)
class AGMOptions(ModulationOptions):
    cap: float | None = 10.0  # None: no cap on the coefficients
    hold_after_window: bool = True
    clip: bool = True

    def check(self, config: Config, checks: Checks) -> None:
        super().check(config, checks)
        if self.cap is not None:
            checks.number("cap", 0.0, low_open=True)
        checks.flag("hold_after_window")
        checks.flag("clip")


@dataclass(frozen=True)
class MLAOptions(RebalanceOptions):
    fusion: Literal["batch-entropy", "sample-entropy"] = "batch-entropy"
    denominator: Literal["elementwise", "scalar"] = "elementwise"
    projection: bool = True

    def check(self, config: Config, checks: Checks) -> None:
        super().check(config, checks)
        checks.choice("fusion")
        checks.choice("denominator")
        checks.flag("projection")
