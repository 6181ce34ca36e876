"""``dmgl ui``: the MLflow UI server over the registry, run as a child process (MLflow's own ``mlflow ui``)."""

from __future__ import annotations

import signal
import subprocess
import sys

from dmgl_cli.paths import default_artifacts_dir, default_tracking_uri, ensure_registry, resolve_tracking_uri


def launch_ui(tracking_uri: str | None, host: str, port: int) -> int:
    """Run ``mlflow ui`` over the store in the foreground; returns its exit code."""
    uri = resolve_tracking_uri(tracking_uri)
    # The MLflow of dmgl's own environment, whether or not that environment is activated.
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri == default_tracking_uri():
        ensure_registry()
        command += ["--default-artifact-root", default_artifacts_dir().as_uri()]
    server = subprocess.Popen(command)
    try:
        return server.wait()
    except KeyboardInterrupt:
        # Hand Ctrl-C on to MLflow so that it stops its own worker processes, rather than orphaning them.
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        return 0
