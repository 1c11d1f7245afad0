"""Virtual time for the time phase: a server clock a ticker moves, a client clock one can step.

The reference server's test clock only moves forward (``advance``). A :class:`Ticker` moves it
by ``dt`` seconds every ``tick`` real seconds, so a 300 s grace window passes in a few real
seconds. A :class:`SimClock` is the client's :class:`~tokenjournal._clock.Clock` on top of it:

* ``monotonic()`` is the server clock since the SimClock was made: it never jumps;
* ``time()`` is the server clock plus a wall-clock ``skew`` that a scenario sets at start
  (a device clock a day ahead) and :meth:`~SimClock.step` moves mid-run (NTP, a user):
  wall time jumps, monotonic time does not;
* ``sleep(s)`` waits until virtual time has moved ``s``.

The client's idea of elapsed time and the server's grace window are then one clock, and only
the wall-clock reading differs, which is exactly what a wrong device clock does.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from tokenjournal.server import ReferenceServer

#: Real seconds between two ticks, and between two looks of a sleeping SimClock.
TICK: Final = 0.005


class SimClock:
    """The client clock: the server's virtual time, plus a wall-clock skew."""

    def __init__(self, server: ReferenceServer, skew: float = 0.0) -> None:
        self.server = server
        self.skew = float(skew)
        self._origin = server.now()

    def time(self) -> float:
        """Wall time as the device believes it: server time plus the skew."""
        return self.server.now() + self.skew

    def monotonic(self) -> float:
        """Virtual seconds since this clock was made; a wall-clock step does not move it."""
        return self.server.now() - self._origin

    def step(self, seconds: float) -> None:
        """Step the wall clock (either way); monotonic time does not move."""
        self.skew += seconds

    async def sleep(self, seconds: float) -> None:
        """Wait until virtual time has moved ``seconds`` (real time moves it too, slowly)."""
        deadline = self.monotonic() + max(0.0, seconds)
        await asyncio.sleep(0)
        while self.monotonic() < deadline:
            await asyncio.sleep(TICK)


class Ticker:
    """Moves ``server``'s clock ``dt`` virtual seconds every :data:`TICK` real seconds."""

    def __init__(self, server: ReferenceServer, dt: float) -> None:
        self.server = server
        self.dt = dt
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            await self.server.advance(self.dt)

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
