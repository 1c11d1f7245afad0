"""SIGTERM and SIGHUP end a command the way Ctrl-C does: through its cleanup.

``timeout``, CI cancellation and systemd stop a process with SIGTERM; a closed terminal sends
SIGHUP. Their default action kills the process on the spot, so a command's ``finally``
blocks never run: the demo left its temporary folder (real journals, tokens inside) behind
and its client processes running. Ctrl-C is already clean, because ``asyncio.run`` turns
SIGINT into a cancellation of the main task, so these two signals are forwarded to it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final

#: The signals that mean "stop now, politely".
FORWARDED: Final = (signal.SIGTERM, signal.SIGHUP)


@dataclass(slots=True)
class Received:
    """The last stop signal that arrived (``None``: none did)."""

    signum: int | None = None

    @property
    def exit_status(self) -> int:
        """The shell's convention: 128 + the signal number (130 for Ctrl-C)."""
        return 128 + (self.signum if self.signum is not None else signal.SIGINT)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[Received]:
    """While inside, SIGTERM and SIGHUP raise SIGINT, which ``asyncio.run`` turns into a
    cancellation of the main task (and outside a loop, into ``KeyboardInterrupt``).

    A handler installed later, such as the server's ``loop.add_signal_handler``, takes
    precedence while it is installed. The previous handlers come back on exit.
    """
    received = Received()

    def forward(signum: int, frame: FrameType | None) -> None:
        received.signum = signum
        signal.raise_signal(signal.SIGINT)

    previous: dict[int, Any] = {}
    try:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # Started with SIGINT ignored (a script's background job inherits it so): the
            # forwarded signal would be ignored with it. Ctrl-C's own handler comes back
            # while inside, so that asyncio.run turns it into its clean cancellation.
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in FORWARDED:
            previous[sig] = signal.signal(sig, forward)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
