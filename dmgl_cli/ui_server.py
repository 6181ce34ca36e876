"""``dmgl ui``: MLflow's tracking server (``mlflow ui``) over the registry, started and stopped like a service.

- The port is checked before anything starts: a port in use is one clear error, not a server that dies later.
- The server runs in its own process group (``start_new_session``), so a terminal's Ctrl-C reaches ``dmgl ui``
  only, and SIGINT, SIGTERM and SIGHUP to ``dmgl ui`` stop the whole group: SIGTERM to the group, a bounded
  wait, then SIGKILL. ``mlflow ui`` is a wrapper over uvicorn and its workers; nothing of the tree survives.
  Should ``dmgl ui`` itself be SIGKILLed, the kernel SIGTERMs the wrapper (Linux's parent-death signal), which
  stops uvicorn in turn.
- Lean by default: one uvicorn worker, and none of MLflow 3's job execution (a job runner and seven huey
  consumers that run GenAI scorers and periodic trace jobs; a read-only view of training runs needs none of them).
- The link is printed once the server answers ``GET /health``; the wait is bounded and ends in a clear error.
- Quiet by default, so that the link stands out: no access log (one line per request, hundreds an hour while a
  browser is open), no start-up chatter (uvicorn's and MLflow's INFO lines, Python warnings, the notes of
  ``mlflow ui`` itself); the server's warnings and errors still show. ``access_log=True`` (``dmgl ui
  --access-log``) shows all of it, as ``mlflow ui`` prints it.
- While it serves, its address is recorded for the store (:func:`dmgl_cli.links.record_ui`), so that the links
  ``dmgl train`` and the other commands print point at this port.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from dmgl_cli.errors import DmglError
from dmgl_cli.links import forget_ui, record_ui
from dmgl_cli.paths import default_artifacts_dir, default_tracking_uri, ensure_registry, resolve_tracking_uri
from dmgl_cli.provenance import process_group_alive

DEFAULT_WORKERS = 1
# MLflow's own switch for its job runner and huey consumers (mlflow.environment_variables).
LEAN_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# Quiet (without --access-log): uvicorn logs warnings only and no requests; MLflow's loggers and Python's warnings
# are off unless the user's environment sets them.
QUIET_UVICORN_OPTIONS = ["--uvicorn-opts", "--log-level warning --no-access-log"]
QUIET_ENV_DEFAULTS = {"MLFLOW_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore"}
# What `mlflow ui` itself prints on every start (to stdout or stderr, not through logging).
QUIET_DROPPED = (
    "Backend store URI not provided",
    "Registry store URI not provided",
    "[MLflow] Security middleware enabled",
)
# Seconds: the server's first answer (about 12 s on an idle 2-core machine, a minute or more on a loaded one),
# the grace SIGTERM gets before SIGKILL, and the wait for the group to be gone after SIGKILL.
START_TIMEOUT = 180.0
STOP_GRACE = 10.0
KILL_WAIT = 5.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_WILDCARD = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class StopSignal(Exception):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) reached ``dmgl ui``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Address:
    """Where the server binds (``host``), where dmgl and the browser reach it (``connect``), and its URL."""

    host: str
    port: int

    @property
    def connect(self) -> str:
        return _WILDCARD.get(self.host, self.host)

    @property
    def base_url(self) -> str:
        host = f"[{self.connect}]" if ":" in self.connect else self.connect
        return f"http://{host}:{self.port}"


def check_port_free(address: Address) -> None:
    """Raise DmglError unless ``host:port`` can be bound now (with SO_REUSEADDR, as uvicorn binds it)."""
    try:
        infos = socket.getaddrinfo(address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise DmglError(f"--host {address.host}: cannot resolve it ({exc.strerror})") from None
    errors: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise DmglError(
                        f"port {address.port} on {address.host} is already in use (another `dmgl ui` or MLflow "
                        "server?); stop it, or pick another port with --port"
                    ) from None
                if exc.errno == errno.EACCES:
                    raise DmglError(
                        f"no permission to bind port {address.port}; pick a port above 1023 with --port"
                    ) from None
                errors.append(exc)
    if errors and len(errors) == len(infos):
        raise DmglError(f"cannot bind {address.host}:{address.port}: {errors[0].strerror or errors[0]}")


def server_command(uri: str, address: Address, workers: int) -> list[str]:
    # The MLflow of dmgl's own environment, whether or not that environment is activated.
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", address.host, "--port", str(address.port), "--workers", str(workers)]
    if uri == default_tracking_uri():
        command += ["--default-artifact-root", default_artifacts_dir().as_uri()]
    if address.host not in _LOOPBACK and address.host not in _WILDCARD:
        # MLflow answers only Host headers of localhost and private networks by default; the address dmgl prints
        # must work too (--allow-remote has been given for it).
        hosts = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "[::1]", "[::1]:*"]
        name = f"[{address.host}]" if ":" in address.host else address.host
        command += ["--allowed-hosts", ",".join([*hosts, name, f"{name}:{address.port}"])]
        command += ["--cors-allowed-origins", f"http://{name}:{address.port}"]
    return command


def _request(address: Address, method: str, path: str, body: dict | None = None, timeout: float = 5.0):
    """One HTTP request to the server; returns (status, parsed JSON or None). Raises OSError when unreachable."""
    connection = http.client.HTTPConnection(address.connect, address.port, timeout=timeout)
    try:
        # MLflow's DNS-rebinding guard always accepts a localhost Host header.
        headers = {"Host": f"localhost:{address.port}", "Content-Type": "application/json"}
        connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = connection.getresponse()
        data = response.read()
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = None
        return response.status, parsed
    except http.client.HTTPException as exc:
        raise OSError(str(exc)) from exc
    finally:
        connection.close()


def start_timeout() -> float:
    """Seconds to wait for the server's first answer: ``$DMGL_UI_START_TIMEOUT`` or :data:`START_TIMEOUT`."""
    value = os.environ.get("DMGL_UI_START_TIMEOUT", "")
    try:
        return float(value) if value else START_TIMEOUT
    except ValueError:
        raise DmglError(f"DMGL_UI_START_TIMEOUT must be a number of seconds, got {value!r}") from None


