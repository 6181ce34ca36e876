"""The only module that talks to MLflow.

A command makes one :class:`Tracker` (one MLflow client) and passes it down; the rest of dmgl sees runs as
:class:`RunRecord` values, never as MLflow objects. Layout (also in ARCHITECTURE.md, "Tracking layout"):

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
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import random
import re
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# reading a run's config.yaml or checkpoint must not draw MLflow's "Downloading artifacts" bars
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow.artifacts  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.data.dataset_source_registry import get_dataset_source_from_json  # noqa: E402
from mlflow.data.meta_dataset import MetaDataset  # noqa: E402
from mlflow.entities import (  # noqa: E402
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunTag,
    ViewType,
)
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import Model, ModelSignature  # noqa: E402
from mlflow.pyfunc import PyFuncModel  # noqa: E402
from mlflow.pyfunc import load_model as load_pyfunc_model  # noqa: E402
from mlflow.pyfunc import save_model as save_pyfunc_model  # noqa: E402
from mlflow.pyfunc.model import PythonModel  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.types import Schema, TensorSpec  # noqa: E402

from dmgl_cli import __version__  # noqa: E402
from dmgl_cli.errors import (  # noqa: E402
    DmglError,  # noqa: E402
    Interrupted,
    Stopped,
)
from dmgl_cli.paths import (  # noqa: E402
    default_artifacts_dir,
    default_tracking_uri,
    ensure_registry,
    link_or_copy,
    resolve_tracking_uri,
    warn_if_shared_sqlite,
)
from dmgl_cli.provenance import environment_tags, git_commit, process_alive  # noqa: E402

if TYPE_CHECKING:
    from dmgl_cli.checkpoint import CheckpointWriter

for _noisy in ("mlflow", "alembic", "sqlalchemy"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
logger = logging.getLogger("dmgl")

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # a run's description, markdown, shown on its page in the UI
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a logged model: its registered versions (as MLflow's own register)
DATASET_CONTEXT_TAG = "mlflow.data.context"
_BATCH = 100  # MLflow accepts up to 1000 metrics / 100 params per log_batch call


def local_path(uri: str) -> Path | None:
    """The folder behind a ``file:`` (or plain path) artifact URI; None for remote stores."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _with_retries(call, *args, **kwargs):
    """SQLite allows one writer at a time; a writer that waited past the busy timeout is retried, not lost."""
    delay = 0.05
    for attempt in range(12):
        try:
            return call(*args, **kwargs)
        except MlflowException as exc:
            if "database is locked" not in str(exc) or attempt == 11:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable: the last attempt returns or raises")


# ------------------------------------------------------------------------------------------------ metric names
# dmgl's metric keys (``val_acc``, ``final_test_acc``, ``alpha``, ``train_loss``) are its own everywhere but in
# MLflow, where they are grouped so that the UI shows one chart section per group (a section is the text before the
# name's last "/"): the text before a key's first "_" is its section (``val_acc`` -> ``val/acc``, ``final_test_acc``
# -> ``final/test_acc``, ``alpha_hypergradient`` -> ``alpha/hypergradient``, a method's ``agm_score_audio`` ->
# ``agm/score_audio``), and the keys below are placed by hand. Only this module converts: writing maps to the MLflow
# name, reading (RunRecord.metrics, metric_history, logged_steps) maps back, and a run recorded before the names were
# grouped (flat ``val_acc``) reads the same.
_PLACED = {
    "alpha": "alpha/value",
    "lr": "train/lr",
    "epoch_seconds": "train/epoch_seconds",
    "best_epoch": "val/best_epoch",  # the epoch chosen on validation so far
}
_PLACED_BACK = {name: key for key, name in _PLACED.items()}


def mlflow_metric_name(key: str) -> str:
    """The MLflow name of one of dmgl's metric keys (:func:`dmgl_metric_name` inverts it)."""
    if key in _PLACED:
        return _PLACED[key]
    section, underscore, rest = key.partition("_")
    name = f"{section}/{rest}"
    if not (underscore and section and rest) or "/" in key or name in _PLACED_BACK:
        return key  # nothing to group by, or a key (say a method's "train_lr") that would read back as another
    return name


def dmgl_metric_name(name: str) -> str:
    """dmgl's key for an MLflow metric name; a flat name (a run recorded before the names were grouped) is its own."""
    if name in _PLACED_BACK:
        return _PLACED_BACK[name]
    section, slash, rest = name.partition("/")
    return f"{section}_{rest}" if slash and section and rest else name


