"""The journal: what a run writes to a tracking server goes to local disk first, and a background thread sends it.

Why: with the writes made in the training loop, a tracking server that restarts stalls training for the whole
outage, and an outage longer than MLflow's client retries (about 4 minutes) ends the run. Here a write appends one
JSON line to the run's journal and returns; :class:`JournalWriter`'s thread sends the lines in order and moves a
sent-cursor past each. While the server is away it retries (1 s, 2 s, ... up to 10 s apart) and training goes on.

Layout, one folder per run and writing process: ``<registry>/journal/<run_id>/<pid>-<random>/`` holds ``records.jsonl`` (append-only), ``sent`` (the
byte offset sent so far), ``store`` (the tracking URI it belongs to), ``lock`` (held by the process writing it),
``files/`` (artifacts the records name: figures, copied files) and ``checkpoints/`` (a remote artifact store's
checkpoints, which are also read back from here).

Exactly once: the cursor moves after each record is in the store, so a process that dies can resend at most the
record it was sending. Resending is harmless for params and tags (the same value), artifacts (overwritten), a status
and a dataset input (MLflow keeps one); a metric carries the time it was logged at (a resend is the same row, which
MLflow keeps once) and, whenever a send may have half-happened (a journal left by another process, a failed send),
the (key, step) pairs the run already holds are skipped; a logged model carries its journal reference as a tag, so
that it is found, not made twice.

A journal left by a process that died is *adopted* by the next reader of that run (``dmgl train --resume`` reads it
first) or by ``dmgl runs sync``, which sends every journal of a store.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dmgl_cli.paths import atomic_write_bytes

logger = logging.getLogger("dmgl")

RECORDS, SENT, STORE, LOCK = "records.jsonl", "sent", "store", "lock"
READ_PATIENCE_S = 60.0  # a read that needs the journal sent first waits this long for an away server
RETRY_MAX_S = 10.0


def drain_patience_s() -> float:
    """How long the end of a command waits for a server that is away before it leaves the rest in the journal."""
    return float(os.environ.get("DMGL_TRACKING_DRAIN_S", "30"))


def transient(exc: BaseException) -> bool:
    """A failure that sending again later may cure: the server did not answer, timed out, or answered 429 or 5xx
    (MLflow words all of these "API request to ... failed"). Anything else (a 4xx answer, a check made on this
    side) would fail again: the record is refused."""
    from mlflow.exceptions import MlflowException, RestException  # loaded already: a journal writes through MLflow

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):  # requests' connection errors and timeouts are OSErrors
            return True
        if isinstance(seen, MlflowException):
            status = seen.get_http_status_code()
            if "API request to" in str(seen) or status == 429 or (isinstance(seen, RestException) and status >= 500):
                return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass
class ReplayState:
    """What sending one run's records has learned: whether a send may have half-happened (``uncertain``: the
    metrics already in the store are then read once into ``known_steps`` and not sent again), and the model ids
    that the journal's model references stand for."""

    uncertain: bool = False
    known_steps: set[tuple[str, int]] | None = None
    model_ids: dict[str, str] = field(default_factory=dict)


