"""The hooks a method may use on the one shared training loop.

The paper's method is the default ``concat`` model trained with an alpha strategy; a baseline (issue: the
16 comparison methods) is a subclass of :class:`Method` that overrides only the hooks it needs. The trainer calls
every hook in the same place for every method, so adding a method never forks the loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from dmgl_cli.catalogue import MethodEntry, MethodOptions, method_entry
from dmgl_cli.losses import classification_loss
from dmgl_cli.models import ModelOutput, MultimodalModel, build_model
from dmgl_cli.strategies.specs import StrategySpec

if TYPE_CHECKING:
    from dmgl_cli.config_types import Config
    from dmgl_cli.loop import MethodLoop


class Method:
    """A method's hooks. A subclass is declared with its catalogue entry's name (``class PMRMethod(RebalanceMethod,
    method="pmr")``) and reads what the method is from that entry (:mod:`dmgl_cli.catalogue.methods`); the class
    attributes below are copied from it so that code holding the class can read them."""

    entry: ClassVar[MethodEntry | None] = None
    name = "base"
    # Strategies this method can be combined with; None means all of them.
    strategies: tuple[str, ...] | None = None
    # Whether L_MM is computed (methods with a single modality have nothing to match).
    uses_matching = True
    published_strategy: StrategySpec | None = None
    # Where per-modality scores come from (a run tag): "head-split", "own" or "probe".
    per_modality_source = "head-split"
    pinned_settings: Mapping[str, Any] = {}
    data_parallel_refusal: str | None = None
    # The training objective is objective_scale * ((1 - alpha) L_CLS + alpha L_MM) + extra terms; the authors'
    # dmgl code doubles it (dmgl-official), every other method leaves it as Eq. 1 writes it.
    objective_scale = 1.0

    def __init_subclass__(cls, method: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method is None:
            return  # an intermediate base (FusionMethod, RebalanceMethod)
        entry = cls.entry = method_entry(method)
        cls.name = entry.name
        cls.strategies = entry.strategies
        cls.uses_matching = entry.uses_matching
        cls.published_strategy = entry.published_strategy
        cls.per_modality_source = entry.per_modality_source
        cls.pinned_settings = entry.pinned_settings
        cls.data_parallel_refusal = entry.data_parallel_refusal

    @property
    def scoring_changes_state(self) -> bool:
        """Whether scoring a split changes the method's state (Greedy's running gate averages, as released): the
        trainer then scores test at every validated epoch, as the method's released loop does, so that the state
        evolves as published."""
        return False

    def __init__(self, config: Config, options: MethodOptions) -> None:
        """``options``: the method's checked ``method.options.NAME.*`` (its entry's options dataclass)."""
        self.config = config
        self.options = options

    def key(self, setting: str) -> str:
        """The dotted name of one of the method's settings, for messages."""
        return f"method.options.{self.name}.{setting}"

    @property
    def paper_label(self) -> str:
        """The method's row name in the paper's tables."""
        return self.entry.paper_label if self.entry is not None else self.name

    # -- construction --------------------------------------------------------------------------------------------
    def attach(self, trainer: MethodLoop) -> None:
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


class ConcatMethod(Method, method="concat"):
    """Feature concatenation (§3.1) — with ``--strategy constant --alpha 0`` plain Concat, with ``heuristic`` or
    ``lb`` the paper's Ours-H / Ours-LB."""