def wait_healthy(server: subprocess.Popen, address: Address, timeout: float) -> float:
    """Wait until ``GET /health`` answers 200; returns the seconds it took. Raises DmglError on exit or timeout."""
    start = time.monotonic()
    last_error: object = None
    while True:
        code = server.poll()
        if code is not None:
            raise DmglError(f"the MLflow server exited (code {code}) before it answered; its output is above")
        try:
            status, _ = _request(address, "GET", "/health", timeout=2.0)
            if status == 200:
                return time.monotonic() - start
            last_error = f"HTTP {status}"
        except OSError as exc:
            last_error = exc
        if time.monotonic() - start > timeout:
            raise DmglError(
                f"the MLflow server did not answer {address.base_url}/health within {timeout:.0f} s "
                f"(last: {last_error}); stopped it. On a busy machine, set DMGL_UI_START_TIMEOUT to wait longer"
            )
        time.sleep(0.25)


def latest_experiment(address: Address) -> str | None:
    """The id of the experiment that holds the most recently started run, asked of the server; None if no run."""
    try:
        status, found = _request(
            address, "POST", "/api/2.0/mlflow/experiments/search", {"max_results": 100, "view_type": "ACTIVE_ONLY"}
        )
        ids = [e["experiment_id"] for e in (found or {}).get("experiments", [])] if status == 200 else []
        if not ids:
            return None
        status, runs = _request(
            address,
            "POST",
            "/api/2.0/mlflow/runs/search",
            {"experiment_ids": ids, "max_results": 1, "order_by": ["attributes.start_time DESC"]},
        )
        listed = (runs or {}).get("runs", []) if status == 200 else []
        return listed[0]["info"]["experiment_id"] if listed else None
    except (OSError, KeyError, TypeError):
        return None


