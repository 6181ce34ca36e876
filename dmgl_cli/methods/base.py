"""The hooks a method may use on the one shared training loop.

The paper's method is the default ``concat`` model trained with an alpha strategy; a baseline (issue: the
16 comparison methods) is a subclass of :class:`Method` that overrides only the hooks it needs. The trainer calls
every hook in the same place for every method, so adding a method never forks the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from dmgl_cli.errors import DmglError
from dmgl_cli.losses import classification_loss
from dmgl_cli.models import ModelOutput, MultimodalModel, build_model
from dmgl_cli.strategies.specs import StrategySpec

if TYPE_CHECKING:
    from dmgl_cli.train import Trainer


class Method:
    name = "base"
    # Strategies this method can be combined with; None means all of them.
    strategies: tuple[str, ...] | None = None
    # Whether L_MM is computed (methods with a single modality have nothing to match).
    uses_matching = True
    # `dmgl train --method NAME` without --strategy: a comparison method trains as published (Table 1's rows),
    # i.e. without the matching loss (constant alpha 0); None keeps the recipe's strategy (the paper's method).
    published_strategy: StrategySpec | None = StrategySpec("constant", 0.0)
    # Where per-modality scores come from: "head-split" (Concat's head split per modality), "own" (the method's
    # own uni-modal outputs) or "probe" (linear probes on detached embeddings); recorded as a run tag.
    per_modality_source = "head-split"
    # The training objective is objective_scale * ((1 - alpha) L_CLS + alpha L_MM) + extra terms; the authors'
    # dmgl code doubles it (dmgl-official), every other method leaves it as Eq. 1 writes it.
    objective_scale = 1.0

    # A method's settings (``method.options.<name>.<key>``) and their defaults; any other key is refused.
    defaults: dict[str, Any] = {}
    # Settings (dotted key -> value) that define the method: `config.resolve` writes them into the run's config
    # (with a warning naming each one it changed), so the run records what ran (dmgl-official).
    pinned_settings: dict[str, Any] = {}

    # Why the method cannot train data-parallel (`dmgl train --nproc N`), or None: every other method computes the
    # single-process step from the gathered global batch (distributed.py).
    data_parallel_refusal: str | None = None

    @property
    def scoring_changes_state(self) -> bool:
        """Whether scoring a split changes the method's state (Greedy's running gate averages, as released): the
        trainer then scores test at every validated epoch, as the method's released loop does, so that the state
        evolves as published."""
        return False

    def __init__(self, config, options: dict[str, Any]):
        self.config = config
        self.options = options
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(self.defaults) or "(none)"
            raise DmglError(
                f"unknown setting {', '.join(f'method.options.{self.name}.{k}' for k in unknown)}; "
                f"method {self.name!r} takes: {valid}"
            )
        self.settings: dict[str, Any] = {**self.defaults, **options}

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config) -> None:
        """Refuse a configuration the method cannot run (called by ``config.validate``, so a refusal comes before
        any run is created): a strategy the method cannot be combined with, or a bad ``method.options`` setting
        (the method is built once and runs :meth:`check`)."""
        if cls.strategies is not None and config.strategy.name not in cls.strategies:
            raise DmglError(
                f"method {cls.name!r} cannot be combined with --strategy {config.strategy.name}; "
                f"it supports: {', '.join(cls.strategies)}"
            )
        cls(config, config.method_options(cls.name)).check()

    def check(self) -> None:
        """Refuse a configuration this method cannot run (raise DmglError)."""

    def attach(self, trainer: Trainer) -> None:
        """Called once by the Trainer after the model, optimiser, scheduler and strategy exist. Methods that need
        more than the batch keep the trainer: its ``splits`` and ``device`` (G-Blend's validation losses, PMR's
        prototypes over the training set, MSES's per-modality validation loss) or its ``optimizer`` (MSLR)."""

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int) -> MultimodalModel:
        return build_model(self.config, modalities, num_classes)

    def param_groups(self, model: MultimodalModel) -> list[dict[str, Any]]:
        """Optimiser parameter groups (per-modality learning rates go here)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    # -- training step -------------------------------------------------------------------------------------------
    def train_passes(self) -> tuple[Any, ...]:
        """Keys of the optimiser steps taken on each training batch, in order; the loop calls
        :meth:`start_pass` with each key before that step's forward. Default: one step per batch. MLA returns its
        modalities: each batch trains one modality after the other, with an optimiser step each."""
        return (None,)

    def start_pass(self, key: Any) -> None:
        """Called before each optimiser step of a batch with its key from :meth:`train_passes`."""

    def forward(self, model: MultimodalModel, inputs: dict[str, Tensor], training: bool) -> ModelOutput:
        return model(inputs)

    def classification_loss(self, output: ModelOutput, labels: Tensor) -> Tensor:
        """L_CLS of a batch: cross-entropy of the fused logits, unless the method replaces it (ETMC's evidential
        loss). Used for training, evaluation and the LB strategy's outer loss alike."""
        return classification_loss(output.logits.float(), labels)

    def extra_losses(self, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> dict[str, Tensor]:
        """Loss terms added to (1 - alpha) L_CLS + alpha L_MM, by name (each is logged)."""
        return {}

    def after_backward(self, model: MultimodalModel, output: ModelOutput, labels: Tensor, step: dict[str, Any]) -> None:
        """Modify gradients between backward and the optimiser step (gradient modulation)."""

    # -- epochs --------------------------------------------------------------------------------------------------
    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        pass

    def on_epoch_end(self, model: MultimodalModel, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        """Return extra metrics to log for the epoch."""
        return {}

    # -- evaluation ----------------------------------------------------------------------------------------------
    def predict(self, output: ModelOutput) -> Tensor:
        """Fused logits used for scoring (test-time fusion rules go here)."""
        return output.logits

    # -- state (checkpointed for exact resume; plain containers and tensors only) --------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ConcatMethod(Method):
    """Feature concatenation (§3.1) — with ``--strategy constant --alpha 0`` plain Concat, with ``heuristic`` or
    ``lb`` the paper's Ours-H / Ours-LB."""

    name = "concat"
    published_strategy = None
