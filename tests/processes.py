"""Waiting on a command started in its own process group: bounded, and the whole group killed on a timeout."""

from __future__ import annotations

import os
import signal
import subprocess


def finish(process: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    """``process``'s (stdout, stderr) once it exits; after ``timeout`` seconds its group is killed and the test
    fails, naming ``what`` and showing the end of its output."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate(timeout=10)
        raise AssertionError(f"{what} did not finish in {timeout}s:\n{out[-3000:]}\n{err[-3000:]}") from None
