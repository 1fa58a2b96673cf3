"""Ctrl-C and SIGTERM during a command: remembered, not only raised.

The CLI turns both into an exception where the command is, so that its cleanup runs (see
``cli._Interruptible``). CPython discards an exception raised inside some callbacks, though (jax's
garbage-collection callback, a ``__del__``: "Exception ignored in ..."), and the command would then
run to its end and exit 0, an ``--overwrite`` having replaced the output the user meant to keep.
So the CLI's handlers also note each signal here, and the points that make a result visible (an
output renamed into place, a validation verdict, the command's exit) call :func:`check`, which
raises the interrupt again. From Python (no CLI handlers) nothing is noted and ``check`` does
nothing.
"""

from __future__ import annotations

import signal
from typing import Optional

__all__ = ["Terminated", "note", "reset", "pending", "check"]

_pending: list[int] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that its cleanup runs as for Ctrl-C (temporary
    folders, an unfinished output); Python's default would end the process on the spot."""


def note(signum: int) -> None:
    """A signal arrived (called by the CLI's handlers, before they raise)."""
    _pending.append(signum)


def reset() -> None:
    """A new command starts: nothing is pending."""
    _pending.clear()


def pending() -> Optional[int]:
    """The first signal noted since :func:`reset`, or None."""
    return _pending[0] if _pending else None


def check() -> None:
    """Raise the interrupt a noted signal stands for (Terminated for SIGTERM, KeyboardInterrupt
    for SIGINT), in case the one raised at the time was discarded; nothing when none was noted."""
    signum = pending()
    if signum is not None:
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
