"""The server clock: real epoch time plus an offset that tests can advance."""

from __future__ import annotations

import math
import time
from typing import Final

#: The clock never passes the end of year 9999: every expiry it feeds must still be a
#: datetime, and `now` must stay a finite JSON number.
MAX_NOW: Final = 253402214400.0


class ServerClock:
    """Epoch seconds as the server sees them.

    Every expiry decision (JWT `exp`, refresh TTL, grace window, device codes) reads this
    clock, so a test can jump past a deadline with `advance` instead of sleeping. The offset
    only grows: moving time backwards would let an expired token live again.
    """

    __slots__ = ("_offset",)

    def __init__(self) -> None:
        self._offset = 0.0

    def now(self) -> float:
        """Current server time, epoch seconds."""
        return time.time() + self._offset

    @property
    def offset(self) -> float:
        """Seconds added to real time so far."""
        return self._offset

    def advance(self, seconds: float) -> float:
        """Move the clock forward by `seconds` (>= 0) and return the new time."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError("seconds must be a number")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError("seconds must be a finite number >= 0")
        if self.now() + seconds > MAX_NOW:
            raise ValueError("the clock cannot go past the year 9999")
        self._offset += float(seconds)
        return self.now()
