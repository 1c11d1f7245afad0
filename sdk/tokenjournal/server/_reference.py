"""`ReferenceServer`: run the reference server inside the current event loop (tests, demos)."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

from aiohttp import web

from ._app import STATE, ServerState, create_app
from ._config import ServerConfig

LOOPBACK = "127.0.0.1"


class ReferenceServer:
    """An async context manager serving the reference server on 127.0.0.1.

    ```python
    async with ReferenceServer(ServerConfig(test_mode=True)) as server:
        ...  # talk to server.url; server.advance(901); server.stats()
    ```

    Port 0 (the default) picks a free port. The in-process helpers work whether or not
    `test_mode` is on; test mode only controls the `/_test/*` HTTP routes.
    """

    def __init__(self, config: ServerConfig | None = None, *, port: int = 0) -> None:
        self.config: ServerConfig = config or ServerConfig(test_mode=True)
        self._port = port
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self.url: str = ""

    @property
    def app(self) -> web.Application:
        """The running aiohttp application."""
        if self._app is None:
            raise RuntimeError("ReferenceServer is not started")
        return self._app

    @property
    def state(self) -> ServerState:
        """Shared server state (clock, stats, faults, store)."""
        return self.app[STATE]

    @property
    def port(self) -> int:
        """The bound port."""
        if not self.url:
            raise RuntimeError("ReferenceServer is not started")
        return int(self.url.rsplit(":", 1)[1])

    async def start(self) -> None:
        """Start serving; prefer `async with`."""
        if self._runner is not None:
            raise RuntimeError("ReferenceServer already started")
        app = create_app(self.config)
        # Short shutdown: tests must not hang on a handler parked in an injected delay.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, LOOPBACK, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        address: Any = runner.addresses[0]
        self._app, self._runner = app, runner
        self.url = f"http://{LOOPBACK}:{int(address[1])}"

    async def close(self) -> None:
        """Stop serving and close the store (state in a file db survives)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._app = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def advance(self, seconds: float) -> float:
        """Move the server clock forward; returns the new server time (epoch seconds)."""
        return self.state.clock.advance(seconds)

    def now(self) -> float:
        """The server clock (epoch seconds)."""
        return self.state.clock.now()

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (see `/_test/stats`)."""
        return self.state.stats.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters."""
        self.state.stats.reset()

    def set_faults(self, faults: list[dict[str, Any]]) -> None:
        """Replace the fault script (validated; `ValueError` if malformed)."""
        self.state.faults.replace(faults)

    def set_api_faults(self, faults: list[dict[str, Any]]) -> None:
        """Replace the fault script of `POST /api/readings` (see `/_test/api_faults`)."""
        self.state.api_faults.replace(faults)

    def readings(self) -> list[dict[str, Any]]:
        """Every reading `POST /api/readings` applied, in order (user, key, body)."""
        return list(self.state.readings)

    def device_action(self, user_code: str, action: str, email: str | None = None) -> None:
        """Approve or deny a pending device authorization (RFC 8628).

        Raises `ValueError` when the code is unknown, expired, or no longer pending.
        """
        outcome = self.state.device_action(user_code, action, email)
        if outcome not in ("approved", "denied"):
            raise ValueError(f"device action failed: {outcome}")
