"""The fleet's front door: the reference server behind a gate that counts every refresh
request on the simulated clock, and can be down (connections dropped) or overloaded (at
most ``capacity`` refreshes admitted at once, each held ``service`` simulated seconds,
the rest answered 503 with ``Retry-After``)."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

from aiohttp import web

from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.server._app import create_app

from .clock import FleetServerClock, Timeline

REFRESH_PATH = "/auth/refresh"


class Gate:
    """Mode and counters; the coordinator flips the mode on the timeline."""

    def __init__(self, line: Timeline) -> None:
        self.line = line
        self.mode = "up"  # up | down | overload
        self.capacity = math.inf
        self.service = 0.0  # simulated seconds an admitted refresh holds its slot
        self.retry_after = 5
        self.in_flight = 0
        #: (simulated second, outcome) -> count; outcome: ok | refused | dropped | failed
        self.buckets: Counter[tuple[int, str]] = Counter()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != REFRESH_PATH:
            return await handler(request)
        second = int(self.line.now())
        if self.mode == "down":
            self.buckets[second, "dropped"] += 1
            if request.transport is not None:
                request.transport.abort()  # the client sees the connection die, no answer
            raise web.HTTPServiceUnavailable()  # never written: the transport is gone
        if self.in_flight >= self.capacity:
            self.buckets[second, "refused"] += 1
            return web.Response(
                status=503, headers={"Retry-After": str(self.retry_after)}, text="busy"
            )
        self.in_flight += 1
        try:
            if self.service > 0:
                await asyncio.sleep(self.service / self.line.speed)
            response = await handler(request)
        finally:
            self.in_flight -= 1
        self.buckets[second, "ok" if response.status < 500 else "failed"] += 1
        return response


class GatedServer(ReferenceServer):
    """The reference server on the fleet's clock, behind the gate. ``down()`` is a crash as
    clients see it: every open connection dies (a request in flight may or may not have been
    read) and new ones are refused; ``up()`` listens again on the same port."""

    def __init__(self, config: ServerConfig, gate: Gate) -> None:
        super().__init__(config)
        self.gate = gate
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        app = create_app(self.config)
        app.middlewares.append(self.gate.middleware)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._app, self._runner = app, runner
        await self._listen(0)
        address: Any = runner.addresses[0]
        self.url = f"http://127.0.0.1:{int(address[1])}"
        self.state.clock = FleetServerClock(self.gate.line)

    async def _listen(self, port: int) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", port, backlog=4096)
        await self._site.start()

    async def down(self) -> None:
        """Refuse new connections and kill the open ones."""
        self.gate.mode = "down"
        if self._site is not None and self._site._server is not None:
            self._site._server.close()  # the listening socket: connects are refused
            self._site = None
        assert self._runner is not None and self._runner.server is not None
        for connection in list(self._runner.server.connections):
            if connection.transport is not None:
                connection.transport.abort()

    async def up(self, mode: str = "up") -> None:
        """Listen again (on the same port), in ``mode`` (up or overload)."""
        if self._site is None:
            await self._listen(self.port)
        self.gate.mode = mode