# ``metrics.final_val_acc`` or ``metrics.`final_val_acc` `` in a search filter (a grouped name has a "/" and is kept)
_METRIC_IN_FILTER = re.compile(r"metrics\.(`?)([A-Za-z0-9_]+)\1(?![/\w])")


def _dmgl_metrics(logged: dict[str, float]) -> dict[str, float]:
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
            metrics=_dmgl_metrics(dict(data.metrics)),
        )


def _no_such_run(run_id: str, uri: str) -> str:
    return f"run {run_id!r} does not exist in {uri}; `dmgl runs list` lists the runs (`--role all` with seeds)"


# How a user may name a run (:meth:`Tracker.find_run`): its whole id, a prefix of it, or its name.
RUN_ID_PREFIX_MIN = 6
_FULL_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_RUN_ID_PREFIX = re.compile(r"^[0-9a-f]{1,31}$")
# Names that need no quoting in a search filter (dmgl's own names and MLflow's generated ones fit).
_SEARCHABLE_NAME = re.compile(r"^[A-Za-z0-9._:+ -]{1,250}$")
SHOWN_CANDIDATES = 5


def _candidate_line(run: RunRecord) -> str:
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.start_time / 1000)) if run.start_time else "?"
    return f"{run.run_id}  {run.name}  ({run.role or 'not dmgl'}, {run.status.lower()}, started {started} UTC)"


