"""Scale-out on real servers: an MLflow tracking server on PostgreSQL, an Optuna study on PostgreSQL joined by two
`dmgl sweep` workers, and `dmgl train` writing to the server. `.ci/run` installs and starts PostgreSQL (Debian's
package, on 127.0.0.1) and sets DMGL_TEST_POSTGRES_URL; elsewhere these tests are skipped with that reason.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from tiny import tiny_run

from dmgl_cli.tracking import Tracker, mlflow_metric_name

ADMIN_URL = os.environ.get("DMGL_TEST_POSTGRES_URL")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not ADMIN_URL, reason="needs PostgreSQL: .ci/run starts one and sets DMGL_TEST_POSTGRES_URL"),
]


@pytest.fixture
def databases():
    """Two fresh PostgreSQL databases (MLflow backend, Optuna storage), dropped afterwards."""
    import psycopg

    names = [f"dmgl_test_{uuid.uuid4().hex[:10]}_{kind}" for kind in ("mlflow", "optuna")]
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        for name in names:
            connection.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0]
    yield [f"{base}/{name}" for name in names]
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        for name in names:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(databases, tmp_path):
    """`mlflow server` on 127.0.0.1 with the PostgreSQL backend store; yields its URL."""
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            databases[0],
            "--default-artifact-root",
            (tmp_path / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise AssertionError((tmp_path / "mlflow-server.log").read_text()[-3000:])
        time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _dmgl(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dmgl_cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def test_two_sweep_workers_and_a_training_on_postgresql(synthetic, databases, mlflow_server):
    optuna_url = databases[1]
    fast = tiny_run(epochs=2)
    strategies = "constant:0,constant:0.5,heuristic,lb"
    _finish(
        _dmgl(
            "sweep",
            "--study",
            "pg",
            "--storage",
            optuna_url,
            "--strategies",
            strategies,
            "--seeds",
            "2",
            "--tracking-uri",
            mlflow_server,
            "--create-only",
            *fast,
        )
    )
    workers = [
        _dmgl("sweep", "--study", "pg", "--storage", optuna_url, "--tracking-uri", mlflow_server) for _ in range(2)
    ]
    trainer = _dmgl("train", "--strategy", "lb", "--epochs", "3", "--seeds", "2", "--tracking-uri", mlflow_server)
    outputs = [_finish(w) for w in workers]
    train_output = _finish(trainer)

    study = optuna.load_study(study_name="pg", storage=optuna_url)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and len(trials) == 4  # requested 4, completed 4: none lost, none duplicated
    assert len({t.params["strategy"] for t in complete}) == 4
    for trial in complete:  # each trial ran on exactly one of the two workers
        assert sum(len(re.findall(rf"^trial\s+{trial.number}\b", o, re.M)) for o in outputs) == 1

    tracker = Tracker(mlflow_server)
    for trial in complete:
        trial_run = tracker.get_run(trial.user_attrs["mlflow_run_id"])
        assert trial_run.status == "FINISHED"
        children = tracker.children(trial_run.run_id)
        assert len(children) == 2
        for child in children:
            steps = [m.step for m in tracker.client.get_metric_history(child.run_id, mlflow_metric_name("val_acc"))]
            assert sorted(steps) == [1, 2]
    parent_id = re.search(r"parent run ([0-9a-f]{32})", train_output).group(1)
    assert tracker.get_run(parent_id).status == "FINISHED"
    for child in tracker.children(parent_id):
        for key in ("alpha", "train_loss", "val_acc", "val_acc_slow"):
            history = tracker.client.get_metric_history(child.run_id, mlflow_metric_name(key))
            assert sorted(m.step for m in history) == [1, 2, 3]
        # test: at each new best epoch on validation (the first always is) and at the last
        tested = sorted(m.step for m in tracker.client.get_metric_history(child.run_id, mlflow_metric_name("test_acc")))
        assert tested[0] == 1 and tested[-1] == 3
        assert child.metrics["final_test_acc"] > 0
