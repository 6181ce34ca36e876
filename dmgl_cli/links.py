"""Links into the MLflow UI: what ``dmgl ui``, ``train``, ``sweep`` and ``eval`` print.

MLflow 3's UI opens an experiment in its GenAI view unless the URL asks for the "Model training" view with
``?workflowType=machine_learning`` (the ``mlflow.experimentKind`` tag is not read by MLflow 3.17), so every link
carries it. The UI's address is the tracking server itself when runs go to a server (``http(s)://``), else the
address ``dmgl ui`` serves on (``$DMGL_UI_URL``, default http://127.0.0.1:5000).

The routes are those of MLflow 3.17's UI (checked in a browser by tests/test_browser.py): ``#/experiments/<id>/runs``
is an experiment's runs table (seed runs nested under their parent), ``#/experiments/<id>/runs/<run>`` a run's page
and ``.../<run>/model-metrics`` its metric charts (``alpha/value`` among them). The UI's own links inside a page do
not carry the view, so a page reached by clicking may switch back to the GenAI side bar; its content is the same.
"""

from __future__ import annotations

import os

DEFAULT_UI_URL = "http://127.0.0.1:5000"
VIEW = "workflowType=machine_learning"


def ui_base(tracking_uri: str) -> str:
    """The UI's address for runs recorded at ``tracking_uri``."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return os.environ.get("DMGL_UI_URL", DEFAULT_UI_URL).rstrip("/")


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
