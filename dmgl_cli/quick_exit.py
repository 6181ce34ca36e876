"""Ending the ``dmgl`` process as soon as its command is done, without the interpreter's teardown.

Once a command has returned and its output is flushed, CPython's finalisation still frees every module and object
one by one. With torch, MLflow and SQLAlchemy loaded that takes 1.3-2.3 s on 2 CPU cores, and the command has
nothing left to do by then (``dmgl train``'s checkpoints and logged model are written before it returns).
:func:`run_then_exit` does what a normal exit does that has an effect outside the process (join the threads that are
not daemons, run the ``atexit`` handlers: logging's flush, multiprocessing's worker clean-up, the tracking journal's
drain; flush stdout and stderr) and then ends the process with ``os._exit``.

Only the console script and ``python -m dmgl_cli`` go through it; tests that invoke the click group in-process never
do.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def run_then_exit(command: Callable[[], object]) -> NoReturn:
    """Run ``command`` (a click command in standalone mode, which ends in ``SystemExit``) and end the process with
    its exit code. An exit with a message (``SystemExit("text")``), any other exception, and a process run under a
    profiler, coverage or a debugger (``python -m cProfile -m dmgl_cli ...``) take Python's normal way out."""
    try:
        command()
        code: object = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code
    if not isinstance(code, int) or sys.getprofile() is not None or sys.gettrace() is not None:
        # a message to print, or a profiler, coverage or debugger that writes its results after the program
        raise SystemExit(code)
    end_process(code)


def end_process(code: int) -> NoReturn:
    """What a normal interpreter exit does that is seen outside the process, then ``os._exit(code)``."""
    current = threading.current_thread()
    for thread in threading.enumerate():  # as threading's own shutdown does before the atexit handlers
        if thread is not current and not thread.daemon and thread.is_alive():
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 (CPython's own call at exit; there is no public one)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)