class Tracker:
    def __init__(self, tracking_uri: str | None = None):
        self.uri = resolve_tracking_uri(tracking_uri)
        self.default_store = self.uri == default_tracking_uri()
        self._checkpoint_writer: CheckpointWriter | None = None  # made by the first save_checkpoint (it needs torch)
        if self.default_store:
            ensure_registry()
        try:
            database = sqlite_path(self.uri)
            if database is None:
                self.client = MlflowClient(tracking_uri=self.uri)
            else:
                # Several dmgl processes may open a new store at once and only one may create its tables (MLflow
                # builds them when the client is made), so that happens under a file lock. WAL lets readers (the
                # UI, report) work while a training process writes.
                database.parent.mkdir(parents=True, exist_ok=True)
                warn_if_shared_sqlite(database, "MLflow store")
                with _exclusive(database.with_name(database.name + ".lock")):
                    with sqlite3.connect(database, timeout=60) as connection:
                        connection.execute("PRAGMA journal_mode=WAL")
                    self.client = MlflowClient(tracking_uri=self.uri)
        except MlflowException as exc:
            raise DmglError(f"cannot open the MLflow store {self.uri} ({exc.message})") from None
        except (OSError, sqlite3.Error) as exc:
            raise DmglError(f"cannot open the MLflow store {self.uri} ({exc})") from None

    # ------------------------------------------------------------------------------------------- experiments
    def experiment_id(self, name: str, create: bool = True) -> str:
        try:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            if not create:
                raise DmglError(f"no MLflow experiment named {name!r} in {self.uri}")
            location = None
            if self.default_store:
                location = (default_artifacts_dir() / name).as_uri()
            return self.client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: "custom_model_development"}
            )
        except MlflowException as exc:
            if "already exists" in str(exc):  # another process created it between our lookup and create
                existing = self.client.get_experiment_by_name(name)
                assert existing is not None  # creating it failed because it exists
                return existing.experiment_id
            raise DmglError(f"MLflow store {self.uri}: {exc.message}") from None

    # -------------------------------------------------------------------------------------------------- runs
    def start_run(self, experiment_id: str, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        tags = {"dmgl.version": __version__, **environment_tags(), **tags}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["dmgl.git_commit"] = commit
        if parent_id:
            tags[PARENT_TAG] = parent_id
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def get_run(self, run_id: str) -> RunRecord:
        try:
            return RunRecord.of(self.client.get_run(run_id))
        except MlflowException:
            raise DmglError(_no_such_run(run_id, self.uri)) from None

    def find_run(self, reference: str) -> RunRecord:
        """The run a user named: its whole id, a prefix of its id (at least :data:`RUN_ID_PREFIX_MIN` characters,
        as ``runs compare`` prints them) or its name. A reference that fits several runs, or none, is a DmglError
        listing the candidates (at most :data:`SHOWN_CANDIDATES`) or saying it matches nothing."""
        text = reference.strip()
        if _FULL_RUN_ID.match(text):
            try:
                return RunRecord.of(self.client.get_run(text))
            except MlflowException:
                pass  # not an id here; it may still be a name
        try:
            experiment_ids = list(self.experiments())
            found: dict[str, RunRecord] = {}
            if experiment_ids and _RUN_ID_PREFIX.match(text) and len(text) >= RUN_ID_PREFIX_MIN:
                # one more than is shown, to know that there are more
                for run in self.search(experiment_ids, f"attributes.run_id LIKE '{text}%'", SHOWN_CANDIDATES + 1):
                    found[run.run_id] = run
            if experiment_ids and _SEARCHABLE_NAME.match(text):
                for run in self.search(experiment_ids, f"attributes.run_name = '{text}'", SHOWN_CANDIDATES + 1):
                    found[run.run_id] = run
        except MlflowException as exc:
            raise DmglError(f"cannot search runs in the MLflow store {self.uri} ({exc.message})") from None
        if len(found) == 1:
            return next(iter(found.values()))
        if not found:
            short = (
                f"; an id prefix needs at least {RUN_ID_PREFIX_MIN} characters"
                if _RUN_ID_PREFIX.match(text) and len(text) < RUN_ID_PREFIX_MIN
                else ""
            )
            raise DmglError(
                f"run {reference!r} does not exist in {self.uri}: no run has that id, an id starting with it or "
                f"that name{short}; `dmgl runs list --role all` lists the runs"
            )
        candidates = sorted(found.values(), key=lambda r: (-r.start_time, r.run_id))
        shown = "\n".join(f"  {_candidate_line(run)}" for run in candidates[:SHOWN_CANDIDATES])
        more = "\n  ... and more" if len(candidates) > SHOWN_CANDIDATES else ""
        raise DmglError(
            f"{reference!r} fits more than one run; give more of the id (or the whole id):\n{shown}{more}\n"
            "`dmgl runs list --role all` lists the runs"
        )

    def children(self, parent_id: str) -> list[RunRecord]:
        run = self.get_run(parent_id)
        runs = self.search([run.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=10000)
        return sorted(runs, key=lambda r: int(r.tags.get("dmgl.seed", 0)))

    def search(self, experiment_ids: list[str], filter_string: str = "", max_results: int = 50000) -> list[RunRecord]:
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                experiment_ids,
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=min(max_results, 50000),
                page_token=token,
            )
            runs.extend(RunRecord.of(run) for run in page)
            token = page.token
            if not token or len(runs) >= max_results:
                return runs

    # ------------------------------------------------------------------ read helpers for `dmgl report` / `sweep`
    def experiments(self, names: list[str] | None = None) -> dict[str, str]:
        """{experiment id: name} of the named experiments (DmglError naming one that is missing), or of all."""
        try:
            if names:
                found = {}
                for name in names:
                    experiment = self.client.get_experiment_by_name(name)
                    if experiment is None:
                        known = ", ".join(sorted(e.name for e in self.client.search_experiments())) or "(none)"
                        raise DmglError(f"no MLflow experiment named {name!r} in {self.uri}; experiments: {known}")
                    found[experiment.experiment_id] = experiment.name
                return found
            return {e.experiment_id: e.name for e in self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)}
        except MlflowException as exc:
            raise DmglError(f"cannot read experiments from the MLflow store {self.uri} ({exc.message})") from None

    def experiment_name(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).name

    def find_runs(self, experiment_ids: list[str], filter_string: str = "") -> list[RunRecord]:
        """:meth:`search`, with a malformed filter reported as a DmglError. Metrics in the filter are named as dmgl
        names them (``metrics.final_val_acc``) and translated to their MLflow names (``final/val_acc``)."""
        filter_string = _METRIC_IN_FILTER.sub(
            lambda match: f"metrics.`{mlflow_metric_name(match.group(2))}`", filter_string
        )
        try:
            return self.search(experiment_ids, filter_string)
        except MlflowException as exc:
            raise DmglError(f"MLflow could not search runs with filter {filter_string!r}: {exc.message}") from None

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of one metric (dmgl's key), by step; the last value logged wins for a repeated step."""
        name = mlflow_metric_name(key)
        # A run recorded before the names were grouped has the flat name; one resumed across the change, both.
        flat = self.client.get_metric_history(run_id, key) if name != key else []
        grouped = self.client.get_metric_history(run_id, name)
        by_step = {m.step: m.value for m in sorted(flat, key=lambda m: m.timestamp)}
        by_step.update({m.step: m.value for m in sorted(grouped, key=lambda m: m.timestamp)})
        return sorted(by_step.items())

    def set_status(self, run_id: str, status: str) -> None:
        """Set a run's status without ending it, e.g. SCHEDULED: a sweep run that waits for workers."""
        self.client.update_run(run_id, status=status)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), _BATCH):
            _with_retries(self.client.log_batch, run_id, params=items[start : start + _BATCH])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        _with_retries(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(
        self,
        run_id: str,
        metrics: dict[str, float],
        step: int = 0,
        *,
        model_id: str | None = None,
        dataset: DatasetRecord | None = None,
    ) -> None:
        """Log dmgl's metric keys under their MLflow names (:func:`mlflow_metric_name`). ``model_id`` links the
        values to a logged model (they show on its page), ``dataset`` to the dataset they were measured on, as
        :meth:`log_dataset` records it."""
        now = int(time.time() * 1000)
        name, digest = (dataset.name, dataset.digest) if dataset is not None else (None, None)
        items = [
            Metric(mlflow_metric_name(k), float(v), now, step, model_id, dataset_name=name, dataset_digest=digest)
            for k, v in metrics.items()
        ]
        for start in range(0, len(items), 1000):
            _with_retries(self.client.log_batch, run_id, metrics=items[start : start + 1000])

    def logged_steps(self, run_id: str) -> set[tuple[str, int]]:
        """Every (metric key, step) already recorded on a run — what a resumed run must not log again."""
        self.get_run(run_id)  # a DmglError for a run that does not exist
        seen = set()
        for name in self.client.get_run(run_id).data.metrics:
            for metric in self.client.get_metric_history(run_id, name):
                seen.add((dmgl_metric_name(name), metric.step))
        return seen

    def end_run(self, run_id: str, status: str) -> None:
        _with_retries(self.client.set_terminated, run_id, status=status)

    @contextmanager
    def run(self, run_id: str) -> Iterator[str]:
        """Work recorded into ``run_id``: leaving by a stop (Ctrl-C, SIGTERM, a pruned sweep trial) marks the run
        KILLED (resumable), by an error FAILED; both re-raise. A normal exit leaves the status to the caller, who
        ends the run FINISHED once its results are logged. Either way the checkpoint being written in the background
        is on disk first: a KILLED run resumes from its last checkpoint."""
        try:
            yield run_id
            self.wait_for_checkpoints(release=True)  # a write that failed fails the run
        except (KeyboardInterrupt, Interrupted, Stopped):
            try:
                self._settle_checkpoints(run_id)
            finally:
                self.end_run(run_id, "KILLED")
            raise
        except BaseException:
            try:
                self._settle_checkpoints(run_id)
            finally:
                self.end_run(run_id, "FAILED")
            raise

    def mark_running(self, run_id: str) -> None:
        """A resumed run: RUNNING again, owned by this process."""
        self.client.update_run(run_id, status="RUNNING")
        self.set_tags(
            run_id,
            {
                k: v
                for k, v in environment_tags().items()
                if k in ("dmgl.host", "dmgl.pid", "dmgl.pid_start", "dmgl.heartbeat")
            },
        )

    def stale_runs(self, experiment_ids: list[str], older_than_minutes: float = 60.0) -> list[RunRecord]:
        """Runs marked RUNNING whose process is gone: on this host, the recorded pid no longer runs; on another
        host (where the pid cannot be checked), no heartbeat for ``older_than_minutes``."""
        host, now = platform.node(), time.time()
        stale = []
        for run in self.search(experiment_ids, "attributes.status = 'RUNNING'"):
            tags = run.tags
            if "dmgl.role" not in tags:
                continue
            if tags.get("dmgl.host") == host and tags.get("dmgl.pid"):
                if not process_alive(int(tags["dmgl.pid"]), tags.get("dmgl.pid_start") or None):
                    stale.append(run)
            elif now - float(tags.get("dmgl.heartbeat", run.start_time / 1000)) > older_than_minutes * 60:
                stale.append(run)
        return stale

    def warn_stale(self, experiment_ids: list[str]) -> list[RunRecord]:
        stale = self.stale_runs(experiment_ids)
        if stale:
            names = ", ".join(f"{r.run_id} ({r.name})" for r in stale[:5])
            logger.warning(
                "%d run(s) are marked RUNNING but their process is gone: %s. `dmgl train --resume RUN_ID` continues "
                "one; `dmgl runs reconcile` marks them KILLED.",
                len(stale),
                names,
            )
        return stale

    def status(self, run_id: str) -> str:
        return self.get_run(run_id).status

    # ---------------------------------------------------------------------------------------------- artifacts
    def _artifact_dir(self, run_id: str) -> Path | None:
        return local_path(self.get_run(run_id).artifact_uri)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        self.client.log_figure(run_id, figure, artifact_file)

    def log_file(self, run_id: str, path: Path, folder: str | None = None) -> None:
        """Copy the local file ``path`` into the run's artifacts, under ``folder`` (e.g. ``explain``) if given."""
        try:
            _with_retries(self.client.log_artifact, run_id, str(path), folder)
        except (MlflowException, OSError) as exc:
            raise DmglError(f"cannot log {path.name} to run {run_id} ({exc})") from None

    def read_text(self, run_id: str, artifact_file: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(run_id, artifact_file, tmp)
            except (MlflowException, OSError):
                raise DmglError(
                    f"run {run_id} has no artifact {artifact_file!r}; was it made by `dmgl train`?"
                ) from None
            return Path(path).read_text()

    def save_checkpoint(self, run_id: str, name: str, state: dict[str, Any]) -> None:
        """``checkpoints/<name>.pt`` on the run, written atomically in place when the artifact store is local. It is
        written in the background (:class:`~dmgl_cli.checkpoint.CheckpointWriter`): this returns once ``state`` is
        copied, having waited only for the previous checkpoint's write. Reading a checkpoint here and leaving
        :meth:`run` wait for the write; anyone else calls :meth:`wait_for_checkpoints`."""
        from dmgl_cli.checkpoint import CheckpointWriter, save_checkpoint  # torch: only what trains loads it

        if self._checkpoint_writer is None:
            self._checkpoint_writer = CheckpointWriter()
        folder = self._artifact_dir(run_id)
        what = f"checkpoint checkpoints/{name}.pt of run {run_id}"
        if folder is not None:
            path = folder / "checkpoints" / f"{name}.pt"
            self._checkpoint_writer.submit(lambda snapshot: save_checkpoint(path, snapshot), state, what)
            return

        def upload(snapshot: dict[str, Any]) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{name}.pt"
                save_checkpoint(path, snapshot)
                _with_retries(self.client.log_artifact, run_id, str(path), "checkpoints")

        self._checkpoint_writer.submit(upload, state, what)

    def wait_for_checkpoints(self, release: bool = False) -> None:
        """Block until the checkpoint being written is on disk; a DmglError if its write failed. ``release`` also
        frees the memory kept for the next checkpoint's copy (a run that ends)."""
        if self._checkpoint_writer is not None:
            if release:
                self._checkpoint_writer.release()
            else:
                self._checkpoint_writer.wait()

    def _settle_checkpoints(self, run_id: str) -> None:
        """:meth:`wait_for_checkpoints` while another error is already on its way: a failed write is only logged."""
        try:
            self.wait_for_checkpoints(release=True)
        except DmglError as exc:
            logger.warning("%s; run %s resumes from the checkpoint before it", exc, run_id)

    def load_checkpoint(self, run_id: str, name: str) -> dict[str, Any]:
        from dmgl_cli.checkpoint import load_checkpoint  # torch: only what trains or scores loads it

        self.wait_for_checkpoints()
        folder = self._artifact_dir(run_id)
        if folder is not None:
            path = folder / "checkpoints" / f"{name}.pt"
            if not path.is_file():
                raise DmglError(f"run {run_id} has no checkpoint checkpoints/{name}.pt")
            return load_checkpoint(path)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(run_id, f"checkpoints/{name}.pt", tmp)
            except (MlflowException, OSError):
                raise DmglError(f"run {run_id} has no checkpoint checkpoints/{name}.pt") from None
            return load_checkpoint(Path(path))

    # ---------------------------------------------------------------------------------- MLflow's own features
    def set_description(self, run_id: str, markdown: str) -> None:
        """The run's description (``mlflow.note.content``): markdown shown on its page in the UI."""
        self.set_tags(run_id, {NOTE_TAG: markdown})

    @staticmethod
    def artifact_link(run_id: str, artifact_file: str) -> str:
        """A link to one of a run's artifacts that works inside a run's description: relative to the UI's own
        address, so it holds for ``dmgl ui``, a tracking server and a static prefix alike."""
        return f"get-artifact?path={artifact_file}&run_uuid={run_id}"

    def log_dataset(self, run_id: str, dataset: DatasetRecord, context: str = "training") -> None:
        """Record ``dataset`` as the run's input (the Dataset column of the runs table): an ``mlflow.data``
        MetaDataset, source = the prepared folder, digest = the manifest's checksum (its first
        :data:`DATASET_DIGEST_LENGTH` digits), schema = one tensor per modality, profile = classes, split sizes and
        the whole checksum."""
        source = get_dataset_source_from_json(json.dumps({"uri": str(dataset.folder)}), source_type="local")
        schema = (
            Schema(
                [
                    TensorSpec(np.dtype(spec["dtype"]), (-1, *spec["shape"]), name)
                    for name, spec in dataset.modalities.items()
                ]
            )
            if dataset.modalities
            else None
        )
        described = MetaDataset(source, name=dataset.name, digest=dataset.digest, schema=schema).to_dict()
        entity = Dataset(
            name=described["name"],
            digest=described["digest"],
            source_type=described["source_type"],
            source=described["source"],
            schema=described.get("schema"),
            profile=json.dumps(dataset.profile) if dataset.profile else None,
        )
        _with_retries(
            self.client.log_inputs, run_id, datasets=[DatasetInput(entity, [InputTag(DATASET_CONTEXT_TAG, context)])]
        )

    def _checkpoint_file(self, run_id: str, name: str, tmp: str) -> Path:
        self.wait_for_checkpoints()
        folder = self._artifact_dir(run_id)
        if folder is not None:
            path = folder / "checkpoints" / f"{name}.pt"
            if not path.is_file():
                raise DmglError(f"run {run_id} has no checkpoint checkpoints/{name}.pt")
            return path
        try:
            return Path(self.client.download_artifacts(run_id, f"checkpoints/{name}.pt", tmp))
        except (MlflowException, OSError):
            raise DmglError(f"run {run_id} has no checkpoint checkpoints/{name}.pt") from None

    def log_model(
        self,
        run_id: str,
        *,
        config_yaml: str,
        modalities: dict[str, dict[str, Any]],
        classes: list[str],
        step: int,
        tags: dict[str, str] | None = None,
        checkpoint: str = "best",
    ) -> str:
        """Log the run's ``checkpoints/<checkpoint>.pt`` as an MLflow 3 logged model and return its model id.

        A pyfunc model (:class:`DmglPyfuncModel`), not ``mlflow.pytorch``: the network takes a dict of modalities
        and returns a ``ModelOutput``, and what the trainer scores is the method's ``predict`` of its ``forward``
        after the evaluation transform (frame sampling) — none of which the pytorch flavour's pyfunc can serve. The
        model holds the checkpoint, the run's config.yaml and the modality specs, and rebuilds the network as
        ``dmgl eval`` does (no pickled torch module). Its input is the prepared arrays, ``{modality: array}``; its
        output the fused scores, ``[N, classes]``. Requirements are given, never inferred, so logging reads no
        package index (it works offline). The model is the run's output (the Models column) at ``step``, named after
        the run (``.`` written ``_``: MLflow refuses it in a model's name), with the run's params. Whatever goes
        wrong is a DmglError, and a model left half-written is marked FAILED.

        One copy of the weights: where the run's artifacts and the model's are both local files, the model's
        checkpoint (``artifacts/<checkpoint>.pt`` in the model) is a hard link to the run's ``checkpoints/<checkpoint>.pt``
        (a copy only where the filesystem cannot link them); the model stays whole if the run's file is later replaced
        or deleted. A remote store holds its own copy in the model."""
        import torch  # already loaded by the trainer; here only for its version

        run = self.client.get_run(run_id)
        signature = ModelSignature(
            inputs=Schema(
                [TensorSpec(np.dtype(spec["dtype"]), (-1, *spec["shape"]), name) for name, spec in modalities.items()]
            ),
            outputs=Schema([TensorSpec(np.dtype("float32"), (-1, len(classes)))]),
        )
        requirements = [
            f"dmgl=={__version__}",
            f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={np.__version__}",
        ]
        try:
            logged = _with_retries(
                self.client.create_logged_model,
                run.info.experiment_id,
                name=re.sub(r"[/:.%\"']", "_", run.info.run_name or "model"),
                source_run_id=run_id,
                tags={"dmgl.checkpoint": checkpoint, **(tags or {})},
                params=dict(run.data.params),
                model_type="dmgl",
            )
        except MlflowException as exc:
            raise DmglError(f"MLflow store {self.uri} cannot hold logged models ({exc.message})") from None
        model_id = logged.model_id
        model_folder = local_path(logged.artifact_location) if self._artifact_dir(run_id) is not None else None
        try:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                weights = self._checkpoint_file(run_id, checkpoint, tmp)
                if model_folder is not None:
                    # The model is saved around an empty stand-in of the same name, which the run's checkpoint then
                    # replaces as a hard link: the weights are neither copied to a temporary folder nor stored twice.
                    stand_in = folder / "stand-in" / weights.name
                    stand_in.parent.mkdir()
                    stand_in.touch()
                    weights_source = stand_in
                else:
                    weights_source = weights
                (folder / "config.yaml").write_text(config_yaml)
                (folder / "model_spec.json").write_text(
                    json.dumps({"modalities": modalities, "classes": classes}, indent=2, sort_keys=True)
                )
                (folder / "dmgl_model.py").write_text(_MODEL_CODE)
                with warnings.catch_warnings():
                    # The signature describes the input; an input example (arrays of real samples) is not stored.
                    warnings.filterwarnings("ignore", message=".*input example was not provided")
                    save_pyfunc_model(
                        str(folder / "model"),
                        python_model=str(folder / "dmgl_model.py"),
                        artifacts={
                            "checkpoint": str(weights_source),
                            "config": str(folder / "config.yaml"),
                            "spec": str(folder / "model_spec.json"),
                        },
                        mlflow_model=Model(
                            artifact_path=logged.artifact_location,
                            model_uuid=model_id,
                            run_id=run_id,
                            model_id=model_id,
                        ),
                        signature=signature,
                        pip_requirements=requirements,
                        metadata={"dmgl_version": __version__, "checkpoint": checkpoint},
                        model_config={"device": ""},  # "" = the recorded train.device; load_model can override it
                    )
                _with_retries(self.client.log_model_artifacts, model_id, str(folder / "model"))
                if model_folder is not None:
                    saved = Model.load(str(folder / "model")).flavors["python_function"]["artifacts"]
                    link_or_copy(weights, model_folder / saved["checkpoint"]["path"])
            _with_retries(self.client.log_outputs, run_id, [LoggedModelOutput(model_id, step)])
            _with_retries(self.client.finalize_logged_model, model_id, LoggedModelStatus.READY)
        except BaseException as exc:
            self.client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
            if isinstance(exc, (MlflowException, OSError)):
                raise DmglError(f"cannot log the model of run {run_id} ({exc})") from None
            raise
        return model_id

    def logged_model_id(self, run_id: str) -> str | None:
        """The READY logged model that the run output last (the latest step), or None."""
        try:
            outputs = self.client.get_run(run_id).outputs
        except MlflowException:
            raise DmglError(_no_such_run(run_id, self.uri)) from None
        for output in sorted(outputs.model_outputs if outputs else [], key=lambda o: o.step, reverse=True):
            try:
                if self.client.get_logged_model(output.model_id).status == LoggedModelStatus.READY:
                    return output.model_id
            except MlflowException:
                continue  # deleted
        return None

    def load_model(self, model_id: str, device: str | None = None) -> PyFuncModel:
        """A logged model as ``mlflow.pyfunc.load_model`` gives it (``predict({modality: array})`` -> scores),
        read through this tracker's store; ``device`` overrides the recorded ``train.device``."""
        try:
            location = self.client.get_logged_model(model_id).artifact_location
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=self.uri)
        except MlflowException as exc:
            raise DmglError(f"cannot read logged model {model_id} from {self.uri} ({exc.message})") from None
        return load_pyfunc_model(local, model_config={"device": device} if device else None)

    def register_model(
        self, run_id: str, name: str, *, tags: dict[str, str] | None = None, description: str | None = None
    ) -> tuple[str, str, str]:
        """Put the run's logged model in the Model Registry as a new version of ``name`` (created if needed);
        returns (registered name, version, model URI)."""
        model_id = self.logged_model_id(run_id)
        if model_id is None:
            raise DmglError(
                f"run {run_id} has no logged model to register (runs trained before dmgl logged models have none; "
                "`dmgl train --resume` does not add one to a finished run)"
            )
        source = f"models:/{model_id}"
        try:
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            version = self.client.create_model_version(
                name, source, run_id=run_id, tags=tags, description=description, model_id=model_id
            )
            registered = json.loads(self.client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG) or "[]")
            registered.append({"name": version.name, "version": version.version})
            self.client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(registered)})
        except MlflowException as exc:
            raise DmglError(f"cannot register the model of run {run_id} as {name!r} ({exc.message})") from None
        return version.name, str(version.version), source


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


