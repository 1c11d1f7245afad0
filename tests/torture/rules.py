"""What the time and cancellation phases count as a loss, a stuck transaction or a raw error.

One place for the verdicts, shared by the driver (time phase, in-process) and the
cancellation worker (a subprocess), so both phases judge an exception the same way.
"""

from __future__ import annotations

import asyncio
from typing import Final

import tokenjournal as tj

#: A journal error with one of these in its text means the connection was left inside a
#: transaction (ours) or another connection was (the busy timeout ran out). The phases never
#: hold the write lock for longer than the busy timeout, so either one is a stuck transaction.
STUCK_MARKS: Final = ("within a transaction", "inside a transaction", "locked")
#: ``RuntimeError`` texts the SDK documents for a call on a manager that is not open.
MISUSE_MARKS: Final = ("not open", "closed")


def classify(exc: BaseException) -> str:
    """One word for what a public coroutine raised.

    ``timeout`` (our own ``wait_for``), ``ended`` (SessionEnded), ``not_signed_in``,
    ``stuck`` (a journal error that says a transaction was left open), ``error`` (any other
    :class:`~tokenjournal.TokenJournalError`), ``misuse`` (the documented ``RuntimeError`` for
    a closed manager) or ``raw``: anything else escaped the SDK.
    """
    if isinstance(exc, TimeoutError | asyncio.CancelledError):
        return "timeout"
    if isinstance(exc, tj.SessionEnded):
        return "ended"
    if isinstance(exc, tj.NotSignedIn):
        return "not_signed_in"
    if isinstance(exc, tj.JournalError) and any(m in str(exc).lower() for m in STUCK_MARKS):
        return "stuck"
    if isinstance(exc, tj.TokenJournalError):
        return "error"
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in MISUSE_MARKS):
        return "misuse"
    return "raw"
