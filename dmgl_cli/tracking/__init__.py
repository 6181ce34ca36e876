"""The only package that talks to MLflow.

A command makes one :class:`Tracker` (one MLflow client) and passes it down; the rest of dmgl sees runs as
:class:`RunRecord` values, never as MLflow objects. Its modules, by job: ``store`` (the URI, the client, the probe of
a tracking server), ``records`` (RunRecord, DatasetRecord, metric names), ``queries`` (reading runs), ``writing``
(what a run writes), ``models`` (logged models, the Model Registry), ``pyfunc`` (the pyfunc model,
:class:`DmglPyfuncModel`), ``store_reader`` (a local SQLite store read with the standard library) and ``journal``
(what a run writes to a tracking server goes to local disk first and is sent in the background, so that an outage
never holds training up).

Importing this package does not import MLflow (that takes seconds): each module imports it where it is used, the
client is made on first use (:attr:`Tracker.client`), and ``DmglPyfuncModel`` is imported on first access. On an
existing local SQLite store the reads of ``dmgl runs list/show/compare`` are answered by ``store_reader`` without
MLflow (:mod:`dmgl_cli.tracking.queries`). Layout (also in ARCHITECTURE.md, "Tracking layout"):

* backend ``sqlite:///<registry>/mlflow.db`` with artifacts under ``<registry>/artifacts`` unless
  ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` names another store or a server;
* one experiment per dataset (or ``--experiment``), tagged ``mlflow.experimentKind=custom_model_development``
  so the MLflow 3 UI shows training runs, not its GenAI view;
* ``dmgl train`` = one parent run + one child run per seed; params = the settings that apply to the run
  (``config.recorded_params``); metrics per epoch with ``step=epoch``, named by section in MLflow (``val/acc``; see
  :func:`mlflow_metric_name`) while dmgl reads and writes its own keys (``val_acc``); artifacts ``config.yaml``,
  ``checkpoints/{last,best}.pt``, ``alpha.csv``, ``alpha.png``, ``final_metrics.json``; tags ``dmgl.*``; the
  prepared dataset as the run's input (:meth:`Tracker.log_dataset`); the best checkpoint as an MLflow 3 logged model
  (:meth:`Tracker.log_model`, a pyfunc model), which ``dmgl register`` puts in the Model Registry; the parent's
  description (``mlflow.note.content``) is a markdown summary.

Run ids are always passed explicitly (MlflowClient); the fluent API's global active run is never used, so several
runs can be written from one process.

The local SQLite store (the default) and a ``file:`` store are written directly, exactly as before the journal: a
file on this machine does not go away, and a write there costs less than journaling it. A tracking server (http,
https) and any other store that is not a local file (a database server) are written through the journal.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dmgl_cli.errors import DmglError
from dmgl_cli.tracking.models import ModelStore
from dmgl_cli.tracking.records import (
    DATASET_DIGEST_LENGTH,
    PARENT_TAG,
    RUN_ID_PREFIX_MIN,
    SHOWN_CANDIDATES,
    DatasetRecord,
    RunRecord,
    dmgl_metric_name,
    mlflow_metric_name,
)
from dmgl_cli.tracking.store import (
    DATASET_CONTEXT_TAG,
    EXPERIMENT_KIND_TAG,
    MODEL_VERSIONS_TAG,
    NOTE_TAG,
    check_reachable,
    local_path,
    sqlite_path,
)

if TYPE_CHECKING:
    from dmgl_cli.tracking.pyfunc import DmglPyfuncModel


def __getattr__(name: str) -> type[DmglPyfuncModel]:
    # DmglPyfuncModel subclasses MLflow's PythonModel: imported on first use, so that importing this package (and
    # reading a local store) does not load MLflow, which takes seconds. A logged model's code imports it from here.
    if name == "DmglPyfuncModel":
        from dmgl_cli.tracking.pyfunc import DmglPyfuncModel

        return DmglPyfuncModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Tracker(ModelStore):
    """One MLflow client on one store: reading runs (:class:`~dmgl_cli.tracking.queries.RunQueries`), writing them
    (:class:`~dmgl_cli.tracking.writing.RunWriting`), logged models (:class:`~dmgl_cli.tracking.models.ModelStore`);
    made with the store's URI (``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the registry's SQLite file)."""


@dataclass(frozen=True)
class SyncedRun:
    """One journal sent by :func:`sync_journals`: records sent, and records left (the server went away again)."""

    run_id: str
    sent: int
    left: int


@dataclass(frozen=True)
class Synced:
    uri: str
    runs: list[SyncedRun]

    @property
    def summary(self) -> str:
        if not self.runs:
            return f"no journal of {self.uri} waits to be sent"
        sent = sum(r.sent for r in self.runs)
        return f"sent {sent} record(s) of {len(self.runs)} run(s) to {self.uri}"


def sync_journals(tracking_uri: str | None = None) -> Synced:
    """``dmgl runs sync``: send every journal of the store left in the registry (by processes that ended while
    the server was away); a DmglError if the server goes away again before all are sent."""
    tracker = Tracker(tracking_uri)
    if not tracker.journaled:
        raise DmglError(
            f"{tracker.uri} is a local store, written directly: it keeps no journal; `dmgl runs sync` sends the "
            "journals of a tracking server (--tracking-uri http://...)"
        )
    runs = [SyncedRun(run_id, sent, left) for run_id, sent, left in tracker.sync_journals()]
    left = tracker.close(patience_s=0)
    if left:
        raise DmglError(
            f"the tracking server {tracker.uri} went away again: {left} record(s) still wait in the journal; "
            "run `dmgl runs sync` again once it is back"
        )
    return Synced(tracker.uri, runs)


class RunRecorder:
    """A :class:`dmgl_cli.train.RunSink` writing to one MLflow run; skips (key, step) pairs already logged."""

    def __init__(self, tracker: Tracker, run_id: str, already_logged: Iterable[tuple[str, int]] = ()):
        self.tracker, self.run_id = tracker, run_id
        self.already_logged = set(already_logged)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if (k, step) not in self.already_logged}
        if fresh:
            self.tracker.log_metrics(self.run_id, fresh, step)
            self.already_logged.update((k, step) for k in fresh)
        self.tracker.set_tags(self.run_id, {"dmgl.heartbeat": str(int(time.time()))})

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> None:
        self.tracker.save_checkpoint(self.run_id, name, state)


__all__ = [
    "DATASET_CONTEXT_TAG",
    "DATASET_DIGEST_LENGTH",
    "EXPERIMENT_KIND_TAG",
    "MODEL_VERSIONS_TAG",
    "NOTE_TAG",
    "PARENT_TAG",
    "RUN_ID_PREFIX_MIN",
    "SHOWN_CANDIDATES",
    "DatasetRecord",
    "Synced",
    "SyncedRun",
    "DmglPyfuncModel",
    "RunRecord",
    "RunRecorder",
    "Tracker",
    "check_reachable",
    "dmgl_metric_name",
    "local_path",
    "mlflow_metric_name",
    "sqlite_path",
    "sync_journals",
]