# The model's code, stored with it ("models from code"): loading runs it, and nothing is unpickled.
_MODEL_CODE = """\
import mlflow.models

from dmgl_cli.tracking import DmglPyfuncModel

mlflow.models.set_model(DmglPyfuncModel())
"""


class DmglPyfuncModel(PythonModel):
    """A dmgl checkpoint as an MLflow pyfunc model (:meth:`Tracker.log_model` writes it).

    ``predict({modality: array})`` takes the prepared arrays of N samples (the dtypes and shapes of the
    dataset's manifest, e.g. ``dataset.split("test").inputs``) and returns the method's fused scores, float32
    ``[N, classes]`` (``argmax`` indexes the classes in ``model_spec.json``), exactly as the trainer scores a
    split: the evaluation transform, ``method.forward`` in eval mode and ``method.predict``, in batches of
    ``train.eval_batch_size``. ``mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})`` overrides the
    recorded ``train.device``. Loading needs dmgl installed (a pip requirement of the model); the model's code
    is the three lines of ``_MODEL_CODE``, and nothing is unpickled.
    """

    # MLflow validates a predict input by its type hint when there is one, and warns when there is none (as the class
    # is made: on every import of this module). A dict of modality arrays is no type it reads, and the logged
    # signature validates the input instead; MLflow's own flag for classes it must not wrap turns both off.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        # dmgl's training code, imported only where a model is loaded (it does not import this module).
        from dmgl_cli.checkpoint import load_checkpoint, load_model_state
        from dmgl_cli.config import config_from_yaml
        from dmgl_cli.data.transforms import build_transforms, model_input_specs
        from dmgl_cli.device import pick_device
        from dmgl_cli.methods import build_method

        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        config = config_from_yaml(Path(context.artifacts["config"]).read_text())
        overrides = context.model_config or {}
        self.config, self.modalities, self.num_classes = config, spec["modalities"], len(spec["classes"])
        self.device = pick_device(overrides.get("device") or config.train.device)
        self.method = build_method(config)
        model = self.method.build_model(model_input_specs(self.modalities, config), self.num_classes)
        state = load_checkpoint(Path(context.artifacts["checkpoint"]))
        load_model_state(model, state["model"], "the logged model's checkpoint")
        self.model = model.to(self.device).eval()
        self.transform = build_transforms(self.modalities, config, training=False)

    def predict(self, context, model_input, params=None):
        import torch

        from dmgl_cli.device import autocast

        if not isinstance(model_input, dict):
            raise DmglError(f"a dmgl model predicts on {{modality: array}} with modalities {sorted(self.modalities)}")
        missing = sorted(set(self.modalities) - set(model_input))
        if missing:
            raise DmglError(f"missing modalities {missing}; the model takes {sorted(self.modalities)}")
        arrays = {m: np.asarray(model_input[m]) for m in self.modalities}
        total = len(next(iter(arrays.values())))
        size, transform = self.config.train.eval_batch_size, self.transform
        scores = []
        with torch.no_grad():
            for start in range(0, total, size):
                rows = np.arange(start, min(start + size, total))
                inputs = {m: torch.from_numpy(np.ascontiguousarray(a[rows])) for m, a in arrays.items()}
                if transform is not None:
                    inputs = transform(inputs, rows)
                inputs = {m: t.to(self.device) for m, t in inputs.items()}
                with autocast(self.device, self.config.train.amp):
                    output = self.method.forward(self.model, inputs, training=False)
                scores.append(self.method.predict(output).float().cpu().numpy())
        if not scores:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return np.concatenate(scores)
