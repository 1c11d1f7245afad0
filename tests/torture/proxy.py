"""A loopback TCP proxy that misbehaves on purpose: stalls, resets, truncates, black-holes.

It sits between the SDK and the reference server (both on 127.0.0.1) and applies one
:data:`Mode` per *exchange*: a chunk the client sends starts an exchange (an HTTP/1.1 client
sends a small request as one chunk), and the upstream bytes that follow belong to it. The
mode comes from the one-shot queue (:meth:`FaultProxy.script`) if it is not empty, else from
:attr:`FaultProxy.mode`, which the driver may flip at any time.

Modes:

* ``pass``             forward both ways
* ``stall``            forward the request, hold the answer back ``stall_seconds``
* ``reset``            answer the request with a TCP RST; the server never sees it
* ``reset_after``      forward the request, answer the client with an RST instead of the reply
* ``truncate``         forward the request, pass only ``truncate_at`` bytes of the reply, close
* ``blackhole``        swallow the request, never answer (the connection stays open)
* ``blackhole_after``  forward the request, swallow the reply (the server did the work)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import Counter, deque
from typing import Final, Literal

Mode = Literal["pass", "stall", "reset", "reset_after", "truncate", "blackhole", "blackhole_after"]
MODES: Final[tuple[Mode, ...]] = (
    "pass",
    "stall",
    "reset",
    "reset_after",
    "truncate",
    "blackhole",
    "blackhole_after",
)
LOOPBACK: Final = "127.0.0.1"
_CHUNK: Final = 64 * 1024


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN (SO_LINGER on, timeout 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Exchange:
    """What the current exchange on one connection does with the upstream bytes."""

    __slots__ = ("mode", "passed")

    def __init__(self, mode: Mode) -> None:
        self.mode: Mode = mode
        self.passed = 0


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port``. Use as an async context manager.

    ``counts`` says how many exchanges each mode handled (``pass`` included).
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        upstream_host: str = LOOPBACK,
        stall_seconds: float = 2.0,
        truncate_at: int = 40,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode: Mode = "pass"
        self.stall_seconds = stall_seconds
        self.truncate_at = truncate_at
        self.counts: Counter[str] = Counter()
        self.connections = 0
        self._script: deque[Mode] = deque()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{LOOPBACK}:{self.port}"

    def script(self, *modes: Mode) -> None:
        """Queue one-shot modes for the next exchanges (after them, :attr:`mode` applies)."""
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"unknown proxy mode {mode!r}; known: {', '.join(MODES)}")
        self._script.extend(modes)

    def clear(self) -> None:
        """Forget the queued one-shot modes and go back to ``pass``."""
        self._script.clear()
        self.mode = "pass"

    def pending(self) -> int:
        """One-shot modes not used yet."""
        return len(self._script)

    def _next_mode(self) -> Mode:
        return self._script.popleft() if self._script else self.mode

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        me = asyncio.current_task()
        if me is not None:  # close() cancels handlers parked in a stall
            self._tasks.add(me)
            me.add_done_callback(self._tasks.discard)
        self._writers.add(c_writer)
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _rst(c_writer)
            self._writers.discard(c_writer)
            return
        self._writers.add(u_writer)
        exchange = _Exchange("pass")
        holder = [exchange]
        up = asyncio.ensure_future(self._client_to_server(c_reader, c_writer, u_writer, holder))
        down = asyncio.ensure_future(self._server_to_client(u_reader, c_writer, holder))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            for writer in (c_writer, u_writer):
                writer.transport.abort()
                self._writers.discard(writer)

    async def _client_to_server(
        self,
        c_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        u_writer: asyncio.StreamWriter,
        holder: list[_Exchange],
    ) -> None:
        while True:
            chunk = await c_reader.read(_CHUNK)
            if not chunk:
                return
            mode = self._next_mode()
            holder[0] = _Exchange(mode)
            self.counts[mode] += 1
            if mode == "reset":
                _rst(c_writer)
                return
            if mode == "blackhole":
                continue
            u_writer.write(chunk)
            await u_writer.drain()

    async def _server_to_client(
        self,
        u_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        holder: list[_Exchange],
    ) -> None:
        while True:
            chunk = await u_reader.read(_CHUNK)
            if not chunk:
                return
            exchange = holder[0]
            mode = exchange.mode
            if mode in ("blackhole", "blackhole_after"):
                continue
            if mode == "reset_after":
                _rst(c_writer)
                return
            if mode == "stall":
                await asyncio.sleep(self.stall_seconds)
            if mode == "truncate":
                room = max(0, self.truncate_at - exchange.passed)
                c_writer.write(chunk[:room])
                exchange.passed += min(room, len(chunk))
                await c_writer.drain()
                if len(chunk) >= room:
                    c_writer.close()  # a FIN in the middle of the answer
                    return
                continue
            c_writer.write(chunk)
            await c_writer.drain()