class RunJournal:
    """One run's journal folder (module docstring), open for appending and sending."""

    def __init__(self, folder: Path, run_id: str, uri: str):
        self.folder, self.run_id = folder, run_id
        folder.mkdir(parents=True, exist_ok=True)
        self._lock_handle: IO[str] = open(folder / LOCK, "a")
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_handle.close()
            raise
        if not (folder / STORE).exists():
            atomic_write_bytes(folder / STORE, uri.encode())
        path = folder / RECORDS
        path.touch()
        size = path.stat().st_size
        data = path.read_bytes() if size else b""
        if data and not data.endswith(b"\n"):  # a process died mid-line: that record was never acknowledged
            size = data.rfind(b"\n") + 1
            os.truncate(path, size)
        self.written = size  # bytes of whole records
        self.sent = min(self.sent_offset(folder), size)
        self.unsent = data[self.sent : size].count(b"\n")
        self.state = ReplayState(uncertain=self.unsent > 0)  # left by another process: its last send is unknown
        self.latest: dict[str, int] = {}  # a superseded artifact (an older last.pt) -> the offset of its last record
        for offset, record in self._records(data[: self.written], 0):
            if record.get("supersedes"):
                self.latest[record["supersedes"]] = offset
        self._handle = open(path, "ab")

    @staticmethod
    def sent_offset(folder: Path) -> int:
        try:
            return int((folder / SENT).read_text() or 0)
        except (OSError, ValueError):
            return 0

    @staticmethod
    def _records(data: bytes, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        offset = start
        for line in data.splitlines(keepends=True):
            yield offset, json.loads(line)
            offset += len(line)

    def append(self, record: dict[str, Any]) -> int:
        """Append one record (the caller holds the writer's lock); returns its offset."""
        offset = self.written
        if record.get("supersedes"):
            self.latest[record["supersedes"]] = offset
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        self._handle.write(line)
        self._handle.flush()  # in the OS's hands: a process that dies leaves it
        self.written += len(line)
        self.unsent += 1
        return offset

    def next_record(self) -> tuple[dict[str, Any], int, int] | None:
        """The first unsent record, its offset and the offset after it; None when all are sent."""
        if self.sent >= self.written:
            return None
        with open(self.folder / RECORDS, "rb") as handle:
            handle.seek(self.sent)
            line = handle.readline()
        return json.loads(line), self.sent, self.sent + len(line)

    def mark_sent(self, end: int) -> None:
        atomic_write_bytes(self.folder / SENT, str(end).encode())
        self.sent = end
        self.unsent -= 1

    def close(self, remove: bool) -> None:
        self._handle.close()
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)
        self._lock_handle.close()


