"""A wake-up for processes waiting on another's refresh: no polling tail, nothing on disk.

While a process holds an account's refresh lease it listens on an abstract Unix socket named
for the lease (Linux: the name lives in the kernel, not in the file system, and dies with the
process). A process that finds the lease busy connects and waits on the connection; when the
holder commits or gives up it closes the socket, and every waiter wakes at once, as they do
when the holder dies. The holder never accepts: a connection waits in the listen backlog, and
closing the listening socket resets every one of them.

The doorbell is only ever a hint. Waiters still read the journal, and they fall back to
polling it where there is no abstract socket (not Linux), when the holder is on another host,
or when the bell could not be reached (docs/architecture.md 1.3).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import sys
from typing import Final

from ._journal import Lease, this_host

#: Waiting processes a bell holds at once; more than this poll the journal instead.
BACKLOG: Final = 512


def address(holder_id: str, account: str) -> str | None:
    """The abstract socket name of ``holder_id``'s bell for ``account``; ``None`` where the
    platform has no abstract sockets."""
    if not sys.platform.startswith("linux"):
        return None
    digest = hashlib.sha256(f"{holder_id}\0{account}".encode()).hexdigest()[:32]
    return f"\0tokenjournal-{digest}"


class Doorbell:
    """The holder's side: open before the lease is taken, rung when it is given up."""

    def __init__(self) -> None:
        self._socket: socket.socket | None = None

    def open(self, holder_id: str, account: str) -> None:
        """Start listening (a no-op where it cannot: waiters then poll)."""
        self.ring()
        name = address(holder_id, account)
        if name is None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(name)
            sock.listen(BACKLOG)
        except OSError:  # the name is taken (a forked twin), or no sockets here
            sock.close()
            return
        self._socket = sock

    def ring(self) -> None:
        """Wake every waiter: close the socket, which resets each pending connection."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def rung(lease: Lease, account: str) -> bool:
    """Wait for ``lease``'s holder to ring; ``False`` at once if its bell cannot be reached
    (another host, no abstract sockets, not listening: it finished, died or never had one)."""
    name = address(lease.holder, account)
    if name is None or lease.host != this_host():
        return False
    try:
        reader, writer = await asyncio.open_unix_connection(name)
    except OSError:
        return False
    try:
        await reader.read(1)  # nothing is ever sent: this returns (or raises) on the close
    except OSError:
        pass
    finally:
        writer.close()
    return True
