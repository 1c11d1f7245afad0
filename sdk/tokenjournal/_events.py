"""Session states and the events a TokenManager emits. Events carry fingerprints, never tokens."""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import weakref
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
        # Each subscription is its own entry: the same function subscribed twice is two
        # subscriptions, and one's unsubscribe never takes the other away.
        self._callbacks: list[tuple[object, Callback]] = []
        self._streams: weakref.WeakSet[asyncio.Queue[TokenEvent | None]] = weakref.WeakSet()
        #: Set when the manager closes (:meth:`end_streams`), cleared when it opens: a
        #: stream asked for meanwhile ends at once instead of waiting for ever.
        self.ended = False

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns the function that unsubscribes.

        The callback is called, never awaited: an ``async def`` one would only make a
        coroutine nobody runs, so it is refused (schedule a task from a plain function).
        """
        if inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
            getattr(callback, "__call__", None)  # noqa: B004  (an object with async __call__)
        ):
            raise TypeError(
                "an event callback is called, not awaited: pass a plain function "
                "(it may start a task), or read tm.events() with async for"
            )
        entry = (object(), callback)
        self._callbacks.append(entry)

        def unsubscribe() -> None:
            if entry in self._callbacks:
                self._callbacks.remove(entry)

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
        for _, callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                log.exception("a tokenjournal event callback raised; ignored")

    def end_streams(self) -> None:
        """End every open :meth:`stream` once it has yielded what was already emitted, and
        every stream asked for until the manager opens again."""
        self.ended = True
        for queue in list(self._streams):
            queue.put_nowait(None)

    def stream(self) -> AsyncIterator[TokenEvent]:
        """Every event from now on (from this call, not from the first read), as an async
        iterator; it ends when the consumer stops or the manager closes
        (:meth:`end_streams`), so ``async for`` never hangs a shutdown. An iterator dropped
        unread unsubscribes at the next event."""
        queue: asyncio.Queue[TokenEvent | None] = asyncio.Queue()
        if self.ended:
            queue.put_nowait(None)
            return _drained(queue, lambda: None)
        held = weakref.ref(queue)  # the iterator holds the queue; the hub must not

        def put(event: TokenEvent) -> None:
            waiting = held()
            if waiting is None:
                unsubscribe()
                return
            if waiting.qsize() >= QUEUE_LIMIT:
                waiting.get_nowait()
            waiting.put_nowait(event)

        unsubscribe = self.subscribe(put)
        self._streams.add(queue)
        return _drained(queue, unsubscribe)


async def _drained(
    queue: asyncio.Queue[TokenEvent | None], unsubscribe: Callable[[], None]
) -> AsyncIterator[TokenEvent]:
    try:
        while (event := await queue.get()) is not None:
            yield event
    finally:
        unsubscribe()
