"""Reading runs: find a run a user named, search, children, metric histories, statuses, stale runs, text artifacts.

A read of what this process may still hold in its journal (a run's metrics, tags, status) waits for the journal to
reach the store first (:meth:`~dmgl_cli.tracking.store.TrackerBase.flush`).

On a local SQLite store the reads that ``dmgl runs list/show/compare`` make (:meth:`RunQueries.get_run`,
``find_run``, ``search`` with a filter of the forms dmgl writes, ``children``, ``experiments``, ``experiment_name``,
``metric_history``) are answered by the standard library's reader
(:class:`~dmgl_cli.tracking.store_reader.SqliteStoreReader`) without loading MLflow; what it cannot answer (another
store, another filter, a deleted run, an SQLite error) goes through MLflow's client, as before.
"""

from __future__ import annotations

import platform
import re
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dmgl_cli.errors import DmglError
from dmgl_cli.provenance import process_alive
from dmgl_cli.tracking.records import (
    FULL_RUN_ID,
    METRIC_IN_FILTER,
    PARENT_TAG,
    RUN_ID_PREFIX,
    RUN_ID_PREFIX_MIN,
    SEARCHABLE_NAME,
    SHOWN_CANDIDATES,
    RunRecord,
    candidate_line,
    dmgl_metric_name,
    dmgl_metrics,
    mlflow_metric_name,
    no_such_run,
)
from dmgl_cli.tracking.store import TrackerBase, logger, mlflow_exception
from dmgl_cli.tracking.store_reader import SqliteStoreReader, StoredRun

T = TypeVar("T")


class _Unread:
    """What :meth:`RunQueries._read` gives when the store reader did not answer: ask MLflow."""


UNREAD = _Unread()

# The clauses of the search filters dmgl writes itself (runs list, find_run, children, stale runs), which the store
# reader answers as MLflow does: a tag's or the status's exact value, an id prefix, a run name. Values hold no quote
# or backslash (MLflow's escapes), keys no backtick; any other filter is MLflow's to read.
_AND = re.compile(r"\s+and\s+", re.IGNORECASE)
_TAG_CLAUSE = re.compile(r"tags\.`([^`]+)`\s*=\s*'([^'\\]*)'")
_STATUS_CLAUSE = re.compile(r"attributes\.status\s*=\s*'([^'\\]*)'")
_ID_PREFIX_CLAUSE = re.compile(r"attributes\.run_id\s+LIKE\s+'([0-9a-f]+)%'")
_NAME_CLAUSE = re.compile(r"attributes\.run_name\s*=\s*'([^'\\]*)'")


def reader_query(filter_string: str) -> dict[str, Any] | None:
    """The keyword arguments of :meth:`SqliteStoreReader.search` that select what ``filter_string`` selects in
    MLflow, or None for a filter that is not one of the simple forms above."""
    query: dict[str, Any] = {}
    text = filter_string.strip()
    for clause in _AND.split(text) if text else []:
        clause = clause.strip()
        if match := _TAG_CLAUSE.fullmatch(clause):
            key, value = match.groups()
            if query.setdefault("tags", {}).setdefault(key, value) != value:
                return None  # two values for one tag: MLflow's answer (none) is left to it
        elif (match := _STATUS_CLAUSE.fullmatch(clause)) and "status" not in query:
            query["status"] = match.group(1)
        elif (match := _ID_PREFIX_CLAUSE.fullmatch(clause)) and "run_id_prefix" not in query:
            query["run_id_prefix"] = match.group(1)
        elif (match := _NAME_CLAUSE.fullmatch(clause)) and "run_name" not in query:
            query["run_name"] = match.group(1)
        else:
            return None
    return query


def stored_record(run: StoredRun) -> RunRecord:
    """A run the store reader read, as :meth:`RunRecord.of` makes it of the same run read by MLflow."""
    return RunRecord(
        run_id=run.run_id,
        name=run.name or "",
        experiment_id=run.experiment_id,
        status=run.status,
        start_time=int(run.start_time or 0),
        end_time=run.end_time,
        artifact_uri=run.artifact_uri,
        params=dict(run.params),
        tags=dict(run.tags),
        metrics=dmgl_metrics(dict(run.metrics)),
    )


