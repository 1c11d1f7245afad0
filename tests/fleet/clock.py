"""Simulated time shared by every process of a fleet run.

All processes read the same ``time.monotonic()`` (system-wide on Linux); simulated seconds
are real seconds since ``start`` times ``speed``. Before ``start`` the clock stands still at
zero, so every device can sign in "at the same instant" however long that takes for real.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from tokenjournal.server._clock import ServerClock

#: Simulated epoch of second zero (2026-01-01T00:00:00Z): far from the real date on purpose.
EPOCH = 1_767_225_600.0


@dataclass(slots=True)
class Timeline:
    """Maps real monotonic time to simulated seconds; ``start`` is set once all is ready."""

    speed: float
    start: float = math.inf  # real time.monotonic() of simulated second zero

    def now(self) -> float:
        """Simulated seconds since second zero (0 before it)."""
        if self.start == math.inf:
            return 0.0
        return max(0.0, (time.monotonic() - self.start) * self.speed)

    def real_delay(self, simulated: float) -> float:
        """Real seconds until simulated second ``simulated``."""
        return max(0.0, self.start + simulated / self.speed - time.monotonic())


class DeviceClock:
    """A device's clock on the timeline, its wall clock ``skew`` seconds off."""

    __slots__ = ("_line", "_skew")

    def __init__(self, line: Timeline, skew: float = 0.0) -> None:
        self._line, self._skew = line, skew

    def time(self) -> float:
        return EPOCH + self._line.now() + self._skew

    def monotonic(self) -> float:
        return self._line.now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self._line.speed)


class FleetServerClock(ServerClock):
    """The reference server's clock on the timeline (never skewed: the server is right)."""

    __slots__ = ("_line",)

    def __init__(self, line: Timeline) -> None:
        super().__init__()
        self._line = line

    def now(self) -> float:
        return EPOCH + self._line.now() + self.offset
