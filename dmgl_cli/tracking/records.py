"""dmgl's view of what MLflow holds: :class:`RunRecord`, :class:`DatasetRecord` and the metric names.

Nothing here imports MLflow; :meth:`RunRecord.of` reads an MLflow ``Run`` by its attributes.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARENT_TAG = "mlflow.parentRunId"

# ------------------------------------------------------------------------------------------------ metric names
# dmgl's metric keys (``val_acc``, ``final_test_acc``, ``alpha``, ``train_loss``) are its own everywhere but in
# MLflow, where they are grouped so that the UI shows one chart section per group (a section is the text before the
# name's last "/"): the text before a key's first "_" is its section (``val_acc`` -> ``val/acc``, ``final_test_acc``
# -> ``val_selected/test_acc`` (below), ``alpha_hypergradient`` -> ``alpha/hypergradient``, a method's ``agm_score_audio`` ->
# ``agm/score_audio``), and the keys below are placed by hand. Only the tracking package converts: writing maps to
# the MLflow name, reading (RunRecord.metrics, metric_history, logged_steps) maps back, and a run recorded before the
# names were grouped (flat ``val_acc``) reads the same.
_PLACED = {
    "alpha": "alpha/value",
    "lr": "train/lr",
    "epoch_seconds": "train/epoch_seconds",
    "best_epoch": "val/best_epoch",  # the epoch chosen on validation so far
}
_PLACED_BACK = {name: key for key, name in _PLACED.items()}
SPREAD = "_std"  # a parent's std over seeds of a metric: ``val_acc_std`` beside ``val_acc``
# A run's final scores (``final_test_acc``: at the validation-selected epoch) go in the section ``val_selected``,
# which sorts after every curve's section (the UI orders sections by name, "_" after "/"), so that a run's charts
# open on its curves; runs recorded before this wrote ``final/...``, which reads back the same.
_SECTION_NAMES = {"final": "val_selected"}
_SECTION_KEYS = {name: section for section, name in _SECTION_NAMES.items()}


def mlflow_metric_name(key: str) -> str:
    """The MLflow name of one of dmgl's metric keys (:func:`dmgl_metric_name` inverts it)."""
    if key in _PLACED:
        return _PLACED[key]
    if key.endswith(SPREAD) and key[: -len(SPREAD)] in _PLACED:  # a parent's spread sits beside its mean
        return _PLACED[key[: -len(SPREAD)]] + SPREAD
    section, underscore, rest = key.partition("_")
    name = f"{section}/{rest}"
    if not (underscore and section and rest) or "/" in key or name in _PLACED_BACK:
        return key  # nothing to group by, or a key (say a method's "train_lr") that would read back as another
    return f"{_SECTION_NAMES.get(section, section)}/{rest}"


def dmgl_metric_name(name: str) -> str:
    """dmgl's key for an MLflow metric name; a flat name (a run recorded before the names were grouped) is its own."""
    if name in _PLACED_BACK:
        return _PLACED_BACK[name]
    if name.endswith(SPREAD) and name[: -len(SPREAD)] in _PLACED_BACK:
        return _PLACED_BACK[name[: -len(SPREAD)]] + SPREAD
    section, slash, rest = name.partition("/")
    return f"{_SECTION_KEYS.get(section, section)}_{rest}" if slash and section and rest else name


# ``metrics.final_val_acc`` or ``metrics.`final_val_acc` `` in a search filter (a grouped name has a "/" and is kept)
METRIC_IN_FILTER = re.compile(r"metrics\.(`?)([A-Za-z0-9_]+)\1(?![/\w])")


def dmgl_metrics(logged: dict[str, float]) -> dict[str, float]:
    """{dmgl key: value}; where a run holds both a flat and a grouped name for one key (a run resumed across the
    change), the grouped one wins."""
    return {dmgl_metric_name(name): value for name, value in sorted(logged.items(), key=lambda item: "/" in item[0])}


# A dataset's digest in MLflow: the manifest checksum's first 12 hex digits, as dmgl's messages print it. MLflow keeps
# at most 36 characters and shows the digest beside the name in the runs table, where a long one is cut off.
DATASET_DIGEST_LENGTH = 12


@dataclass(frozen=True)
class DatasetRecord:
    """A prepared dataset as a run's input: its registered ``name``, prepared ``folder`` and manifest ``checksum``."""

    name: str
    folder: Path
    checksum: str
    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)  # the manifest's {modality: kind/dtype/shape}
    profile: dict[str, Any] = field(default_factory=dict)  # shown with the dataset in the UI (classes, split sizes)

    @property
    def digest(self) -> str:
        """The manifest's checksum, cut short (the full one is the tag ``dmgl.dataset_checksum`` and in the profile)."""
        return self.checksum[:DATASET_DIGEST_LENGTH]


@dataclass(frozen=True)
class RunRecord:
    """One recorded run as dmgl's other modules see it (they never handle MLflow's own ``Run`` objects)."""

    run_id: str
    name: str
    experiment_id: str
    status: str  # RUNNING | SCHEDULED | FINISHED | FAILED | KILLED
    start_time: int  # milliseconds since the epoch
    end_time: int | None
    artifact_uri: str
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # the latest value of each metric, by dmgl's key

    @property
    def role(self) -> str | None:
        """parent | seed | sweep for runs dmgl made, else None."""
        return self.tags.get("dmgl.role")

    @property
    def parent_id(self) -> str | None:
        return self.tags.get(PARENT_TAG)

    @classmethod
    def of(cls, run) -> RunRecord:
        info, data = run.info, run.data
        return cls(
            run_id=info.run_id,
            name=info.run_name or "",
            experiment_id=info.experiment_id,
            status=info.status,
            start_time=int(info.start_time or 0),
            end_time=info.end_time,
            artifact_uri=info.artifact_uri,
            params=dict(data.params),
            tags=dict(data.tags),
            metrics=dmgl_metrics(dict(data.metrics)),
        )


def no_such_run(run_id: str, uri: str) -> str:
    return f"run {run_id!r} does not exist in {uri}; `dmgl runs list` lists the runs (`--role all` with seeds)"


# How a user may name a run (:meth:`Tracker.find_run`): its whole id, a prefix of it, or its name.
RUN_ID_PREFIX_MIN = 6
FULL_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
RUN_ID_PREFIX = re.compile(r"^[0-9a-f]{1,31}$")
# Names that need no quoting in a search filter (dmgl's own names and MLflow's generated ones fit).
SEARCHABLE_NAME = re.compile(r"^[A-Za-z0-9._:+ -]{1,250}$")
SHOWN_CANDIDATES = 5


def candidate_line(run: RunRecord) -> str:
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.start_time / 1000)) if run.start_time else "?"
    return f"{run.run_id}  {run.name}  ({run.role or 'not dmgl'}, {run.status.lower()}, started {started} UTC)"