def forward_output(source: IO[bytes], destination: IO[str], quiet: bool) -> None:
    """Copy the server's output to ``destination`` line by line until it closes, leaving out, when ``quiet``, the
    notes ``mlflow ui`` prints on every start (:data:`QUIET_DROPPED`)."""
    for raw in iter(source.readline, b""):
        line = raw.decode(errors="replace")
        if quiet and line.lstrip().startswith(QUIET_DROPPED):
            continue
        with contextlib.suppress(OSError, ValueError):  # our stderr closed: the server's output has nowhere to go
            destination.write(line)
            destination.flush()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _wait_group(server: subprocess.Popen, pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        server.poll()  # reaps the direct child, so it does not linger as a zombie
        if not process_group_alive(pgid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def stop_group(server: subprocess.Popen, grace: float | None = None) -> None:
    """SIGTERM the server's whole process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    pgid = server.pid  # start_new_session: the server leads its own group
    _signal_group(pgid, signal.SIGTERM)
    if not _wait_group(server, pgid, STOP_GRACE if grace is None else grace):
        _signal_group(pgid, signal.SIGKILL)
        _wait_group(server, pgid, KILL_WAIT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=KILL_WAIT)


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """On Linux, a ``preexec_fn`` that has the kernel SIGTERM the server's wrapper when ``dmgl ui`` dies, even by
    SIGKILL, which no handler sees; the wrapper (``mlflow ui``) hands SIGTERM on to uvicorn, which stops."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # dmgl ui died before the line above: stop now
            os._exit(1)

    return preexec


class _StopSignals:
    """SIGINT/SIGTERM/SIGHUP while installed: the first raises :class:`StopSignal` (held back while the server is
    being spawned, so it can never be orphaned half-started), a further one SIGKILLs the server's group at once."""

    def __init__(self):
        self.received: int | None = None
        self.armed = False
        self.pgid: int | None = None
        self.previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum, _frame):
        if self.received is not None:
            if self.pgid is not None:
                _signal_group(self.pgid, signal.SIGKILL)
            return
        self.received = signum
        if self.armed:
            raise StopSignal(signum)

    def arm(self, pgid: int) -> None:
        """The server is spawned: from now on a signal raises; one held back raises now."""
        self.pgid, self.armed = pgid, True
        if self.received is not None:
            raise StopSignal(self.received)

    def stopping(self) -> None:
        """The group is being stopped: a signal from now on SIGKILLs it rather than interrupting the stop."""
        if self.received is None:
            self.received = signal.SIGTERM

    def __enter__(self) -> _StopSignals:
        self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *_exc) -> None:
        for signum, old in self.previous.items():
            signal.signal(signum, old)


def serve(
    tracking_uri: str | None,
    host: str,
    port: int,
    workers: int = DEFAULT_WORKERS,
    access_log: bool = False,
    on_start: Callable[[str], None] | None = None,
    on_ready: Callable[[Address, str | None, float], None] | None = None,
    on_stop: Callable[[str], None] | None = None,
) -> int:
    """Run the MLflow UI until a stop signal; returns the exit code for ``dmgl ui``.

    ``access_log``: the server's request log and start-up messages as ``mlflow ui`` prints them (else quiet, see
    the module's docstring). ``on_start(tracking uri)`` is called once the checks passed, as the server starts;
    ``on_ready(address, experiment_id, seconds)`` is called once the server answers its health check, with the
    experiment of the latest run (None when there is no run); ``on_stop(signal name)`` once a signal stopped it.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        raise DmglError(f"runs go to the MLflow server at {uri}; its UI is there already, no `dmgl ui` needed")
    if workers < 1:
        raise DmglError(f"--workers must be >= 1, got {workers}")
    address = Address(host, port)
    timeout = start_timeout()
    check_port_free(address)
    if uri == default_tracking_uri():
        ensure_registry()
    if on_start is not None:
        on_start(uri)
    server: subprocess.Popen | None = None
    forwarder: threading.Thread | None = None
    command = server_command(uri, address, workers) + ([] if access_log else QUIET_UVICORN_OPTIONS)
    env = {**os.environ, **LEAN_ENV} if access_log else {**QUIET_ENV_DEFAULTS, **os.environ, **LEAN_ENV}
    signals = _StopSignals()
    try:
        with signals:
            try:
                server = subprocess.Popen(
                    command,
                    start_new_session=True,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent(os.getpid()),
                )
                signals.arm(server.pid)  # start_new_session: the server leads its own process group
                assert server.stdout is not None  # stdout=PIPE
                forwarder = threading.Thread(
                    target=forward_output, args=(server.stdout, sys.stderr, not access_log), daemon=True
                )
                forwarder.start()
                seconds = wait_healthy(server, address, timeout)
                record_ui(uri, address.base_url)  # the links other commands print now point here
                if on_ready is not None:
                    on_ready(address, latest_experiment(address), seconds)
                code = server.wait()
                if code != 0:
                    raise DmglError(f"the MLflow server stopped on its own (exit code {code}); its output is above")
                return 0
            finally:
                signals.stopping()
                forget_ui(uri)
                if server is not None:
                    stop_group(server)
                if forwarder is not None:
                    forwarder.join(timeout=KILL_WAIT)  # the server's last lines, before dmgl ui's own
    except StopSignal as stop:
        if on_stop is not None:
            with contextlib.suppress(OSError):
                on_stop(signal.Signals(stop.signum).name)
        return 0
