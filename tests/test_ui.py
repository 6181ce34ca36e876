"""``dmgl ui`` starts and stops like a service: a port in use is refused before anything starts, the link comes
once the server answers, and SIGINT, SIGTERM or SIGHUP stop the whole process tree, which nothing outlives.

Every wait here is bounded and every test kills what it started in a ``finally``, so none can hang the suite.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from dmgl_cli import ui_server

# Seconds: the MLflow server's first answer on a loaded 2-core machine, and the stop (dmgl's grace + SIGKILL).
START_WAIT = 120
STOP_WAIT = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the process tree, from /proc ----------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time): a pid that is reused later names another process."""
    fields = _stat(pid)
    return (pid, fields[19]) if fields else None


def descendants(root: int) -> set[tuple[int, str]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))):
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if identity := _identity(pid):
            found.add(identity)
        stack += children.get(pid, [])
    return found


def alive(identity: tuple[int, str]) -> bool:
    """Whether that very process still runs (a zombie has exited: it counts as gone)."""
    fields = _stat(identity[0])
    return bool(fields) and _identity(identity[0]) == identity and fields[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def kill_groups(tree: set[tuple[int, str]]) -> None:
    """SIGKILL every process group the recorded tree had (the test's own cleanup, whatever happened)."""
    for pid, _ in tree:
        fields = _stat(pid)
        if fields and int(fields[2]) not in (0, os.getpgrp()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(fields[2]), signal.SIGKILL)


class UiProcess:
    """``dmgl ui`` as a subprocess in a session of its own; its output is read by threads so no wait can block."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dmgl_cli", "ui", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "DMGL_UI_START_TIMEOUT": str(START_WAIT), **(env or {})},
        )
        self.tree: set[tuple[int, str]] = set()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.lines: queue.Queue[str] = queue.Queue()
        for stream, into in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=self._read, args=(stream, into), daemon=True).start()

    def _read(self, stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)
            if into is self.stdout:
                self.lines.put(line)

    def record(self) -> None:
        self.tree |= descendants(self.process.pid)

    def wait_for_link(self, timeout: float = START_WAIT + 30) -> str:
        """The link line (printed once the server answers), recording the tree meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.record()
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if "MLflow UI ready" in line:
                self.record()
                return line
        raise AssertionError(f"dmgl ui printed no link within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    def stop(self, signum: int) -> int:
        """Send ``signum`` to the ``dmgl ui`` process alone (not its group) and wait, bounded, for it to exit."""
        self.record()
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dmgl ui did not exit within {STOP_WAIT} s of {signum}:\n{self.output()}") from None

    def survivors(self, grace: float = 5) -> list[str]:
        """The recorded processes still running after dmgl ui exited (they get ``grace`` seconds to finish)."""
        deadline = time.monotonic() + grace
        while (left := [p for p in self.tree if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        return [f"{pid} {cmdline(pid)}" for pid, _ in left]

    def kill(self) -> None:
        self.record()
        kill_groups(self.tree)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


# ---- refused before anything starts --------------------------------------------------------------------------


def test_a_port_in_use_is_refused_before_anything_starts(run_cli, monkeypatch):
    def no_server(*args, **kwargs):
        raise AssertionError("a server was started although the port is taken")

    monkeypatch.setattr(ui_server.subprocess, "Popen", no_server)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("ui", "--port", port, expect=1)
    assert f"port {port} on 127.0.0.1 is already in use" in result.output
    assert "--port" in result.output and result.output.count("Error:") == 1


def test_a_tracking_server_needs_no_ui(run_cli):
    result = run_cli("ui", "--tracking-uri", "http://tracking.example:5000", expect=1)
    assert "its UI is there already" in result.output


# ---- the stop path, against a stand-in server (fast) ---------------------------------------------------------

# A stand-in for `mlflow ui`: it answers /health, and leaves a child that ignores SIGTERM (so only the group
# SIGKILL ends it) and a grandchild; it writes their pids to a file.
FAKE_SERVER = textwrap.dedent(
    """
    import http.server, os, signal, subprocess, sys, time
    port, pids, healthy = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    stubborn = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \\
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", stubborn])
    with open(pids + ".tmp", "w") as handle:
        handle.write(f"{os.getpid()} {child.pid}")
    os.replace(pids + ".tmp", pids)
    if not healthy:
        time.sleep(600)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def do_POST(self):
            self.send_response(404)
            self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
    """
)


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    """Make ``serve`` start the stand-in; yields (switch for /health, the tree recorded once it had started)."""
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    pids = tmp_path / "pids"
    healthy = {"value": "1"}
    tree: set[tuple[int, str]] = set()

    def command(uri, address, workers):
        return [sys.executable, str(script), str(address.port), str(pids), healthy["value"]]

    wait_healthy = ui_server.wait_healthy

    def recording_wait(server, address, timeout):
        # The whole stand-in tree (3 processes) before dmgl starts waiting for it to answer.
        deadline = time.monotonic() + 20
        while len(tree) < 3 and time.monotonic() < deadline:
            if pids.exists():
                tree.update(descendants(int(pids.read_text().split()[0])))
            time.sleep(0.05)
        return wait_healthy(server, address, timeout)

    monkeypatch.setattr(ui_server, "server_command", command)
    monkeypatch.setattr(ui_server, "wait_healthy", recording_wait)
    monkeypatch.setattr(ui_server, "STOP_GRACE", 1.0)
    yield healthy, tree
    kill_groups(tree)


@pytest.mark.integration
def test_a_signal_stops_the_whole_group_even_a_process_that_ignores_sigterm(registry, fake_server):
    _, tree = fake_server
    seen: dict[str, object] = {}
    handlers = {signum: signal.getsignal(signum) for signum in ui_server.STOP_SIGNALS}

    def ready(address, experiment_id, seconds):
        os.kill(os.getpid(), signal.SIGTERM)  # as if sent from outside: the handler turns it into a stop

    code = ui_server.serve(
        None, "127.0.0.1", free_port(), on_ready=ready, on_stop=lambda name: seen.setdefault("stopped", name)
    )
    assert code == 0 and seen["stopped"] == "SIGTERM"
    assert len(tree) == 3  # the stand-in, its child that ignores SIGTERM, and the grandchild
    assert not [p for p in tree if alive(p)]
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers  # dmgl's handlers are gone again


@pytest.mark.integration
def test_a_server_that_never_answers_is_an_error_and_is_stopped(run_cli, fake_server, monkeypatch):
    healthy, tree = fake_server
    healthy["value"] = "0"
    monkeypatch.setenv("DMGL_UI_START_TIMEOUT", "3")
    result = run_cli("ui", "--port", free_port(), expect=1)
    assert "did not answer" in result.output and "DMGL_UI_START_TIMEOUT" in result.output
    assert "MLflow UI ready" not in result.output
    assert len(tree) == 3 and not [p for p in tree if alive(p)]


# ---- the real MLflow server, in a subprocess ----------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_leaves_no_process_of_the_tree(registry, signum):
    port = free_port()
    ui = UiProcess("--port", str(port))
    try:
        link = ui.wait_for_link()
        assert f"http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning" in link
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
        commands = [cmdline(pid) for pid, _ in ui.tree]
        # Lean: dmgl ui, the `mlflow ui` wrapper and one uvicorn worker; no job runner, no huey consumers.
        assert len(ui.tree) <= 4, commands
        assert not [c for c in commands if "huey" in c or "_job_runner" in c], commands
        assert ui.stop(signum) == 0, ui.output()
        assert f"{signum.name}: stopped the MLflow UI" in ui.output()
        assert not ui.survivors(), ui.output()
        assert "Traceback" not in ui.output()
    finally:
        ui.kill()


@pytest.mark.integration
def test_even_a_sigkilled_dmgl_ui_takes_its_server_down(registry):
    # No handler sees SIGKILL: the kernel's parent-death signal SIGTERMs `mlflow ui`, which stops uvicorn.
    ui = UiProcess("--port", str(free_port()))
    try:
        ui.wait_for_link()
        assert ui.stop(signal.SIGKILL) == -signal.SIGKILL
        assert not ui.survivors(grace=STOP_WAIT), ui.output()
    finally:
        ui.kill()


@pytest.mark.integration
def test_ui_binds_elsewhere_only_with_allow_remote_and_warns(registry):
    port = free_port()
    # 127.0.0.2 is another loopback address: not the default, so it needs the flag, yet stays on this machine.
    ui = UiProcess("--host", "127.0.0.2", "--port", str(port), "--allow-remote", "--workers", "2")
    try:
        link = ui.wait_for_link()
        assert f"http://127.0.0.2:{port}/#/experiments" in link
        # The printed address works in a browser: MLflow accepts its Host header (dmgl adds it to --allowed-hosts).
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/", timeout=10) as response:
            assert response.status == 200
        assert len([pid for pid, _ in ui.tree if "spawn_main" in cmdline(pid)]) == 2  # --workers 2
        assert ui.stop(signal.SIGTERM) == 0
        assert not ui.survivors(), ui.output()
    finally:
        ui.kill()
    assert "no authentication" in ui.output()


# ---- quiet by default, and its port recorded for the links other commands print --------------------------------


def test_the_server_output_is_quiet_unless_asked(tmp_path):
    import io

    noisy = (
        b"Registry store URI not provided. Using backend store URI.\n"
        b"[MLflow] Security middleware enabled with default settings (localhost-only).\n"
        b"2026/12/04 WARNING mlflow: something worth seeing\n"
    )
    quiet, everything = io.StringIO(), io.StringIO()
    ui_server.forward_output(io.BytesIO(noisy), quiet, quiet=True)
    ui_server.forward_output(io.BytesIO(noisy), everything, quiet=False)
    assert quiet.getvalue() == "2026/12/04 WARNING mlflow: something worth seeing\n"
    assert everything.getvalue() == noisy.decode()


def test_a_running_ui_is_recorded_for_its_store_and_forgotten(registry, monkeypatch):
    from dmgl_cli import links

    monkeypatch.delenv("DMGL_UI_URL", raising=False)
    uri = f"sqlite:///{registry / 'mlflow.db'}"
    registry.mkdir(parents=True)
    assert links.ui_base(uri) == links.DEFAULT_UI_URL
    links.record_ui(uri, "http://127.0.0.1:5123")
    assert links.ui_record_path(uri) == registry / "mlflow.db.ui.json"
    assert links.ui_base(uri) == "http://127.0.0.1:5123"
    monkeypatch.setenv("DMGL_UI_URL", "http://example:8080")  # said explicitly: it wins
    assert links.ui_base(uri) == "http://example:8080"
    monkeypatch.delenv("DMGL_UI_URL")
    links.forget_ui(uri)
    assert links.ui_base(uri) == links.DEFAULT_UI_URL
    # a record left by a process that is gone (a SIGKILLed dmgl ui) is not believed
    links.ui_record_path(uri).write_text('{"url": "http://127.0.0.1:5124", "pid": 999999999, "pid_start": "1"}')
    assert links.recorded_ui(uri) is None


@pytest.mark.integration
def test_serve_records_its_address_while_it_serves_and_is_quiet(registry, fake_server, monkeypatch):
    from dmgl_cli import links
    from dmgl_cli.paths import default_tracking_uri

    started: list[list[str]] = []
    popen = ui_server.subprocess.Popen

    def recording_popen(command, **kwargs):
        started.append(list(command))
        return popen(command, **kwargs)

    monkeypatch.setattr(ui_server.subprocess, "Popen", recording_popen)
    seen: dict[str, object] = {}

    def ready(address, experiment_id, seconds):
        seen["recorded"] = links.recorded_ui(default_tracking_uri())
        seen["address"] = address.base_url
        os.kill(os.getpid(), signal.SIGTERM)

    assert ui_server.serve(None, "127.0.0.1", free_port(), on_ready=ready) == 0
    assert seen["recorded"] == seen["address"]
    assert links.recorded_ui(default_tracking_uri()) is None
    assert started[0][-2:] == ui_server.QUIET_UVICORN_OPTIONS
