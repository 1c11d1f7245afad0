"""Helpers for users' own tests: a fake clock, an in-memory journal, the reference server.

from tokenjournal.testing import FakeClock, MemoryJournal, reference_server

async def test_my_app() -> None:
    clock = FakeClock()
    async with reference_server(access_ttl=60) as server:
        async with TokenManager(server.url, MemoryJournal(), clock=clock) as tm:
            await tm.sign_in(email="demo@example.com", password="demo")
            clock.advance(61)          # the token is now stale, with no sleeping
            await tm.access_token()    # one refresh
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ._journal import MemoryJournal

__all__ = ["FakeClock", "MemoryJournal", "reference_server"]


class FakeClock:
    """A clock that only moves when told: ``advance()``, or ``sleep()`` (which advances).

    ``sleep`` yields to the event loop once, so other tasks run, then returns with the clock
    moved forward: retry loops and backoff run instantly and deterministically.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._mono = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        """The fake wall clock."""
        return self._now

    def monotonic(self) -> float:
        """The fake monotonic clock (moves with ``advance``)."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._now += seconds
        self._mono += seconds

    def jump(self, seconds: float) -> None:
        """Step the wall clock alone, either way (NTP, a user, a device without a real-time
        clock); the monotonic clock, like a real one, does not move."""
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        """Record the wait, advance by it, and let other tasks run."""
        seconds = max(0.0, seconds)
        self.sleeps.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)


@asynccontextmanager
async def reference_server(**config: Any) -> AsyncIterator[Any]:
    """Run the reference server in test mode on a free 127.0.0.1 port for the block.

    Keyword arguments are :class:`tokenjournal.server.ServerConfig` fields
    (``access_ttl``, ``grace``, ``conflict``, ...). Yields the running
    :class:`tokenjournal.server.ReferenceServer` (``.url``, ``advance()``, ``stats()``,
    ``set_faults()``).
    """
    from .server import ReferenceServer, ServerConfig

    config.setdefault("test_mode", True)
    async with ReferenceServer(ServerConfig(**config)) as server:
        yield server
