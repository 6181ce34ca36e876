"""The only module that talks to MLflow.

A command makes one :class:`Tracker` (one MLflow client) and passes it down; the rest of dmgl sees runs as
:class:`RunRecord` values, never as MLflow objects. Layout (also in ARCHITECTURE.md, "Tracking layout"):

* backend ``sqlite:///<registry>/mlflow.db`` with artifacts under ``<registry>/artifacts`` unless
  ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` names another store or a server;
* one experiment per dataset (or ``--experiment``), tagged ``mlflow.experimentKind=custom_model_development``
  so the MLflow 3 UI shows training runs, not its GenAI view;
* ``dmgl train`` = one parent run + one child run per seed; params = the flattened resolved config; metrics per
  epoch with ``step=epoch``; artifacts ``config.yaml``, ``checkpoints/{last,best}.pt``, ``alpha.csv``,
  ``alpha.png``, ``final_metrics.json``; tags ``dmgl.*``.

Run ids are always passed explicitly (MlflowClient); the fluent API's global active run is never used, so several
runs can be written from one process.
"""

from __future__ import annotations

import fcntl
import logging
import os
import platform
import random
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag, ViewType  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from dmgl_cli import __version__  # noqa: E402
from dmgl_cli.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from dmgl_cli.errors import (  # noqa: E402
    DmglError,  # noqa: E402
    Interrupted,
    Stopped,
)
from dmgl_cli.paths import (  # noqa: E402
    default_artifacts_dir,
    default_tracking_uri,
    ensure_registry,
    resolve_tracking_uri,
    warn_if_shared_sqlite,
)
from dmgl_cli.provenance import environment_tags, git_commit, process_alive  # noqa: E402

for _noisy in ("mlflow", "alembic", "sqlalchemy"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
logger = logging.getLogger("dmgl")

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
PARENT_TAG = "mlflow.parentRunId"
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
    metrics: dict[str, float] = field(default_factory=dict)  # the latest value of each metric

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
            metrics=dict(data.metrics),
        )


class Tracker:
    def __init__(self, tracking_uri: str | None = None):
        self.uri = resolve_tracking_uri(tracking_uri)
        self.default_store = self.uri == default_tracking_uri()
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
            raise DmglError(f"run {run_id!r} does not exist in {self.uri}; `dmgl ui` lists the runs") from None

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
        """:meth:`search`, with a malformed filter reported as a DmglError."""
        try:
            return self.search(experiment_ids, filter_string)
        except MlflowException as exc:
            raise DmglError(f"MLflow could not search runs with filter {filter_string!r}: {exc.message}") from None

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of one metric, by step; the last value logged wins for a repeated step."""
        by_step = {
            m.step: m.value for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
        }
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

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            _with_retries(self.client.log_batch, run_id, metrics=items[start : start + 1000])

    def logged_steps(self, run_id: str) -> set[tuple[str, int]]:
        """Every (metric key, step) already recorded on a run — what a resumed run must not log again."""
        run = self.get_run(run_id)
        seen = set()
        for key in run.metrics:
            for metric in self.client.get_metric_history(run_id, key):
                seen.add((key, metric.step))
        return seen

    def end_run(self, run_id: str, status: str) -> None:
        _with_retries(self.client.set_terminated, run_id, status=status)

    @contextmanager
    def run(self, run_id: str) -> Iterator[str]:
        """Work recorded into ``run_id``: leaving by a stop (Ctrl-C, SIGTERM, a pruned sweep trial) marks the run
        KILLED (resumable), by an error FAILED; both re-raise. A normal exit leaves the status to the caller, who
        ends the run FINISHED once its results are logged."""
        try:
            yield run_id
        except (KeyboardInterrupt, Interrupted, Stopped):
            self.end_run(run_id, "KILLED")
            raise
        except BaseException:
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
        """``checkpoints/<name>.pt`` on the run, written atomically in place when the artifact store is local."""
        folder = self._artifact_dir(run_id)
        if folder is not None:
            save_checkpoint(folder / "checkpoints" / f"{name}.pt", state)
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.pt"
            save_checkpoint(path, state)
            self.client.log_artifact(run_id, str(path), "checkpoints")

    def load_checkpoint(self, run_id: str, name: str) -> dict[str, Any]:
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
