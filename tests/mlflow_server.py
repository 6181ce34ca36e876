"""A real ``mlflow server`` that a test (or bench/tracking_outage.py) stops and starts again on the same port.

It runs in its own process group, killed as a group; every wait is bounded. The backend store is a SQLite file
and the artifacts are served by the server (``--artifacts-destination``), so a client writes them over HTTP, as a
remote artifact store is written.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TrackingServer:
    """``mlflow server`` on 127.0.0.1:``port`` with its store under ``folder``; :meth:`start` waits (at most
    ``start_timeout`` s) until it answers ``/health``, :meth:`stop` kills its process group."""

    def __init__(self, folder: Path, port: int | None = None, start_timeout: float = 180.0):
        self.folder, self.port, self.start_timeout = folder, port or free_port(), start_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        log = open(self.folder / "server.log", "a")
        self.process = subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.folder / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() kills the server and its workers together
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"mlflow server did not start:\n{self.log()[-3000:]}")
            time.sleep(0.3)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text() if path.exists() else ""