class JournalWriter:
    """The journals of one tracker (one store) and the thread that sends them; ``apply(record, state)`` writes one
    record to the store (raising on failure)."""

    def __init__(self, uri: str, folder: Path, apply: Callable[[dict[str, Any], ReplayState], None]):
        self.uri, self.folder, self._apply = uri, folder, apply
        self._cond = threading.Condition()
        self._journals: dict[Path, RunJournal] = {}  # every journal being sent, in the order they were opened
        self._own: dict[str, RunJournal] = {}  # run id -> the journal this process appends to
        self._writer_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._away_since: float | None = None
        self._values: dict[tuple[str, str], dict[int, float]] = {}  # (run, metric name) -> {step: value} logged here
        self._thread = threading.Thread(target=self._loop, name="dmgl-tracking-journal", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ what is kept
    def run_folder(self, run_id: str) -> Path:
        """This process's journal folder for ``run_id`` (another process writing the same run, say a sweep
        worker and its launcher, keeps its own beside it)."""
        journal = self._own.get(run_id)
        return journal.folder if journal is not None else self.folder / run_id / self._writer_id

    def _journal(self, run_id: str) -> RunJournal:
        journal = self._own.get(run_id)
        if journal is None:
            journal = RunJournal(self.folder / run_id / self._writer_id, run_id, self.uri)
            self._own[run_id] = self._journals[journal.folder] = journal
        return journal

    def append(self, run_id: str, record: dict[str, Any]) -> None:
        with self._cond:
            self._journal(run_id).append(record)
            if record["op"] == "metrics":
                for name, value, _, step in record["metrics"]:
                    self._values.setdefault((run_id, name), {})[step] = value
            self._cond.notify_all()

    def adopt(self, run_id: str) -> int:
        """Take over the journals that processes which are gone left for ``run_id`` (a process that still runs
        sends its own); returns how many were taken over."""
        adopted = 0
        with self._cond:
            for records in sorted((self.folder / run_id).glob(f"*/{RECORDS}")):
                folder = records.parent
                if folder in self._journals:
                    continue
                try:
                    self._journals[folder] = RunJournal(folder, run_id, self.uri)
                except BlockingIOError:
                    continue
                adopted += 1
            self._cond.notify_all()
        return adopted

    def left_on_disk(self) -> list[str]:
        """Run ids of this store's journals in the journal folder."""
        found = set()
        for store in self.folder.glob(f"*/*/{STORE}") if self.folder.is_dir() else []:
            try:
                if store.read_text() == self.uri:
                    found.add(store.parent.parent.name)
            except OSError:
                continue
        return sorted(found)

    def logged_values(self, run_id: str, name: str) -> dict[int, float]:
        with self._cond:
            return dict(self._values.get((run_id, name), {}))

    def pending(self, run_id: str | None = None) -> int:
        with self._cond:
            return sum(j.unsent for j in self._journals.values() if run_id is None or j.run_id == run_id)

    @property
    def away(self) -> bool:
        return self._away_since is not None

    # -------------------------------------------------------------------------------------------- waiting
    def flush(self, run_id: str | None = None, patience_s: float = READ_PATIENCE_S) -> int:
        """Wait until the journal (of ``run_id``, or all) is sent, or the store has been away for ``patience_s``
        seconds of this wait; returns the number of records still waiting."""
        if threading.current_thread() is self._thread:
            return 0  # a record being sent reads the store: it must not wait for itself
        if run_id is not None:
            self.adopt(run_id)
        started = time.monotonic()
        with self._cond:
            while True:
                left = sum(j.unsent for j in self._journals.values() if run_id is None or j.run_id == run_id)
                if not left:
                    return 0
                away = self._away_since
                if away is not None and time.monotonic() - max(away, started) > patience_s:
                    return left
                self._cond.wait(timeout=0.5)

    def close(self, patience_s: float) -> tuple[int, list[Path]]:
        """The end of a command: :meth:`flush` with ``patience_s``; journals fully sent are removed. Returns the
        records left and the folders that hold them."""
        left = self.flush(patience_s=patience_s)
        with self._cond:
            waiting = []
            for folder, journal in list(self._journals.items()):
                journal.close(remove=journal.unsent == 0)
                if journal.unsent:
                    waiting.append(folder)
                else:
                    try:
                        folder.parent.rmdir()  # the run's folder, once no journal of it is left
                    except OSError:
                        pass
                del self._journals[folder]
            self._own.clear()
        return left, waiting

    # ------------------------------------------------------------------------------------------- sending
    def _loop(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while not any(j.unsent for j in self._journals.values()):
                    self._cond.wait()
                journals = [j for j in self._journals.values() if j.unsent]
            try:
                for journal in journals:
                    self._send(journal)
            except Exception as exc:  # the store is away: wait, then send again from the cursor
                with self._cond:
                    if self._away_since is None:
                        self._away_since = time.monotonic()
                        logger.info("tracking store %s is away (%s); training goes on, records wait", self.uri, exc)
                    self._cond.notify_all()
                    self._cond.wait(timeout=delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = 1.0
            with self._cond:
                self._away_since = None
                self._cond.notify_all()

    def _send(self, journal: RunJournal) -> None:
        while True:
            with self._cond:
                if journal.folder not in self._journals:
                    return  # closed
                found = journal.next_record()
            if found is None:
                return
            record, offset, end = found
            key = record.get("supersedes")
            if not key or journal.latest.get(key, offset) <= offset:  # an older copy of a later artifact is skipped
                try:
                    self._apply(record, journal.state)
                except Exception as exc:
                    if transient(exc):
                        journal.state.uncertain = True
                        raise
                    logger.warning(
                        "the tracking store %s refused a %s record of run %s (%s); it is dropped",
                        self.uri,
                        record.get("op"),
                        journal.run_id,
                        exc,
                    )
            with self._cond:
                journal.mark_sent(end)
                if self._away_since is not None:
                    self._away_since = None
                self._cond.notify_all()
