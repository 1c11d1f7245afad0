"""The clock the SDK reads: wall time for token expiry, monotonic time and sleep for pacing.

Everything that waits or compares times goes through a :class:`Clock`, so tests can swap in
:class:`tokenjournal.testing.FakeClock` and never sleep.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Where the SDK gets the time and how it waits."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (UTC); used for token expiry and intents."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds; used for retry budgets and latency."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``; a fake clock advances instead of waiting."""
        ...


class SystemClock:
    """The real clock: :func:`time.time`, :func:`time.monotonic` and :func:`asyncio.sleep`."""

    __slots__ = ()

    def time(self) -> float:
        """Wall-clock seconds since the epoch."""
        return time.time()

    def monotonic(self) -> float:
        """Monotonic seconds."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep for real."""
        await asyncio.sleep(max(0.0, seconds))
