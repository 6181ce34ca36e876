"""User-facing errors.

Logic modules raise :class:`DmglError` for anything a user can cause (a bad name, a missing file, a value out of
range). The CLI turns it into one clear message and a non-zero exit, without a traceback. Programming errors stay
ordinary exceptions so that they keep their tracebacks.
"""


class DmglError(Exception):
    """An error the user can fix; its message names the culprit and what to do."""
