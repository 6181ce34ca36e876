"""User-facing errors.

Logic modules raise :class:`DmglError` for anything a user can cause (a bad name, a missing file, a value out of
range). The CLI turns it into one clear message and a non-zero exit, without a traceback. Programming errors stay
ordinary exceptions so that they keep their tracebacks. Stops (Ctrl-C, SIGTERM, a pruned trial) are not errors:
:class:`Interrupted` and :class:`Stopped` carry them, and :func:`signals_handled` swaps in the handlers that raise or
hold them.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class DmglError(Exception):
    """An error the user can fix; its message names the culprit and what to do."""


class Interrupted(BaseException):
    """Training stopped on request (SIGTERM, Ctrl-C) after a checkpoint of the exact position was written.

    A BaseException, like KeyboardInterrupt, so that ordinary ``except Exception`` handlers do not swallow it.
    ``run_id``: the run to resume, when the one who stops knows it (``dmgl train --nproc``'s launcher); ``quiet``:
    say nothing (a data-parallel rank whose launcher speaks for the job).
    """

    def __init__(self, run_id: str | None = None, quiet: bool = False):
        super().__init__(run_id)
        self.run_id, self.quiet = run_id, quiet


class Stopped(Exception):
    """Raised from a training ``progress`` callback to stop on purpose (a pruned sweep trial): the runs are marked
    KILLED rather than FAILED, and the exception propagates to the caller."""


@contextmanager
def signals_handled(handler: Callable[[int, Any], None], signals: tuple[int, ...]) -> Iterator[bool]:
    """``handler`` for ``signals`` while the block runs, the previous handlers after it. Off the main thread, where
    Python cannot set handlers, nothing changes and it yields False."""
    try:
        previous = {signum: signal.signal(signum, handler) for signum in signals}
    except ValueError:
        yield False
        return
    try:
        yield True
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
