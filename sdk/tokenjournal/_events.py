"""Session states and the events a TokenManager emits. Events carry fingerprints, never tokens."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("tokenjournal")

#: An ``events()`` iterator that falls this far behind loses its oldest events, not memory.
QUEUE_LIMIT: Final = 1000


class SessionState(enum.Enum):
    """Where an account's session stands."""

    SIGNED_OUT = "signed_out"  # no tokens
    VALID = "valid"  # tokens, usable
    REFRESHING = "refreshing"  # a refresh is in flight
    OFFLINE = "offline"  # the access token expired and the server cannot be reached
    ENDED = "ended"  # the server ended the session; sign in again


class EventKind(enum.Enum):
    """What happened."""

    STATE = "state"  # the state changed
    SIGNED_IN = "signed_in"
    REFRESHED = "refreshed"  # this process committed a new pair
    ADOPTED = "adopted"  # another process committed a new pair and this one took it
    RECOVERING = "recovering"  # a journaled refresh from an earlier run is being replayed
    REFRESH_FAILED = "refresh_failed"  # transient; tokens kept, the next call tries again
    ENDED = "ended"  # the server ended the session (``code`` says why)
    SIGNED_OUT = "signed_out"
    OUTBOX_DROPPED = "outbox_dropped"  # a full outbox dropped its oldest item(s) (``code``: name)
    OUTBOX_DEAD = "outbox_dead"  # the server refused an outbox item for good (``code``: name)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One event. ``fingerprint`` names the access token in force; ``code`` an error code."""

    kind: EventKind
    account: str
    state: SessionState
    at: float
    fingerprint: str = "-"
    code: str | None = None


Callback = Callable[[TokenEvent], object]


class EventHub:
    """Fans events out to callbacks; a failing callback is logged and never breaks the SDK."""

    def __init__(self) -> None:
        self._callbacks: list[Callback] = []
        self._streams: set[asyncio.Queue[TokenEvent | None]] = set()

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns the function that unsubscribes."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def emit(self, event: TokenEvent) -> None:
        """Deliver ``event`` to every subscriber, in subscription order."""
        log.debug(
            "event %s account=%s state=%s token=%s code=%s",
            event.kind.value,
            event.account,
            event.state.value,
            event.fingerprint,
            event.code,
        )
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                log.exception("a tokenjournal event callback raised; ignored")

    def end_streams(self) -> None:
        """End every open :meth:`stream` once it has yielded what was already emitted."""
        for queue in self._streams:
            queue.put_nowait(None)

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """Every event from now on, as an async iterator; it ends when the consumer stops
        or the manager closes (:meth:`end_streams`), so ``async for`` never hangs a shutdown."""
        queue: asyncio.Queue[TokenEvent | None] = asyncio.Queue()

        def put(event: TokenEvent) -> None:
            if queue.qsize() >= QUEUE_LIMIT:
                queue.get_nowait()
            queue.put_nowait(event)

        unsubscribe = self.subscribe(put)
        self._streams.add(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._streams.discard(queue)
            unsubscribe()
