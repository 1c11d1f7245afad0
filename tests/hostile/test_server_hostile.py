"""The reference server against hostile clients (issue 18, items 6 and 7)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import pytest

from tests.conftest_server import get, post, serve, signin
from tokenjournal.server import ServerConfig
from tokenjournal.server._serve import check_bind


def _strict(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


async def test_the_test_clock_cannot_overflow() -> None:
    """Regression: two advances of 1e308 made the clock infinite; /_test/clock then
    answered `Infinity` (not JSON) and every sign-in was a 500."""
    async with serve() as (_, session):
        answers = [await post(session, "/_test/clock", {"advance": 1e308}) for _ in range(2)]
        assert [a.status for a in answers] == [400, 400]
        clock = await get(session, "/_test/clock")
        assert clock.status == 200
        now = json.loads(json.dumps(clock.body), parse_constant=_strict)["now"]
        assert now < 253402214400.0
        assert "appToken" in await signin(session)
        # Up to the end of year 9999 the clock still moves, and tokens still mint.
        far = 253402214400.0 - now - 86400 * 400
        assert (await post(session, "/_test/clock", {"advance": far})).status == 200
        assert "appToken" in await signin(session)


def _resolving_to(address: str) -> Any:
    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, 0))]

    return getaddrinfo


def test_test_mode_resolves_localhost_instead_of_trusting_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: is_loopback("localhost") was True whatever the name resolved to, so
    --test-mode bound /_test/* to whatever /etc/hosts said localhost was."""
    from tokenjournal._urls import resolves_to_loopback

    config = ServerConfig(test_mode=True)
    monkeypatch.setattr(socket, "getaddrinfo", _resolving_to("10.1.2.3"))
    with pytest.raises(ValueError, match="loopback"):
        check_bind(config, "localhost")
    monkeypatch.setattr(socket, "getaddrinfo", _resolving_to("::1"))
    check_bind(config, "localhost")
    for host in ("127.0.0.1", "::1", "[::1]", "127.5.5.5"):
        assert resolves_to_loopback(host)
    for host in ("0.0.0.0", "::", "10.0.0.1", ""):
        assert not resolves_to_loopback(host)


@contextmanager
def serve_cli(*args: str) -> Iterator[tuple[str, int]]:
    """`tokenjournal serve --port 0 ARGS` (not test mode); yields (host, port)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenjournal", "serve", "--port", "0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        port = int(line.rsplit(":", 1)[1].split()[0])
        yield "127.0.0.1", port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _closed(sock: socket.socket) -> bytes | None:
    """What the server sent before closing, or None while the connection is still open."""
    sock.setblocking(False)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except BlockingIOError:
        return None
    except ConnectionResetError:
        pass
    return data


def test_slow_clients_are_dropped_and_connections_capped() -> None:
    """Regression: connections trickling partial headers stayed open indefinitely (aiohttp's
    keep-alive default is an hour), with no cap on how many. Now a request head must be
    complete within --header-timeout, a body within --read-timeout (else 408), and past
    --max-connections a connection is answered 503 at once."""
    cap, extra = 40, 20
    with serve_cli(
        "--header-timeout", "1", "--read-timeout", "1", "--max-connections", str(cap)
    ) as (
        host,
        port,
    ):
        socks = []
        for _ in range(cap + extra):
            sock = socket.create_connection((host, port), timeout=5)
            sock.sendall(b"POST /auth/signin HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(sock)
            time.sleep(0.002)  # let the server count each connection before the next
        time.sleep(0.3)
        refused = [s for s in socks if (_closed(s) or b"").startswith(b"HTTP/1.1 503")]
        assert len(refused) >= extra - 2, f"{len(refused)} of {cap + extra} refused"
        started = time.monotonic()
        while any(_closed(s) is None for s in socks) and time.monotonic() - started < 10:
            time.sleep(0.1)
        held = sum(_closed(s) is None for s in socks)
        assert held == 0, (
            f"{held} slow connections still open after {time.monotonic() - started:.1f} s"
        )
        for s in socks:
            s.close()
        # A complete head with a body that never comes: 408, not a handler held forever.
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(
                b"POST /auth/signin HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        # And the server still serves.
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"GET /api/me HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 401")
