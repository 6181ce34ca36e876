"""Runs read straight from MLflow's SQLite store with the standard library's ``sqlite3``, for commands that only read.

``import mlflow`` and making an ``MlflowClient`` on a SQLite store take seconds (SQLAlchemy, alembic's schema
checks), longer than ``dmgl runs list`` may take. This reader knows MLflow's tables at the schema revisions in
:data:`KNOWN_REVISIONS` and answers the reads that dmgl's read-only commands make with what ``MlflowClient`` gives
for them (active runs only, MLflow's order and run names). Any other store (another revision, a server, another
database, workspaces) gets None from :meth:`SqliteStoreReader.open`, and is read through MLflow.

It imports nothing but the standard library, and never changes the store: the database is opened read-only.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# The alembic revisions of MLflow's store schema whose tables this reader has been checked against (the
# differential test in tests/test_store_reader.py): the head of mlflow/store/db_migrations/versions/ in MLflow 3.17.2.
# When MLflow is upgraded, tests/test_store_reader.py::test_known_revisions_hold_installed_mlflow_head fails and
# names the new head; read the new migrations for changes to the tables read here (experiments, runs, tags, params,
# latest_metrics, metrics), adapt the queries if any, add the head here and run tests/test_store_reader.py. A store
# at a revision not listed is read through MLflow (which refuses a store older than its own head anyway).
KNOWN_REVISIONS = frozenset({"dc11669786a5"})

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# MLflow's own SQLite sessions wait this long for a writer's lock (PRAGMA busy_timeout = 20000 in mlflow/store/db).
BUSY_TIMEOUT_S = 20.0
# A store that is not MLflow's single-tenant default (experiments in other workspaces) is left to MLflow.
_DEFAULT_WORKSPACE = "default"

_RUN_COLUMNS = "r.run_uuid, r.name, r.experiment_id, r.status, r.start_time, r.end_time, r.artifact_uri"
# MLflow's default order of search results (SqlAlchemyStore._search_runs, _get_orderby_clauses): newest first, then
# by id. In SQLite a missing start_time (NULL) sorts after every other in DESC, as it does in MLflow's query.
_RUN_ORDER = "r.start_time DESC, r.run_uuid"
_ACTIVE = "r.lifecycle_stage = 'active'"
_HAS_TAG = "EXISTS (SELECT 1 FROM tags AS t WHERE t.run_uuid = r.run_uuid AND t.key = ? AND t.value = ?)"


@dataclass(frozen=True)
class StoredRun:
    """One active run as ``MlflowClient.get_run`` / ``search_runs`` give it: ``name`` is ``RunInfo.run_name`` (the
    ``runs.name`` column, or the ``mlflow.runName`` tag where that column is empty, as in runs MLflow 1.x wrote);
    times are milliseconds since the epoch; ``metrics`` holds the latest value of each metric (MLflow's
    ``latest_metrics``: the one at the greatest (step, timestamp, value)) by MLflow's metric name, NaN as NaN and
    an infinity as MLflow stores it (+-1.7976931348623157e308)."""

    run_id: str
    name: str | None
    experiment_id: str
    status: str
    start_time: int | None
    end_time: int | None
    artifact_uri: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]

    @property
    def parent_id(self) -> str | None:
        return self.tags.get(PARENT_TAG)


def sqlite_store_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` tracking URI (``sqlite:////abs/path`` or ``sqlite:///rel/path``),
    or None for any other URI, including SQLite URIs with options (``?...``) or escapes (``%``) that this reader
    does not interpret."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix) :]
    if not path or "?" in path or "%" in path or path == ":memory:":
        return None
    return Path(path)


def _workspaces_enabled() -> bool:
    # MLflow serves a store through its workspace-aware variant (which filters by workspace) when this is on.
    return os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").strip().lower() not in ("", "false", "0")


class SqliteStoreReader:
    """Read-only queries on one MLflow SQLite store; each method reads one consistent snapshot (one transaction),
    so a training process writing meanwhile (WAL) never shows half of a run."""

    def __init__(self, connection: sqlite3.Connection, path: Path):
        self._connection = connection
        self.path = path

    @classmethod
    def open(cls, uri: str) -> SqliteStoreReader | None:
        """A reader of the store at ``uri``, or None unless ``uri`` is ``sqlite:///PATH`` naming an existing MLflow
        store at a schema revision in :data:`KNOWN_REVISIONS`, in MLflow's single-tenant mode."""
        path = sqlite_store_file(uri)
        if path is None or not path.is_file() or _workspaces_enabled():
            return None
        path = path.resolve()
        try:
            # mode=ro: the store is never changed (SQLite may still make the WAL's index, mlflow.db-shm, that a
            # reader needs); isolation_level=None: the transactions are begun by _snapshot
            connection = sqlite3.connect(
                f"{path.as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None
            )
        except sqlite3.Error:
            return None
        if not _readable_store(connection):
            connection.close()
            return None
        return cls(connection, path)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> SqliteStoreReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        self._connection.execute("BEGIN")
        try:
            yield self._connection
        finally:
            self._connection.execute("COMMIT")

    # ------------------------------------------------------------------------------------------------ experiments
    def experiments(self, names: list[str] | None = None) -> dict[str, str]:
        """{experiment id: name} of the active experiments, in ``search_experiments``'s order (newest first, then
        by id); with ``names``, of those of the named ones that exist and are active, in the order named."""
        with self._snapshot() as db:
            if not names:
                rows = db.execute(
                    "SELECT experiment_id, name FROM experiments WHERE lifecycle_stage = 'active' "
                    "ORDER BY creation_time DESC, experiment_id"
                ).fetchall()
                return {str(experiment_id): name for experiment_id, name in rows}
            rows = db.execute(
                f"SELECT experiment_id, name FROM experiments WHERE lifecycle_stage = 'active' "
                f"AND name IN ({_marks(names)})",
                names,
            ).fetchall()
        by_name = {name: str(experiment_id) for experiment_id, name in rows}
        return {by_name[name]: name for name in names if name in by_name}

    def experiment_name(self, experiment_id: str) -> str | None:
        """The name of experiment ``experiment_id`` in any stage (as ``MlflowClient.get_experiment``), or None."""
        key = _experiment_key(experiment_id)
        if key is None:
            return None
        with self._snapshot() as db:
            row = db.execute("SELECT name FROM experiments WHERE experiment_id = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------------------------------------------- runs
    def get_run(self, run_id: str) -> StoredRun | None:
        """The run ``run_id`` if it exists and is active (not deleted), else None."""
        with self._snapshot():
            found = self._runs(f"r.run_uuid = ? AND {_ACTIVE}", [run_id], limit=1)
        return found[0] if found else None

    def run_exists(self, run_id: str) -> bool:
        """Whether the store holds a run ``run_id`` in any stage (a deleted one too, which ``MlflowClient.get_run``
        still gives and :meth:`get_run` does not)."""
        with self._snapshot() as db:
            return db.execute("SELECT 1 FROM runs WHERE run_uuid = ?", (run_id,)).fetchone() is not None

    def search(
        self,
        experiment_ids: Iterable[str],
        *,
        tags: dict[str, str] | None = None,
        run_id_prefix: str | None = None,
        run_name: str | None = None,
        status: str | None = None,
        max_results: int = 50000,
    ) -> list[StoredRun]:
        """The active runs of ``experiment_ids`` (in any stage, as ``search_runs``) that carry every tag in
        ``tags`` with exactly that value, whose id starts with ``run_id_prefix`` (case-sensitive) and whose
        ``mlflow.runName`` tag is ``run_name`` (as MLflow searches ``attributes.run_name = ...``), whose status is
        ``status`` (exactly, as ``attributes.status = ...``), at most
        ``max_results``, in MLflow's default order. Ids that are not experiment ids (not integers) match nothing."""
        keys = [key for key in map(_experiment_key, experiment_ids) if key is not None]
        if not keys or max_results <= 0:
            return []
        conditions = [f"r.experiment_id IN ({_marks(keys)})", _ACTIVE]
        args: list[object] = [*keys]
        for key, value in (tags or {}).items():
            conditions.append(_HAS_TAG)
            args += [key, value]
        if run_id_prefix:  # as MLflow's LIKE 'prefix%' (case-sensitive there too), without LIKE's wildcards
            conditions.append("substr(r.run_uuid, 1, ?) = ?")
            args += [len(run_id_prefix), run_id_prefix]
        if run_name is not None:  # MLflow reads attributes.run_name = 'x' as tags.`mlflow.runName` = 'x'
            conditions.append(_HAS_TAG)
            args += [RUN_NAME_TAG, run_name]
        if status is not None:
            conditions.append("r.status = ?")
            args.append(status)
        with self._snapshot():
            return self._runs(" AND ".join(conditions), args, limit=max_results)

    def children(self, parent_id: str) -> list[StoredRun]:
        """The active runs in the parent's experiment whose ``mlflow.parentRunId`` tag is ``parent_id``, in MLflow's
        default order (as ``search_runs([parent's experiment], "tags.`mlflow.parentRunId` = 'ID'")``)."""
        condition = (
            f"r.experiment_id = (SELECT experiment_id FROM runs WHERE run_uuid = ?) AND {_ACTIVE} AND {_HAS_TAG}"
        )
        with self._snapshot():
            return self._runs(condition, [parent_id, PARENT_TAG, parent_id], limit=None)

    def metric_history(self, run_id: str, name: str) -> list[tuple[int, float, int]]:
        """Every (step, value, timestamp) logged for metric ``name`` (MLflow's name) of run ``run_id``, in
        ``get_metric_history``'s order (timestamp, step, value); empty for a run or metric that does not exist."""
        with self._snapshot() as db:
            rows = db.execute(
                "SELECT step, value, is_nan, timestamp FROM metrics WHERE run_uuid = ? AND key = ? "
                "ORDER BY timestamp, step, value",
                (run_id, name),
            ).fetchall()
        return [(step, math.nan if is_nan else value, timestamp) for step, value, is_nan, timestamp in rows]

    # ---------------------------------------------------------------------------------------------------- helpers
    def _runs(self, condition: str, args: Sequence[object], limit: int | None) -> list[StoredRun]:
        """The runs ``r`` meeting ``condition``, in MLflow's order, with their params, tags and latest metrics read
        in one query per table (the runs chosen by a subquery), inside the caller's snapshot."""
        db = self._connection
        bounded = [*args, -1 if limit is None else limit]  # LIMIT -1: no limit
        chosen = f"SELECT r.run_uuid FROM runs AS r WHERE {condition} ORDER BY {_RUN_ORDER} LIMIT ?"
        rows = db.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs AS r WHERE {condition} ORDER BY {_RUN_ORDER} LIMIT ?", bounded
        ).fetchall()
        if not rows:
            return []
        params: dict[str, dict[str, str]] = {row[0]: {} for row in rows}
        tags: dict[str, dict[str, str]] = {row[0]: {} for row in rows}
        metrics: dict[str, dict[str, float]] = {row[0]: {} for row in rows}
        for run_id, key, value in db.execute(
            f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({chosen})", bounded
        ):
            params[run_id][key] = value
        for run_id, key, value in db.execute(
            f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({chosen})", bounded
        ):
            tags[run_id][key] = value
        for run_id, key, value, is_nan in db.execute(
            f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN ({chosen})", bounded
        ):
            metrics[run_id][key] = math.nan if is_nan else value
        found = []
        for run_id, name, experiment_id, status, start_time, end_time, artifact_uri in rows:
            run_tags = tags[run_id]
            found.append(
                StoredRun(
                    run_id=run_id,
                    # RunInfo.run_name: the column, or where it is empty the tag (SqlRun.to_mlflow_entity)
                    name=name or run_tags.get(RUN_NAME_TAG) or name,
                    experiment_id=str(experiment_id),
                    status=status,
                    start_time=start_time,
                    end_time=end_time,
                    artifact_uri=artifact_uri,
                    params=params[run_id],
                    tags=run_tags,
                    metrics=metrics[run_id],
                )
            )
        return found


def _readable_store(connection: sqlite3.Connection) -> bool:
    """Whether the database holds an MLflow store at a known revision, with every experiment in the default
    workspace (MLflow's single-tenant mode refuses others); a file that is not a database, or not MLflow's, is not."""
    try:
        revisions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        if len(revisions) != 1 or revisions[0][0] not in KNOWN_REVISIONS:
            return False
        other_workspace = connection.execute(
            "SELECT 1 FROM experiments WHERE workspace IS NOT NULL AND workspace != ? LIMIT 1", (_DEFAULT_WORKSPACE,)
        ).fetchone()
    except sqlite3.Error:
        return False
    return other_workspace is None


def _marks(values: Sequence[object]) -> str:
    return ", ".join(["?"] * len(values))


def _experiment_key(experiment_id: object) -> int | None:
    """The ``experiments.experiment_id`` (an INTEGER column) of an id as MLflow spells it ("12"), or None."""
    text = str(experiment_id).strip()
    # ASCII digits only (int() refuses "²"), and few enough to fit SQLite's 64-bit integers
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None
