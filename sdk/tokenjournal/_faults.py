"""Named crash points for the torture harness: the process dies hard at a chosen step.

Off unless ``TOKENJOURNAL_CRASH_AT`` names points (comma separated) when the module is
imported, or a test calls :func:`arm`. When off, :func:`crash_point` is one global lookup
and a ``None`` test. What each point leaves behind and what the next start does about it:
docs/architecture.md section 6.
"""

from __future__ import annotations

import os
from typing import Final

#: Every point the SDK passes through, in the order a refresh meets them.
CRASH_POINTS: Final = (
    "before_intent",  # the refresh is decided, nothing journaled yet
    "after_intent",  # intent and lease durable, request not sent
    "after_send",  # the request body went out; no answer yet
    "after_response",  # the new pair arrived, not yet committed
    "after_commit",  # committed, waiters not yet woken
    "mid_sign_out",  # sign-out journaled, server not yet told
    # The outbox's delivery of one item (docs/architecture.md section 8); "after_send"
    # above fires for an outbox request too.
    "before_send",  # the item is leased, its request not sent
    "after_answer",  # the server answered; nothing journaled yet
    "before_settle",  # the answer is read as final (2xx or dead); the settle not committed
)
#: The points of a refresh and of a sign-out (the torture's phase 1 walks these).
SESSION_POINTS: Final = CRASH_POINTS[:6]
#: The points of an outbox delivery ("after_send" is shared with the refresh).
OUTBOX_POINTS: Final = ("before_send", "after_send", "after_answer", "before_settle")
#: Points of the journal's sealing (docs/architecture.md section 7), apart from the refresh's.
SEAL_POINTS: Final = (
    "seal_before_commit",  # every row sealed (or re-sealed) in the transaction, not committed
    "seal_before_scrub",  # committed, the plain (or old) values not yet checkpointed away
)

_armed: frozenset[str] | None = None


def arm(points: str | None) -> None:
    """Arm the comma-separated ``points`` (``None`` or empty disarms). Unknown names are errors."""
    global _armed
    names = frozenset(p.strip() for p in (points or "").split(",") if p.strip())
    unknown = names - set(CRASH_POINTS) - set(SEAL_POINTS)
    if unknown:
        known = ", ".join((*CRASH_POINTS, *SEAL_POINTS))
        raise ValueError(f"unknown crash points {sorted(unknown)}; known: {known}")
    _armed = names or None


def armed() -> bool:
    """Whether any crash point is armed."""
    return _armed is not None


def crash_point(name: str) -> None:
    """Die at once, with no cleanup, if ``name`` is armed: the closest thing to a power cut."""
    if _armed is not None and name in _armed:
        os._exit(137)


arm(os.environ.get("TOKENJOURNAL_CRASH_AT"))
