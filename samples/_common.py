"""What every sample shares: options, the state folder, a self-started reference server.

With no ``--auth-url`` a sample starts the reference server on 127.0.0.1 (its database in the
state folder, so a restart resumes the session). ``--smoke`` always does, in a fresh folder,
and reads the time from that server (:class:`ServerClock`): one ``server.advance()`` ages
the tokens on both sides, so nothing sleeps waiting for a token to expire.

Copying a sample into your project? Copy this file beside it, or keep only ``--auth-url``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn

import tokenjournal as tj
from tokenjournal.server import ReferenceServer, ServerConfig

DEMO_EMAIL: Final = "demo@example.com"
DEMO_PASSWORD: Final = "demo"  # the reference server's test-mode account, not a secret
#: The SDK's retry curve scaled down so that the smoke scenarios' faults pass quickly.
SMOKE_RETRY: Final = tj.RetryPolicy(max_attempts=3, base_delay=0.02, max_delay=0.1)


class SmokeFailed(Exception):
    """The smoke scenario saw the sample misbehave."""


def check(condition: bool, what: str) -> None:
    """Print ``ok: what``, or fail the smoke run."""
    if not condition:
        raise SmokeFailed(what)
    print(f"ok: {what}", flush=True)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every sample takes."""
    env = os.environ.get
    parser.add_argument(
        "--auth-url",
        default=env("TJ_AUTH_URL"),
        help="a real auth server (env TJ_AUTH_URL); default: the reference server, started "
        "here on 127.0.0.1",
    )
    parser.add_argument("--email", default=env("TJ_EMAIL"), help="env TJ_EMAIL")
    parser.add_argument(
        "--password",
        default=env("TJ_PASSWORD"),
        help="env TJ_PASSWORD (prefer it: arguments show in `ps`)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="journal folder (default: $XDG_STATE_HOME/tokenjournal-samples/NAME; a fresh "
        "temporary one with --smoke)",
    )
    parser.add_argument("--account", default="default", help="account name in the journal")
    parser.add_argument(
        "--access-ttl",
        type=float,
        default=900.0,
        help="access-token lifetime of the self-started server (try 30 to watch refreshes)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run a short self-checking scenario on a self-started server; exit 0 only if "
        "the sample behaved",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the SDK's log too")


def setup_logging(verbose: bool) -> None:
    """Log to stderr; the SDK's records (fingerprints only, never tokens) with -v."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("tokenjournal").setLevel(logging.INFO if verbose else logging.WARNING)


@dataclass(frozen=True, slots=True)
class Backend:
    """Where the sample signs in, with what, and where its journal lives."""

    url: str
    state_dir: Path
    email: str
    password: str = field(repr=False)
    server: ReferenceServer | None  # the self-started reference server

    @property
    def journal(self) -> Path:
        """The journal file."""
        return self.state_dir / "journal.db"

    def reference(self) -> ReferenceServer:
        """The self-started server, whose clock and faults the smoke scenario drives."""
        if self.server is None:
            raise RuntimeError("this run uses a real auth server")
        return self.server

    def clock(self) -> tj.Clock:
        """The clock for the TokenManager: the self-started server's, else the real one."""
        return tj.SystemClock() if self.server is None else ServerClock(self.server)


class ServerClock:
    """A :class:`tokenjournal.Clock` reading the in-process reference server's movable clock."""

    def __init__(self, server: ReferenceServer) -> None:
        self._server = server

    def time(self) -> float:
        """The server's wall clock (moved by ``server.advance()``)."""
        return self._server.now()

    def monotonic(self) -> float:
        """Real monotonic time moved on as far as the server's clock was advanced: the SDK
        measures a token's life on this clock, so both must see the same time pass."""
        return time.monotonic() + self._server.state.clock.offset

    async def sleep(self, seconds: float) -> None:
        """Real sleep (the smoke retry policy keeps it short)."""
        await asyncio.sleep(max(0.0, seconds))


@asynccontextmanager
async def backend(args: argparse.Namespace, name: str) -> AsyncIterator[Backend]:
    """``--auth-url`` with the user's credentials, or the reference server started here."""
    if args.smoke and args.auth_url:
        raise SystemExit("--smoke drives a reference server it starts itself: drop --auth-url")
    with contextlib.ExitStack() as stack:
        if args.state_dir is not None:
            folder = Path(args.state_dir)
        elif args.smoke:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"tj-{name}-")))
        else:
            base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
            folder = Path(base) / "tokenjournal-samples" / name
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # the journal holds a session
        if args.auth_url:
            yield Backend(args.auth_url, folder, args.email or "", args.password or "", None)
            return
        config = ServerConfig(
            test_mode=True, db_path=str(folder / "server.db"), access_ttl=args.access_ttl
        )
        server = await _reference_server(config, folder / "server.port")
        try:
            print(f"reference server on {server.url} (account {DEMO_EMAIL})", flush=True)
            yield Backend(
                server.url, folder, args.email or DEMO_EMAIL, args.password or DEMO_PASSWORD, server
            )
        finally:
            await server.close()


async def _reference_server(config: ServerConfig, port_file: Path) -> ReferenceServer:
    """The self-started server, started on the port it had last time in this state folder.

    A real server keeps its address, and what a sample queued in its outbox (the journal
    keeps each request's whole URL) is addressed to it: a server that came back on another
    port would leave those requests undeliverable, retried for ever. If that port is taken
    now, any free port, said aloud.
    """
    wanted = _last_port(port_file)
    if wanted:
        server = ReferenceServer(config, port=wanted)
        try:
            await server.start()
        except OSError:
            print(
                f"port {wanted} of the last run is taken: what that run queued stays undelivered",
                flush=True,
            )
        else:
            return server
    server = ReferenceServer(config)
    await server.start()
    port_file.write_text(str(server.port))  # noqa: ASYNC240 - a few bytes, once at start
    return server


def _last_port(port_file: Path) -> int:
    """The port recorded in ``port_file``, or 0 (none, or unreadable)."""
    try:
        return int(port_file.read_text())
    except (OSError, ValueError):
        return 0


@contextmanager
def backend_in_thread(args: argparse.Namespace, name: str) -> Iterator[Backend]:
    """:func:`backend` for programs that are not asyncio programs (the sync manager's): a
    self-started reference server gets an event loop of its own, in a daemon thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="reference-server", daemon=True)
    thread.start()
    started = backend(args, name)
    try:
        yield asyncio.run_coroutine_threadsafe(started.__aenter__(), loop).result()
    finally:
        try:
            asyncio.run_coroutine_threadsafe(started.__aexit__(None, None, None), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()


def run_blocking(main: Callable[[], int]) -> NoReturn:
    """:func:`run` for a blocking ``main``."""
    try:
        code = main()
    except SmokeFailed as exc:
        print(f"SMOKE FAILED: {exc}", flush=True)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def run(main: Coroutine[Any, Any, int]) -> NoReturn:
    """Run ``main`` and exit with its code (1 and the reason when a smoke check failed)."""
    try:
        code = asyncio.run(main)
    except SmokeFailed as exc:
        print(f"SMOKE FAILED: {exc}", flush=True)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
