"""Links into the MLflow UI: what ``dmgl ui``, ``train``, ``sweep`` and ``eval`` print.

MLflow 3's UI opens an experiment in its GenAI view unless the URL asks for the "Model training" view with
``?workflowType=machine_learning`` (the ``mlflow.experimentKind`` tag is not read by MLflow 3.17), so every link
carries it. The UI's address is the tracking server itself when runs go to a server (``http(s)://``), else
``$DMGL_UI_URL`` when set, else the address a running ``dmgl ui`` over the same store serves on (it records it while
it runs: :func:`record_ui`), else http://127.0.0.1:5000, the address ``dmgl ui`` serves on by default.

The routes are those of MLflow 3.17's UI (checked in a browser by tests/test_browser.py): ``#/experiments/<id>/runs``
is an experiment's runs table (seed runs nested under their parent), ``#/experiments/<id>/runs/<run>`` a run's page
and ``.../<run>/model-metrics`` its metric charts (``alpha/value`` among them). The UI's own links inside a page do
not carry the view, so a page reached by clicking may switch back to the GenAI side bar; its content is the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from dmgl_cli.paths import registry_home
from dmgl_cli.provenance import process_alive, process_start_time

DEFAULT_UI_URL = "http://127.0.0.1:5000"
VIEW = "workflowType=machine_learning"


def ui_record_path(tracking_uri: str) -> Path:
    """Where a running ``dmgl ui`` over ``tracking_uri`` records its address: beside a SQLite store's database (so
    that every process using that store finds it, whatever its DMGL_HOME), else in the registry, per store."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///") :])
        return database.with_name(database.name + ".ui.json")
    digest = hashlib.sha1(tracking_uri.encode()).hexdigest()[:12]
    return registry_home() / f"ui-{digest}.json"


def record_ui(tracking_uri: str, base_url: str) -> None:
    """Record that this process serves the UI of ``tracking_uri`` at ``base_url`` (for :func:`ui_base`)."""
    pid = os.getpid()
    with contextlib.suppress(OSError):  # a read-only store: links fall back to the default address
        ui_record_path(tracking_uri).write_text(
            json.dumps({"url": base_url, "pid": pid, "pid_start": process_start_time(pid)})
        )


def forget_ui(tracking_uri: str) -> None:
    """Remove this process's record (:func:`record_ui`), leaving another process's alone."""
    path = ui_record_path(tracking_uri)
    if _read_record(path).get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def recorded_ui(tracking_uri: str) -> str | None:
    """The address a ``dmgl ui`` over ``tracking_uri`` serves on while it runs; None when none runs (a record left
    by a process that is gone, e.g. SIGKILLed, does not count)."""
    record = _read_record(ui_record_path(tracking_uri))
    url, pid = record.get("url"), record.get("pid")
    if not isinstance(url, str) or not isinstance(pid, int) or not process_alive(pid, record.get("pid_start")):
        return None
    return url


def ui_base(tracking_uri: str) -> str:
    """The UI's address for runs recorded at ``tracking_uri`` (the module's docstring says which)."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    chosen = os.environ.get("DMGL_UI_URL") or recorded_ui(tracking_uri) or DEFAULT_UI_URL
    return chosen.rstrip("/")


def experiments_url(base: str) -> str:
    return f"{base}/#/experiments?{VIEW}"


def experiment_runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table."""
    return f"{base}/#/experiments/{experiment_id}/runs?{VIEW}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{VIEW}"


def run_metrics_url(base: str, experiment_id: str, run_id: str) -> str:
    """A run's metric charts (the "Model metrics" tab of its page)."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{VIEW}"
