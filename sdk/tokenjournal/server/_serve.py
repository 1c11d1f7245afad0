"""`tokenjournal serve`: command-line options and the blocking runner."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sqlite3
from typing import Any, Final

from aiohttp import web

from .._urls import resolves_to_loopback
from ._app import create_app
from ._config import DEMO_CLIENT_ID, ServerConfig


def _pair(text: str) -> tuple[str, str]:
    name, sep, secret = text.partition(":")
    if not sep or not name or not secret:
        raise argparse.ArgumentTypeError("expected NAME:SECRET")
    return name, secret


#: The ports a socket can bind (0: any free one, the OS picks).
MAX_PORT: Final = 65535


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0-65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"a port is 0-{MAX_PORT} (0: any free port), got {value}")
    return value


class DatabaseUnusable(Exception):
    """The ``--db`` file cannot hold the server's store: a folder, not SQLite, a client
    journal, a newer schema, no permission. The message is one line naming the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot use {path} as the server's database: {reason}")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` options (host, port, TTLs, modes, accounts, clients) to `parser`."""
    defaults = ServerConfig()
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=port_number, default=8787, help="port 0-65535, 0 for any (default 8787)"
    )
    parser.add_argument("--db", default=defaults.db_path, help="SQLite file (default :memory:)")
    parser.add_argument(
        "--access-ttl",
        type=float,
        default=defaults.access_ttl,
        metavar="SECONDS",
        help=f"lifetime of an access token (default {defaults.access_ttl:g})",
    )
    parser.add_argument(
        "--refresh-ttl",
        type=float,
        default=defaults.refresh_ttl,
        metavar="SECONDS",
        help="lifetime of a refresh token from its issue (default "
        f"{defaults.refresh_ttl:.0f}, {defaults.refresh_ttl / 86400:g} days)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=defaults.grace,
        metavar="SECONDS",
        help="how long a rotated refresh token may be replayed for the same pair again "
        f"(default {defaults.grace:g})",
    )
    parser.add_argument(
        "--test-mode",
        action="store_true",
        help="enable /_test/* routes and the demo account (loopback hosts only)",
    )
    parser.add_argument(
        "--conflict",
        choices=("serialize", "409"),
        default=defaults.conflict,
        help="concurrent refreshes of one token: all get the same pair, or the later ones "
        f"409 rotation_in_progress (default {defaults.conflict})",
    )
    parser.add_argument(
        "--oauth-replay",
        choices=("same", "new"),
        default=defaults.oauth_replay,
        help="an OAuth grace replay returns the same pair (django-oauth-toolkit) or a new "
        f"one (Auth0, Okta) (default {defaults.oauth_replay})",
    )
    parser.add_argument(
        "--user",
        action="append",
        type=_pair,
        default=[],
        metavar="EMAIL:PASSWORD",
        help="an account (repeatable)",
    )
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="ID[:SECRET]",
        help=f"an OAuth client, public without SECRET (repeatable; default {DEMO_CLIENT_ID})",
    )
    parser.add_argument(
        "--max-body",
        type=int,
        default=defaults.max_body,
        metavar="BYTES",
        help=f"larger request bodies get 413 (default {defaults.max_body}, at least 1024)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout,
        metavar="SECONDS",
        help="drop a connection that has not sent a whole request head by then, and an "
        f"idle one (default {defaults.header_timeout:g})",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=defaults.read_timeout,
        metavar="SECONDS",
        help=f"answer 408 to a body slower than this (default {defaults.read_timeout:g})",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        metavar="N",
        help=f"answer 503 beyond N open connections (default {defaults.max_connections})",
    )


def config_from_args(ns: argparse.Namespace) -> ServerConfig:
    """Build a `ServerConfig` from options added by `add_serve_arguments`."""
    clients: tuple[tuple[str, str | None], ...] = ServerConfig().clients
    if ns.client:
        parsed: list[tuple[str, str | None]] = []
        for text in ns.client:
            name, sep, secret = str(text).partition(":")
            parsed.append((name, secret if sep and secret else None))
        clients = tuple(parsed)
    return ServerConfig(
        access_ttl=ns.access_ttl,
        refresh_ttl=ns.refresh_ttl,
        grace=ns.grace,
        db_path=ns.db,
        test_mode=ns.test_mode,
        users=tuple(ns.user),
        conflict=ns.conflict,
        oauth_replay=ns.oauth_replay,
        clients=clients,
        max_body=ns.max_body,
        header_timeout=ns.header_timeout,
        read_timeout=ns.read_timeout,
        max_connections=ns.max_connections,
    )


def check_bind(config: ServerConfig, host: str) -> None:
    """Refuse test mode anywhere but loopback: it can rewind security (clock, faults)."""
    if config.test_mode and not resolves_to_loopback(host):
        raise ValueError(
            f"test mode exposes /_test/* control routes and is only allowed on a loopback "
            f"host (127.0.0.1, localhost, ::1), not {host!r}"
        )


#: What a connection over the cap gets before it is closed.
BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
    b"Content-Length: 0\r\n\r\n"
)


class _Busy(asyncio.Protocol):
    """Answers 503 and hangs up: the connection is over the cap."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(BUSY)
        transport.close()


class _Capped:
    """The protocol factory of the listening socket: aiohttp's, up to ``cap`` connections."""

    def __init__(self, server: web.Server, cap: int) -> None:
        self.server = server
        self.cap = cap

    def __call__(self) -> asyncio.Protocol:
        if len(self.server.connections) >= self.cap:
            return _Busy()
        return self.server()


async def _serve(config: ServerConfig, host: str, port: int) -> None:
    # keepalive_timeout starts when a connection opens and only a complete request head
    # resets it, so it is also the header timeout: a client trickling a header is dropped.
    runner = web.AppRunner(
        create_app(config), shutdown_timeout=5.0, keepalive_timeout=config.header_timeout
    )
    try:
        await runner.setup()  # opens the store
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        path = config.db_path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DatabaseUnusable(path, reason.removeprefix(f"{path}: ")) from exc
    listener: asyncio.Server | None = None
    try:
        loop = asyncio.get_running_loop()
        assert runner.server is not None
        listener = await loop.create_server(
            _Capped(runner.server, config.max_connections), host, port, reuse_address=True
        )
        address: Any = listener.sockets[0].getsockname()
        shown = f"[{host}]" if ":" in host else host
        print(
            f"tokenjournal reference server on http://{shown}:{int(address[1])}"
            f"{' (test mode)' if config.test_mode else ''}",
            flush=True,
        )
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        if listener is not None:
            listener.close()
        await runner.cleanup()


def run(config: ServerConfig, host: str = "127.0.0.1", port: int = 8787) -> None:
    """Serve until SIGINT, SIGTERM or SIGHUP (blocking). Prints one line with the URL.

    Raises `ValueError` before binding anything if `port` is not 0-65535, or if
    `config.test_mode` is on and `host` is not a loopback address; `DatabaseUnusable` if
    the store cannot be opened at `config.db_path`. Tokens never appear in its output or
    logs.
    """
    check_bind(config, host)
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"a port is 0-{MAX_PORT} (0: any free port), got {port}")
    path = config.db_path
    if path != ":memory:" and os.path.exists(path) and not os.path.isfile(path):
        # A folder, a FIFO (whose open would block), a device: SQLite would not say which.
        raise DatabaseUnusable(path, "it is not a file")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config, host, port))
