"""A recorded run -> its config, dataset and model, ready to score (``dmgl eval``, ``dmgl explain``, the embeddings
figure of ``dmgl report``, and the logged pyfunc model).

:func:`~dmgl_cli.rebuilt.rebuild_model` (in the training layer, below the MLflow layer) is the one place a model
is rebuilt from a config and a checkpoint; the MLflow layer's pyfunc model calls it too. :func:`load_recorded_model` reads a seed run's ``config.yaml`` and checkpoint
through a :class:`~dmgl_cli.tracking.Tracker` (passed in; this module never imports the MLflow layer) and opens
its dataset, refusing one whose checksum changed since the run. A parent run stands for its finished seed with the
best validation score (:func:`best_seed_on_validation`, as ``dmgl register`` chooses).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dmgl_cli.errors import DmglError
from dmgl_cli.rebuilt import RebuiltModel, rebuild_model

if TYPE_CHECKING:
    import torch

    from dmgl_cli.config import Config
    from dmgl_cli.data.prepared import PreparedDataset
    from dmgl_cli.methods.base import Method
    from dmgl_cli.models import MultimodalModel
    from dmgl_cli.tracking import RunRecord, Tracker

CHECKPOINTS = ("best", "last")


@dataclass
class RecordedModel:
    """A seed run's model rebuilt from its ``config.yaml`` and ``checkpoints/<checkpoint>.pt``, with its dataset."""

    run: RunRecord
    checkpoint: str  # best or last
    dataset: PreparedDataset
    rebuilt: RebuiltModel

    @property
    def config(self) -> Config:
        return self.rebuilt.config

    @property
    def method(self) -> Method:
        return self.rebuilt.method

    @property
    def model(self) -> MultimodalModel:
        return self.rebuilt.model

    @property
    def device(self) -> torch.device:
        return self.rebuilt.device

    @property
    def state(self) -> dict[str, Any]:
        return self.rebuilt.state

    @property
    def label(self) -> str:
        """The run's name as the paper names it (Concat, Ours-LB, OGM-GE, ...)."""
        from dmgl_cli.report.labels import row_label  # the one naming of rows (a leaf: strategies only)
        from dmgl_cli.strategies import spec_from_params

        spec = spec_from_params(self.run.params, self.run.tags)
        method = self.config.method.name
        return row_label(method, spec, "", "paper") if spec is not None else method


def check_dataset_unchanged(config: Config, dataset: PreparedDataset, run_tags: Mapping[str, str]) -> None:
    """Refuse a dataset whose checksum differs from the one the run recorded (``dmgl.dataset_checksum``)."""
    recorded = run_tags.get("dmgl.dataset_checksum")
    if recorded and recorded != dataset.checksum:
        raise DmglError(
            f"dataset {config.dataset!r} changed since this run was recorded (checksum {dataset.checksum[:12]} "
            f"!= {recorded[:12]}); prepare it again with the options the run used"
        )


def load_recorded_model(tracker: Tracker, run: RunRecord, checkpoint: str = "best") -> RecordedModel:
    """Rebuild a seed run's model as it was recorded, on its configured device; refuses a dataset whose checksum
    changed since the run."""
    from dmgl_cli.config import config_from_yaml
    from dmgl_cli.data.registry import open_dataset

    if checkpoint not in CHECKPOINTS:
        raise DmglError(f"checkpoint must be best or last, got {checkpoint!r}")
    config = config_from_yaml(tracker.read_text(run.run_id, "config.yaml"))
    dataset = open_dataset(config.dataset)
    check_dataset_unchanged(config, dataset, run.tags)
    state = tracker.load_checkpoint(run.run_id, checkpoint)
    rebuilt = rebuild_model(
        config, dataset.modalities, dataset.num_classes, state, source=f"run {run.run_id} checkpoints/{checkpoint}.pt"
    )
    return RecordedModel(run, checkpoint, dataset, rebuilt)


def best_seed_on_validation(tracker: Tracker, parent: RunRecord) -> tuple[RunRecord, list[RunRecord]]:
    """A parent run's finished seed with the best validation score (``final_val_<train.select_metric>``; never
    test; a tie goes to the lower seed), and every finished seed that has one."""
    key = f"final_val_{parent.params.get('train.select_metric', 'acc')}"
    scored = [
        c
        for c in tracker.children(parent.run_id)
        if c.status == "FINISHED" and math.isfinite(c.metrics.get(key, math.nan))
    ]
    if not scored:
        raise DmglError(
            f"parent run {parent.run_id} has no finished seed with a validation score ({key}); "
            "`dmgl train --resume` finishes its seeds"
        )
    return max(scored, key=lambda c: (c.metrics[key], -int(c.tags.get("dmgl.seed", 0)))), scored


def seed_run(tracker: Tracker, run_id: str) -> RunRecord:
    """The seed run ``run_id`` names (an id, a unique prefix or a name): itself, or — for a parent run — its
    finished seed with the best validation score (:func:`best_seed_on_validation`)."""
    run = tracker.find_run(run_id)
    if run.role == "seed":
        return run
    if run.role != "parent":
        raise DmglError(f"run {run.run_id} was not made by `dmgl train` (no dmgl.role tag); give a seed or parent run")
    return best_seed_on_validation(tracker, run)[0]


def load_seed_model(tracker: Tracker, run_id: str, checkpoint: str = "best") -> RecordedModel:
    """The model of the seed run ``run_id`` names (a parent: its best seed on validation, :func:`seed_run`)."""
    if checkpoint not in CHECKPOINTS:
        raise DmglError(f"checkpoint must be best or last, got {checkpoint!r}")
    return load_recorded_model(tracker, seed_run(tracker, run_id), checkpoint)
