"""``dmgl sweep --devices``: one worker process per device on one study, started and stopped together.

* **One creator.** The launching process creates the study and its plan (or joins it, topping the plan up) exactly
  as ``--create-only`` does, before any worker starts: two processes creating one SQLite study at once can fail.
* **Workers are normal workers.** Each is ``python -m dmgl_cli sweep --study NAME --storage URL --tracking-uri URI``
  plus the internal ``--worker-device DEVICE``, which sets ``train.device`` of the trials it runs (and leaves the
  summary to the launcher). On a shared machine the CPU's cores are split: each worker gets ``cores // N`` torch
  threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``), unless the caller set ``OMP_NUM_THREADS`` already.
* **Process groups.** Each worker leads its own process group (``start_new_session``), so a terminal's Ctrl-C
  reaches the launcher only; on Linux the kernel sends SIGINT to a worker whose launcher died (even by SIGKILL). The
  launcher polls the workers' pipes with a bounded timeout and forwards their lines prefixed by device.
* **Stopping.** SIGINT, SIGTERM or SIGHUP to the launcher is passed on to every worker's group as SIGINT (a worker
  treats SIGINT and SIGTERM alike while training, and SIGINT is also caught while it starts up or waits); each
  worker stops after its current optimiser step, fails and re-enqueues its trial (its own Ctrl-C handling) and
  exits. A second signal is passed on again (the workers then stop at once); a group still alive after
  :data:`STOP_GRACE` seconds is SIGKILLed (its trial is retried after 3x the study's heartbeat). No worker, nor any
  process it started, outlives :func:`launch`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any

from optuna.trial import TrialState

from dmgl_cli.errors import DmglError
from dmgl_cli.paths import default_optuna_storage, ensure_registry
from dmgl_cli.provenance import process_group_alive

if TYPE_CHECKING:
    from dmgl_cli.sweep import SweepRequest
    from dmgl_cli.sweep.study import SweepOutcome
    from dmgl_cli.tracking import Tracker

STOP_GRACE = 60.0  # seconds a signalled worker gets to checkpoint, re-enqueue its trial and exit
KILL_WAIT = 5.0  # seconds to wait for a SIGKILLed group to be gone
PIPE_GRACE = 5.0  # seconds a worker's pipes may stay open after it exited (a straggler of its group holds them)
POLL = 0.2  # seconds between looks at the workers
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_CUDA_ITEM = re.compile(r"cuda:(\d+)")
_CPU_SPEC = re.compile(r"cpu(?::(\d+))?")
FORMS = "cpu, cpu:N (N CPU workers), cuda (every visible GPU) or a list such as cuda:0,cuda:1"


@dataclass(frozen=True)
class Slot:
    """One worker: its label in output (``cuda:1``, ``cpu#0``) and the ``train.device`` it trains on."""

    label: str
    device: str


def cuda_device_count() -> int:
    """Visible CUDA devices (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(spec: str, cuda_count: int | None = None) -> list[Slot]:
    """``cpu`` | ``cpu:N`` | ``cuda`` | ``cuda:I,cuda:J,...`` to one slot per worker; refuses a malformed list and
    a device this machine does not have. ``cuda_count`` is asked of torch when not given."""
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise DmglError(f"--devices {spec!r} is malformed; use {FORMS}")
    if any(item.startswith("cpu") for item in items):
        match = _CPU_SPEC.fullmatch(items[0])
        if len(items) > 1 or match is None:
            raise DmglError(f"--devices {spec!r}: CPU workers are given as one item, cpu or cpu:N; use {FORMS}")
        count = int(match.group(1) or 1)
        if count < 1:
            raise DmglError(f"--devices {spec!r}: the number of CPU workers must be >= 1")
        if count == 1:
            return [Slot("cpu", "cpu")]
        return [Slot(f"cpu#{i}", "cpu") for i in range(count)]
    for item in items:
        if item != "cuda" and not _CUDA_ITEM.fullmatch(item):
            raise DmglError(f"--devices {spec!r}: {item!r} is not a device; use {FORMS}")
    if "cuda" in items and len(items) > 1:
        raise DmglError(f"--devices {spec!r}: cuda (every visible GPU) cannot be combined with other devices")
    count = cuda_device_count() if cuda_count is None else cuda_count
    if count == 0:
        raise DmglError(f"--devices {spec!r}: CUDA is not available on this machine; use cpu or cpu:N")
    if items == ["cuda"]:
        return [Slot(f"cuda:{i}", f"cuda:{i}") for i in range(count)]
    indices = [int(item.partition(":")[2]) for item in items]
    seen: set[int] = set()
    for index in indices:
        if index in seen:
            raise DmglError(f"--devices {spec!r}: cuda:{index} is listed twice (one worker per device)")
        seen.add(index)
        if index >= count:
            visible = ", ".join(f"cuda:{i}" for i in range(count))
            raise DmglError(
                f"--devices {spec!r}: cuda:{index} does not exist; this machine has {count} CUDA "
                f"device{'s' if count > 1 else ''} ({visible})"
            )
    return [Slot(f"cuda:{i}", f"cuda:{i}") for i in indices]


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_threads(workers: int, cores: int | None = None) -> int:
    """Torch threads per worker: the cores split evenly, at least one."""
    return max(1, (cores or cpu_cores()) // workers)


# ------------------------------------------------------------------------------------------------ processes


@dataclass
class WorkerProcess:
    slot: Slot
    process: subprocess.Popen
    buffers: dict[str, bytes] = field(default_factory=dict)
    open_pipes: int = 2
    exited_at: float | None = None
    killed: bool = False

    @property
    def pgid(self) -> int:
        return self.process.pid  # start_new_session: the worker leads its own group


@dataclass
class WorkerExit:
    label: str
    device: str
    pid: int
    exit_code: int | None
    killed: bool  # SIGKILLed after the grace period
    trials: list[int]


@dataclass
class LaunchOutcome:
    """The study as the workers left it (``sweep``: records, summary, complete, interrupted) and each worker's end."""

    sweep: SweepOutcome
    workers: list[WorkerExit]
    command: str  # how to resume

    @property
    def failed(self) -> list[WorkerExit]:
        return [w for w in self.workers if w.exit_code != 0]

    def failure_message(self) -> str:
        ends = ", ".join(f"{w.label} exited with code {w.exit_code}" for w in self.failed)
        return (
            f"{len(self.failed)} of {len(self.workers)} sweep worker(s) failed: {ends} (their output is above, "
            f"prefixed [DEVICE]); the study is resumable: `{self.command}`"
        )


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _kill_group(worker: WorkerProcess) -> None:
    """SIGKILL the worker's whole group and wait (bounded) until it is gone; reaps the worker."""
    _signal_group(worker.pgid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT
    while time.monotonic() < deadline:
        worker.process.poll()
        if worker.process.returncode is not None and not process_group_alive(worker.pgid):
            break
        time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.process.wait(timeout=KILL_WAIT)


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """On Linux, a ``preexec_fn`` that has the kernel SIGINT the worker when the launcher dies, even by SIGKILL
    (the worker then stops as on Ctrl-C, re-enqueueing its trial)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGINT, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before the line above
            os._exit(1)

    return preexec


class _StopRequests:
    """SIGINT/SIGTERM/SIGHUP while installed: counted, never raised, so no worker is ever orphaned half-started;
    the launcher's loop acts on them."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum, _frame) -> None:
        self.signals.append(signum)

    def __enter__(self) -> _StopRequests:
        self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *_exc) -> None:
        for signum, old in self.previous.items():
            signal.signal(signum, old)


def _command(name: str, url: str, tracking_uri: str, slot: Slot, silent: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dmgl_cli",
        "sweep",
        "--study",
        name,
        "--storage",
        url,
        "--tracking-uri",
        tracking_uri,
        "--worker-device",
        slot.device,
        *(["--silent"] if silent else []),
    ]


def _environment(threads: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


@contextlib.contextmanager
def _workers() -> Iterator[list[WorkerProcess]]:
    """The started workers; whatever happens, every one of their groups is gone on leaving."""
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for worker in started:
            if worker.process.poll() is None or process_group_alive(worker.pgid):
                _kill_group(worker)
                worker.killed = worker.killed or worker.exited_at is None
            for pipe in (worker.process.stdout, worker.process.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()


def _pump(
    selector: selectors.BaseSelector,
    timeout: float,
    on_line: Callable[[str, str, bool], None],
) -> None:
    """Read what the workers wrote within ``timeout``; forward complete lines (and a last unterminated one)."""
    for key, _ in selector.select(timeout):
        worker, stream = key.data
        pipe: IO[bytes] = key.fileobj  # type: ignore[assignment]
        try:
            chunk = os.read(pipe.fileno(), 65536)
        except BlockingIOError:
            continue
        except OSError:
            chunk = b""
        text = worker.buffers.get(stream, b"") + chunk
        *lines, rest = text.split(b"\n")
        if not chunk and rest:
            lines, rest = [*lines, rest], b""
        worker.buffers[stream] = rest
        for line in lines:
            on_line(worker.slot.label, line.decode("utf-8", "replace").rstrip("\r"), stream == "err")
        if not chunk:
            selector.unregister(pipe)
            worker.open_pipes -= 1


def launch(
    request: SweepRequest,
    devices: str,
    *,
    tracker: Tracker,
    silent: bool = False,
    on_line: Callable[[str, str, bool], None] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> LaunchOutcome:
    """Create (or join and top up) the study, run one worker process per device on it, wait for all of them and
    return the study's state. ``on_line(label, text, is_stderr)`` gets each line a worker prints."""
    from dmgl_cli.sweep.storage import open_storage
    from dmgl_cli.sweep.study import run_sweep
    from dmgl_cli.sweep.summary import summary_table
    from dmgl_cli.sweep.worker import trial_record

    on_line = on_line or (lambda label, text, err: None)
    on_message = on_message or (lambda text: None)
    if request.create_only:
        raise DmglError(
            "--devices starts workers and --create-only starts none; use one of them (--devices creates the "
            "study itself before its workers join)"
        )
    if request.device is not None:
        raise DmglError("--devices cannot be combined with --worker-device")
    slots = parse_devices(devices)
    url = request.storage or default_optuna_storage(ensure_registry())
    prepared = run_sweep(replace(request, create_only=True), tracker=tracker, on_message=on_message)
    name = prepared.study
    threads = worker_threads(len(slots))
    storage_arg = f" --storage {prepared.storage}" if request.storage else ""
    resume = f"dmgl sweep --study {name}{storage_arg} --devices {devices}"
    on_message(
        f"starting {len(slots)} worker(s) on {', '.join(s.label for s in slots)}"
        + (f" ({threads} torch thread(s) each)" if "OMP_NUM_THREADS" not in os.environ else "")
    )
    env = _environment(threads)
    selector = selectors.DefaultSelector()
    exits: dict[int, int | None] = {}
    with _StopRequests() as stops, _workers() as workers:
        for slot in slots:
            if stops.signals:
                break
            process = subprocess.Popen(
                _command(name, url, tracker.uri, slot, silent),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),  # noqa: PLW1509 - nothing else forks meanwhile
            )
            worker = WorkerProcess(slot, process)
            workers.append(worker)
            for stream, pipe in (("out", process.stdout), ("err", process.stderr)):
                assert pipe is not None
                os.set_blocking(pipe.fileno(), False)
                selector.register(pipe, selectors.EVENT_READ, (worker, stream))
        forwarded = 0
        deadline: float | None = None
        while any(w.exited_at is None or w.open_pipes for w in workers):
            if len(stops.signals) > forwarded:
                signum = stops.signals[-1]
                forwarded = len(stops.signals)
                if deadline is None:
                    deadline = time.monotonic() + STOP_GRACE
                    on_message(
                        f"{signal.Signals(signum).name}: stopping {len(workers)} worker(s) (each re-enqueues its "
                        f"trial; a second signal stops them at once, and after {STOP_GRACE:.0f}s they are killed)"
                    )
                for worker in workers:
                    if worker.exited_at is None:
                        _signal_group(worker.pgid, signal.SIGINT)
            _pump(selector, POLL, on_line)
            now = time.monotonic()
            for worker in workers:
                if worker.exited_at is None and worker.process.poll() is not None:
                    worker.exited_at = now
                    exits[worker.process.pid] = worker.process.returncode
                late = worker.exited_at is not None and now - worker.exited_at > PIPE_GRACE
                overdue = deadline is not None and now > deadline and worker.exited_at is None
                if (late and worker.open_pipes) or overdue:
                    if overdue:
                        on_message(f"{worker.slot.label} did not stop within {STOP_GRACE:.0f}s: killing it")
                        worker.killed = True
                    _kill_group(worker)  # a straggler holding the pipes, or a worker past the grace period
                    if worker.exited_at is None:
                        worker.exited_at = time.monotonic()
                        exits[worker.process.pid] = worker.process.returncode
                    _pump(selector, 0, on_line)
                    for key in list(selector.get_map().values()):
                        if key.data[0] is worker:
                            selector.unregister(key.fileobj)
                            worker.open_pipes -= 1
        interrupted = bool(stops.signals)
    selector.close()

    storage = open_storage(url)
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    records = [trial_record(t, prepared.settings.metric) for t in trials]
    host = socket.gethostname()
    ends = []
    for worker in workers:
        mine = f"{host}:{worker.process.pid}"
        ran = sorted(t.number for t in trials if t.user_attrs.get("worker") == mine and t.state.is_finished())
        ends.append(
            WorkerExit(
                worker.slot.label,
                worker.slot.device,
                worker.process.pid,
                exits.get(worker.process.pid, worker.process.returncode),
                worker.killed,
                ran,
            )
        )
    pending = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    sweep = replace(
        prepared,
        records=records,
        ran=sorted(n for w in ends for n in w.trials),
        complete=not pending,
        interrupted=interrupted,
        summary=summary_table(records, prepared.settings, name),
    )
    return LaunchOutcome(sweep, ends, resume)
