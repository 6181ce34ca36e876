"""Optuna storages for ``dmgl sweep``, and the heartbeat that keeps a claimed trial alive.

A claimed trial is kept alive by Optuna's heartbeat protocol. RDB storages (SQLite, PostgreSQL, MySQL) implement it
natively; Optuna's journal storage does not (Optuna 5), so :class:`HeartbeatJournalStorage` implements the same
protocol by stamping the running trial's system attribute (machines sharing a journal file need clocks agreeing to
well within the grace period). A trial whose heartbeat is older than the grace period (3x the study's interval) is
handed to the storage's stale-trial callback by the next worker that looks.

The only module of dmgl that uses Optuna's private API (the heartbeat protocol is not exported).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage

# Optuna's heartbeat protocol (the base class RDBStorage implements, and the thread optimize() runs) is not
# exported; it is the only way to give the journal storage the same stale-trial handling as RDB storages.
from optuna.storages._heartbeat import BaseHeartbeat, BaseHeartbeatThread, get_heartbeat_thread
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from dmgl_cli.errors import DmglError
from dmgl_cli.paths import warn_if_shared_sqlite

optuna.logging.set_verbosity(optuna.logging.WARNING)

StaleTrialCallback = Callable[[optuna.Study, FrozenTrial], None]


@contextmanager
def quiet() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning (heartbeat, retry callback) around the calls that raise it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def redact(url: str) -> str:
    """The storage URL without its password, for logs, tags and messages."""
    parsed = urlparse(url)
    if parsed.password:
        netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
        return urlunparse(parsed._replace(netloc=netloc))
    return url


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal:"):
        rest = url[len("journal:") :]
        return Path(rest[2:] if rest.startswith("//") else rest).expanduser()
    if "://" not in url and url.endswith((".log", ".journal", ".jsonl")):
        return Path(url).expanduser()
    return None


def _check_journal(path: Path) -> None:
    """Every complete line of a journal must be a JSON record. (Optuna tolerates a torn last line, which a
    crashed writer leaves, but raises on a bad line only once another follows — after we appended to it.)"""
    if not path.is_file():
        return
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                continue
            try:
                json.loads(line)
            except ValueError:
                raise DmglError(
                    f"cannot open Optuna storage journal:{path}: line {number} is not an Optuna "
                    "journal record; point --storage at the right file or start a new one"
                ) from None


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with Optuna's heartbeat protocol (see the module docstring)."""

    HEARTBEAT_ATTR = "dmgl:heartbeat"

    def __init__(
        self,
        backend: JournalFileBackend,
        heartbeat_interval: int | None,
        grace_period: int | None,
        stale_trial_callback: StaleTrialCallback | None,
    ) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, self.HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker declared this trial dead; the worker's tell will say so

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(self.HEARTBEAT_ATTR)
            if beat is None:
                beat = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - float(beat) > (self.grace_period or math.inf):
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.stale_trial_callback

    def get_failed_trial_callback(self):  # the same hook under its name before Optuna 4.9
        return self.stale_trial_callback


def open_storage(url: str, heartbeat: int | None = None, stale_trial_callback: StaleTrialCallback | None = None):
    """An Optuna storage for ``url``: an RDB URL (sqlite:///, postgresql://, mysql://) or a journal file
    (``journal:PATH`` or a path ending in .log). Anything that cannot be opened is a DmglError."""
    grace = 3 * heartbeat if heartbeat else None
    if url.startswith(("redis://", "rediss://", "http://", "https://")):
        raise DmglError(
            f"Optuna storage {redact(url)} is not supported by dmgl; use sqlite:///PATH, "
            "postgresql://..., mysql://... or journal:PATH"
        )
    journal = _journal_path(url)
    try:
        with quiet():
            if journal is not None:
                if journal.is_dir() or not journal.parent.is_dir():
                    problem = "it is a folder" if journal.is_dir() else f"folder {journal.parent} does not exist"
                    raise DmglError(f"cannot open the Optuna journal {journal}: {problem}")
                _check_journal(journal)
                storage = HeartbeatJournalStorage(
                    JournalFileBackend(str(journal)), heartbeat, grace, stale_trial_callback
                )
            elif "://" in url:
                if url.startswith("sqlite:///"):
                    warn_if_shared_sqlite(Path(url[len("sqlite:///") :]), "Optuna storage")
                callback_arg = (
                    "heartbeat_stale_trial_callback"
                    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
                    else "failed_trial_callback"
                )
                kwargs = (
                    {"heartbeat_interval": heartbeat, "grace_period": grace, callback_arg: stale_trial_callback}
                    if heartbeat
                    else {}
                )
                storage = RDBStorage(url, **kwargs)
            else:
                raise DmglError(
                    f"--storage {url!r} is not a storage URL; use sqlite:///PATH, "
                    "postgresql://USER@HOST/DB, mysql://USER@HOST/DB or journal:PATH"
                )
            storage.get_all_studies()  # reads the store now, so a broken one fails here with a clear message
    except DmglError:
        raise
    except ImportError as exc:
        raise DmglError(
            f"cannot open Optuna storage {redact(url)}: its database driver is not installed "
            f"({exc.name or exc}); pip install it (e.g. psycopg2-binary or pymysql)"
        ) from None
    except (ValueError, RuntimeError, OSError, KeyError, sqlalchemy.exc.SQLAlchemyError) as exc:
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise DmglError(f"cannot open Optuna storage {redact(url)}: {detail}") from None
    return storage


def heartbeat(trial: optuna.Trial) -> BaseHeartbeatThread:
    """While this context is open, ``trial`` beats in its storage (a no-op for a storage without a heartbeat)."""
    return get_heartbeat_thread(trial._trial_id, trial.storage)
