"""The store a :class:`~dmgl_cli.tracking.Tracker` talks to: its URI, its MLflow client, the reachability probe of
a tracking server, and SQLite's writer retries.

MLflow is imported where it is used, never when this module is: the client is made on first use
(:attr:`TrackerBase.client`, with the SQLite store's set-up), and a tracker on an existing local SQLite store holds
a :class:`~dmgl_cli.tracking.store_reader.SqliteStoreReader` that answers reads without MLflow.

A store is *local* when it is a file on this machine (``sqlite:///…``, a ``file:`` or plain path): it cannot go
away, and is written directly, as before. Any other store (a tracking server over http/https, a database server)
is written through the journal (:mod:`dmgl_cli.tracking.journal`), so that an outage never holds training up.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import random
import sqlite3
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# reading a run's config.yaml or checkpoint must not draw MLflow's "Downloading artifacts" bars
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# dmgl prints its own run links; MLflow's "View run" lines on stdout (a tracking server ending a run) would land in
# the middle of `--json` output
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import logging  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import cast  # noqa: E402

from dmgl_cli.errors import DmglError  # noqa: E402
from dmgl_cli.paths import (  # noqa: E402
    default_tracking_uri,
    ensure_registry,
    journal_dir,
    resolve_tracking_uri,
    warn_if_shared_sqlite,
)
from dmgl_cli.tracking.journal import RECORDS, JournalWriter, ReplayState, drain_patience_s  # noqa: E402
from dmgl_cli.tracking.store_reader import SqliteStoreReader  # noqa: E402

if TYPE_CHECKING:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from dmgl_cli.checkpoint import CheckpointWriter


def quiet_mlflow_logs() -> None:
    """Warnings only from MLflow, alembic and SQLAlchemy (no "Creating initial MLflow database tables" lines in a
    command's output). Called again once MLflow is imported: its import sets its own logger to INFO."""
    for noisy in ("mlflow", "alembic", "sqlalchemy", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR if noisy == "urllib3" else logging.WARNING)


quiet_mlflow_logs()
logger = logging.getLogger("dmgl")

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
NOTE_TAG = "mlflow.note.content"  # a run's description, markdown, shown on its page in the UI
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a logged model: its registered versions (as MLflow's own register)
DATASET_CONTEXT_TAG = "mlflow.data.context"
BATCH = 100  # MLflow accepts up to 1000 metrics / 100 params per log_batch call
PROBE_TIMEOUT_S = 3.0  # a silent tracking server is refused within this (+ start-up: the issue asks for <= 5 s)


def local_path(uri: str) -> Path | None:
    """The folder behind a ``file:`` (or plain path) artifact URI; None for remote stores."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def is_local_store(uri: str) -> bool:
    """A store that is a file on this machine (SQLite, a ``file:`` store): written directly, never journaled."""
    return uri.startswith("sqlite:") or local_path(uri) is not None


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _MlflowNotLoaded(Exception):
    """Stands for MlflowException while MLflow is not loaded: nothing can have raised one then."""


def mlflow_exception() -> type[MlflowException]:
    """MLflow's exception class, for an ``except`` clause in code that may run without MLflow loaded (a read the
    store reader answered): MLflow is not imported for it (that takes seconds), since an MlflowException can only
    have been raised once it is."""
    module = sys.modules.get("mlflow.exceptions")
    if module is None:
        return cast("type[MlflowException]", _MlflowNotLoaded)
    return module.MlflowException


def with_retries(call, *args, **kwargs):
    """SQLite allows one writer at a time; a writer that waited past the busy timeout is retried, not lost."""
    from mlflow.exceptions import MlflowException

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


def server_unreachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the tracking server at ``uri`` (http/https) does not answer, or None when it does. Any HTTP answer counts
    (a 404 or 401 is a server that is there); only a refused, unresolved or silent connection does not."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLError):
            return None  # it answered; whether its certificate is trusted is MLflow's settings' business
        return str(reason.strerror or reason) if isinstance(reason, OSError) else str(reason)
    except TimeoutError:
        return f"no answer within {timeout:.0f} s"
    except OSError as exc:
        return str(exc.strerror or exc)


def check_reachable(uri: str) -> None:
    """Refuse, in one line and within :data:`PROBE_TIMEOUT_S`, a tracking server that does not answer."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    reason = server_unreachable(uri)
    if reason is not None:
        raise DmglError(
            f"the tracking server {uri} does not answer ({reason}); start it (or wait until it is back), or give "
            "another --tracking-uri / MLFLOW_TRACKING_URI (neither: the local store under DMGL_HOME)"
        )


class TrackerBase:
    """One MLflow client on one store, and the journal that its writes go through when the store is not local."""

    def __init__(self, tracking_uri: str | None = None):
        self.uri = resolve_tracking_uri(tracking_uri)
        self.default_store = self.uri == default_tracking_uri()
        self.journaled = not is_local_store(self.uri)
        self._checkpoint_writer: CheckpointWriter | None = None  # made by the first save_checkpoint (it needs torch)
        self._journal: JournalWriter | None = None  # started by the first journaled write
        self._artifact_uris: dict[str, str] = {}  # run id -> artifact URI, read once (it never changes)
        # parent run id -> the child runs this process made and has not ended (RUNNING or SCHEDULED): a parent
        # that ends otherwise than FINISHED ends them too, so a stop that lands between a child's creation and the
        # work that would end it leaves no run RUNNING
        self._unended: dict[str, set[str]] = {}
        if self.default_store:
            ensure_registry()
        check_reachable(self.uri)
        if self.journaled:
            # The journal retries on its own, forever; MLflow's own retries (7, about 4 minutes) would only keep
            # the writer from noticing that the server is back. A user's settings win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        # The MLflow client is made on first use (:attr:`client`): ``import mlflow`` and making a client on a SQLite
        # store take seconds, and a command that only reads an existing local SQLite store reads it with the
        # standard library (:class:`~dmgl_cli.tracking.store_reader.SqliteStoreReader`, :meth:`store_reader`).
        self._client: MlflowClient | None = None
        self._client_lock = threading.Lock()
        self._reader: tuple[int, int, SqliteStoreReader] | None = None  # (pid, thread, reader) that opened it
        database = sqlite_path(self.uri)
        if database is not None:
            try:
                database.parent.mkdir(parents=True, exist_ok=True)
                warn_if_shared_sqlite(database, "MLflow store")
            except OSError as exc:
                raise DmglError(f"cannot open the MLflow store {self.uri} ({exc})") from None
            reader = SqliteStoreReader.open(self.uri)
            if reader is not None:
                self._reader = (os.getpid(), threading.get_ident(), reader)
        if self._reader is None:
            # A store the reader cannot read (a new one, a server, another database): the client is made now, as
            # it always was, so that a store that cannot be opened is refused at once.
            self._open_client()

    @property
    def client(self) -> MlflowClient:
        """The MLflow client on this store, made on first use (with the store's set-up, :meth:`_open_client`)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._open_client()
        assert self._client is not None
        return self._client

    def _open_client(self) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        quiet_mlflow_logs()

        try:
            database = sqlite_path(self.uri)
            if database is None:
                self._client = MlflowClient(tracking_uri=self.uri)
            else:
                # Several dmgl processes may open a new store at once and only one may create its tables (MLflow
                # builds them when the client is made), so that happens under a file lock. WAL lets readers (the
                # UI, report) work while a training process writes.
                database.parent.mkdir(parents=True, exist_ok=True)
                with exclusive(database.with_name(database.name + ".lock")):
                    with sqlite3.connect(database, timeout=60) as connection:
                        connection.execute("PRAGMA journal_mode=WAL")
                    self._client = MlflowClient(tracking_uri=self.uri)
        except MlflowException as exc:
            raise DmglError(f"cannot open the MLflow store {self.uri} ({exc.message})") from None
        except (OSError, sqlite3.Error) as exc:
            raise DmglError(f"cannot open the MLflow store {self.uri} ({exc})") from None

    def store_reader(self) -> SqliteStoreReader | None:
        """The standard library's reader of this store when it is a local SQLite store at a schema revision it
        knows, opened when this tracker was made, in that process and thread only (an SQLite connection is not
        shared between threads, nor across a fork); None otherwise, and the read goes through MLflow. Each of its
        reads is a fresh read transaction, so it sees every write committed before it, this process's own too."""
        if self._reader is None:
            return None
        pid, thread, reader = self._reader
        if pid != os.getpid() or thread != threading.get_ident():
            return None
        return reader

    # ---------------------------------------------------------------------------------------------- journal
    def _journal_writer(self) -> JournalWriter | None:
        """The journal of a store that is not local (started by the first write, or by a read of a run whose
        journal a process that is gone left); None for a local store. The end of the process sends what it holds
        (:meth:`close`)."""
        if not self.journaled:
            return None
        if self._journal is None:
            self._journal = JournalWriter(self.uri, journal_dir(), self._apply)
            atexit.register(self.close)
        return self._journal

    def _apply(self, record: dict[str, Any], state: ReplayState) -> None:
        """Write one journal record to the store (:class:`~dmgl_cli.tracking.writing.RunWriting` knows them)."""
        raise NotImplementedError

    def left_journal(self, run_id: str) -> bool:
        """Whether ``run_id`` has a journal here with records not yet sent."""
        if not self.journaled:
            return False
        if self._journal is not None and self._journal.pending(run_id):
            return True
        return any((journal_dir() / run_id).glob(f"*/{RECORDS}"))

    def flush(self, run_id: str | None = None) -> None:
        """Wait until what is journaled (for ``run_id``, or for every run this process writes) is in the store: a
        read that needs what was written calls it first. A journal left for ``run_id`` by a process that is gone is
        taken over and sent first (``dmgl train --resume``). Waits at most a minute for a store that is away (the
        read that follows needs it anyway)."""
        if run_id is None and self._journal is None:
            return
        if run_id is not None and not self.left_journal(run_id):
            return
        writer = self._journal_writer()
        if writer is not None:
            writer.flush(run_id)

    def sync_journals(self) -> list[tuple[str, int, int]]:
        """Send every journal of this store left in the journal folder (``dmgl runs sync``), waiting while the
        store answers; returns (run id, records sent, records left) per journal. A journal whose process still
        runs is left to it."""
        writer = self._journal_writer()
        if writer is None:
            return []
        before = {}
        for run_id in writer.left_on_disk():
            if writer.adopt(run_id):
                before[run_id] = writer.pending(run_id)
        writer.flush(patience_s=drain_patience_s())
        return [(run_id, count - writer.pending(run_id), writer.pending(run_id)) for run_id, count in before.items()]

    def close(self, patience_s: float | None = None) -> int:
        """Send what the journal holds, waiting while the store answers (or until it has been away for
        ``patience_s``, default ``$DMGL_TRACKING_DRAIN_S`` or 30 s); journals fully sent are removed, and what is
        left stays, with one line saying where and how to send it. Returns the number of records left."""
        if self._journal is None:
            return 0
        left, folders = self._journal.close(drain_patience_s() if patience_s is None else patience_s)
        if left:
            where = folders[0] if len(folders) == 1 else folders[0].parent
            logger.warning(
                "the tracking server %s is away: %d record(s) of %d run(s) wait in the journal at %s; "
                "`dmgl runs sync --tracking-uri %s` sends them once it is back (so does `dmgl train --resume RUN`)",
                self.uri,
                left,
                len(folders),
                where,
                self.uri,
            )
        return left
