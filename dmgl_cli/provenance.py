"""What is recorded about the process that makes a run, and whether a recorded process still lives.

Each run is tagged with its host, process id and that process's start time, the torch and CUDA versions, a
heartbeat and the git commit of the code; ``dmgl runs reconcile`` and the stale-run warning use the process id and
start time to tell a run whose process died (SIGKILL, OOM) from one that is still training.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from dmgl_cli.paths import repo_root


def git_commit() -> str | None:
    """The checkout's commit, or None outside a git checkout (an installed wheel)."""
    root = repo_root()
    if root is None:  # never ask git about a repository that merely encloses site-packages or the current folder
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (Linux /proc), so a recycled pid is not mistaken for our process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may contain spaces, so split after its closing ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, start_time: str | None) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``start_time`` (None: any)."""
    current = process_start_time(pid)
    return current is not None and (start_time is None or current == start_time)


def process_group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` lives (zombies, already dead, do not count); without /proc, whether
    the group can still be signalled."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def environment_tags() -> dict[str, str]:
    """The tags that say which process, on which host and with which torch, writes a run."""
    import torch

    return {
        "dmgl.host": platform.node(),
        "dmgl.pid": str(os.getpid()),
        "dmgl.pid_start": process_start_time(os.getpid()) or "",
        "dmgl.torch": torch.__version__,
        "dmgl.cuda": torch.version.cuda or "none",
        "dmgl.heartbeat": str(int(time.time())),
    }
