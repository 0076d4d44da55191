"""User-facing errors.

A :class:`ZOError` is a mistake the user can fix (a bad flag, a missing file, a
malformed line). The CLI prints its message on one line and exits with code 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ZOError(Exception):
    """An error in the user's input: printed as one line, exit code 2."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ZOError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ZOError(message)