class RunQueries(TrackerBase):
    def _read(self, query: Callable[[SqliteStoreReader], T]) -> T | _Unread:
        """``query``'s answer from the store reader (:meth:`store_reader`), or :data:`UNREAD` where there is none
        here or it failed (a lock held past its busy timeout): the caller then asks MLflow."""
        reader = self.store_reader()
        if reader is None:
            return UNREAD
        try:
            return query(reader)
        except sqlite3.Error as exc:
            logger.debug("the store reader could not read %s (%s); reading through MLflow", self.uri, exc)
            return UNREAD

    def _run_or_none(self, run_id: str) -> RunRecord | None:
        """The run ``run_id``, or None where there is none. A deleted run is read through MLflow, which gives it."""
        stored = self._read(lambda reader: reader.get_run(run_id))
        if isinstance(stored, StoredRun):
            return stored_record(stored)
        if stored is None and self._read(lambda reader: reader.run_exists(run_id)) is False:
            return None
        try:
            return RunRecord.of(self.client.get_run(run_id))
        except mlflow_exception():
            return None

    def get_run(self, run_id: str) -> RunRecord:
        self.flush(run_id)
        run = self._run_or_none(run_id)
        if run is None:
            raise DmglError(no_such_run(run_id, self.uri))
        self._artifact_uris[run.run_id] = run.artifact_uri
        return run

    def find_run(self, reference: str) -> RunRecord:
        """The run a user named: its whole id, a prefix of its id (at least :data:`RUN_ID_PREFIX_MIN` characters,
        as ``runs compare`` prints them) or its name. A reference that fits several runs, or none, is a DmglError
        listing the candidates (at most :data:`SHOWN_CANDIDATES`) or saying it matches nothing."""
        text = reference.strip()
        if FULL_RUN_ID.match(text):
            run = self._run_or_none(text)
            if run is not None:
                return run  # else not an id here; it may still be a name
        try:
            experiment_ids = list(self.experiments())
            found: dict[str, RunRecord] = {}
            if experiment_ids and RUN_ID_PREFIX.match(text) and len(text) >= RUN_ID_PREFIX_MIN:
                # one more than is shown, to know that there are more
                for run in self.search(experiment_ids, f"attributes.run_id LIKE '{text}%'", SHOWN_CANDIDATES + 1):
                    found[run.run_id] = run
            if experiment_ids and SEARCHABLE_NAME.match(text):
                for run in self.search(experiment_ids, f"attributes.run_name = '{text}'", SHOWN_CANDIDATES + 1):
                    found[run.run_id] = run
        except mlflow_exception() as exc:
            raise DmglError(f"cannot search runs in the MLflow store {self.uri} ({exc.message})") from None
        if len(found) == 1:
            return next(iter(found.values()))
        if not found:
            short = (
                f"; an id prefix needs at least {RUN_ID_PREFIX_MIN} characters"
                if RUN_ID_PREFIX.match(text) and len(text) < RUN_ID_PREFIX_MIN
                else ""
            )
            raise DmglError(
                f"run {reference!r} does not exist in {self.uri}: no run has that id, an id starting with it or "
                f"that name{short}; `dmgl runs list --role all` lists the runs"
            )
        candidates = sorted(found.values(), key=lambda r: (-r.start_time, r.run_id))
        shown = "\n".join(f"  {candidate_line(run)}" for run in candidates[:SHOWN_CANDIDATES])
        more = "\n  ... and more" if len(candidates) > SHOWN_CANDIDATES else ""
        raise DmglError(
            f"{reference!r} fits more than one run; give more of the id (or the whole id):\n{shown}{more}\n"
            "`dmgl runs list --role all` lists the runs"
        )

    def children(self, parent_id: str) -> list[RunRecord]:
        self.flush()
        run = self.get_run(parent_id)
        runs = self.search([run.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=10000)
        left = [child.run_id for child in runs if self.left_journal(child.run_id)]
        if left:  # journals a process that is gone left (a seed's status may wait there): sent first
            for run_id in left:
                self.flush(run_id)
            runs = self.search([run.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=10000)
        return sorted(runs, key=lambda r: int(r.tags.get("dmgl.seed", 0)))

    def search(self, experiment_ids: list[str], filter_string: str = "", max_results: int = 50000) -> list[RunRecord]:
        """The active runs of ``experiment_ids`` that ``filter_string`` (MLflow's search grammar) selects, newest
        first, at most ``max_results``."""
        query = reader_query(filter_string)
        if query is not None:
            found = self._read(lambda reader: reader.search(experiment_ids, max_results=max_results, **query))
            if not isinstance(found, _Unread):
                return [stored_record(run) for run in found]
        from mlflow.entities import ViewType

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
        found = self._read(lambda reader: reader.experiments(names))
        if not isinstance(found, _Unread) and (not names or len(found) == len(set(names))):
            return found  # else one named is deleted or missing: MLflow's answer (or its error) stands
        from mlflow.entities import ViewType
        from mlflow.exceptions import MlflowException

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
        name = self._read(lambda reader: reader.experiment_name(experiment_id))
        if isinstance(name, str):
            return name
        return self.client.get_experiment(experiment_id).name

    def find_runs(self, experiment_ids: list[str], filter_string: str = "") -> list[RunRecord]:
        """:meth:`search`, with a malformed filter reported as a DmglError. Metrics in the filter are named as dmgl
        names them (``metrics.final_val_acc``) and translated to their MLflow names (``val_selected/val_acc``)."""
        filter_string = METRIC_IN_FILTER.sub(
            lambda match: f"metrics.`{mlflow_metric_name(match.group(2))}`", filter_string
        )
        try:
            return self.search(experiment_ids, filter_string)
        except mlflow_exception() as exc:
            raise DmglError(f"MLflow could not search runs with filter {filter_string!r}: {exc.message}") from None

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of one metric (dmgl's key), by step; the last value logged wins for a repeated step.
        While the store is away, the values this process logged (a run it trained), from its journal."""
        name = mlflow_metric_name(key)
        if self._journal is not None and self._journal.away:
            kept = self._journal.logged_values(run_id, name)
            if kept:  # a run this process trains: what it logged is all there is to know
                return sorted(kept.items())
        self.flush(run_id)
        # A run recorded before the names were grouped has the flat name; one resumed across the change, both.
        # Each (step, value, timestamp), in MLflow's order.
        read = self._read(
            lambda reader: (
                reader.metric_history(run_id, key) if name != key else [],
                reader.metric_history(run_id, name),
            )
        )
        if isinstance(read, _Unread):
            client = self.client
            flat = (
                [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)] if name != key else []
            )
            grouped = [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, name)]
        else:
            flat, grouped = read
        by_step = {step: value for step, value, _ in sorted(flat, key=lambda m: m[2])}
        by_step.update({step: value for step, value, _ in sorted(grouped, key=lambda m: m[2])})
        return sorted(by_step.items())

    def logged_steps(self, run_id: str) -> set[tuple[str, int]]:
        """Every (metric key, step) already recorded on a run — what a resumed run must not log again."""
        self.get_run(run_id)  # a DmglError for a run that does not exist
        seen = set()
        for name in self.client.get_run(run_id).data.metrics:
            for metric in self.client.get_metric_history(run_id, name):
                seen.add((dmgl_metric_name(name), metric.step))
        return seen

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

    def read_text(self, run_id: str, artifact_file: str) -> str:
        self.flush(run_id)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(run_id, artifact_file, tmp)
            except (mlflow_exception(), OSError):
                raise DmglError(
                    f"run {run_id} has no artifact {artifact_file!r}; was it made by `dmgl train`?"
                ) from None
            return Path(path).read_text()
