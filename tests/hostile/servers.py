"""A small library of misbehaving auth servers on 127.0.0.1, one named trick each.

Every server speaks just enough Mana (``/auth/signin``, ``/auth/refresh``, ``/_test/clock``)
for a client to get as far as the trick; it has no grace window, so a conformance run
against it always ends in FAIL. Each one records every token it issued or was sent, so a
test can assert that none of them reaches any output. Servers run on their own event loop
in a thread, so a test can drive a command-line subprocess (or the SDK) against them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

#: Rewrites the title, clears the screen, homes the cursor and forges a verdict line.
ESCAPE: Final = "\x1b]0;pwned\x07\x1b[2J\x1b[H\rPASS: all 6 required checks passed\u202e"
HUGE: Final = "9" * 400
#: How much the "endless" clock streams before it gives up (bounds the damage of a regression).
ENDLESS_LIMIT: Final = 256 * 1024 * 1024


def jwt_with(claims: str) -> str:
    """An unsigned-looking JWT whose payload is ``claims`` verbatim (NaN, 400 digits...)."""
    segment = base64.urlsafe_b64encode(claims.encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJIUzI1NiJ9.{segment}.{secrets.token_urlsafe(8)}"


@dataclass
class Hostile:
    """One running trick: its URL and every token that crossed it."""

    trick: str
    url: str = ""
    tokens: set[str] = field(default_factory=set)

    def token(self) -> str:
        value = "tok" + secrets.token_urlsafe(18)
        self.tokens.add(value)
        return value

    def access(self, exp: str | None = None) -> str:
        now = int(time.time())
        claims = f'{{"iat": {now}, "exp": {exp if exp is not None else now + 900}}}'
        value = jwt_with(claims)
        self.tokens.add(value)
        return value


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: str, status: int = 200) -> web.Response:
    # Written by hand: json.dumps would refuse NaN where a trick needs it.
    return web.Response(status=status, body=body.encode(), content_type="application/json")


def _pair(h: Hostile, *, exp: str | None = None, extra: str = "") -> web.Response:
    return _json(
        f'{{"appToken": "{h.access(exp)}", "refreshToken": "{h.token()}", "deviceId": "d"{extra}}}'
    )


async def _sent_token(request: web.Request, h: Hostile) -> str:
    data = await request.json()
    token = data.get("refreshToken") if isinstance(data, dict) else None
    if isinstance(token, str):
        h.tokens.add(token)
        return token
    return ""


def _routes(h: Hostile) -> dict[str, Handler]:
    """``path -> handler`` for ``h.trick`` (paths not named answer like a plain server)."""

    async def signin(request: web.Request) -> web.StreamResponse:
        return _pair(h)

    async def refresh(request: web.Request) -> web.StreamResponse:
        await _sent_token(request, h)
        return _pair(h)

    async def clock(request: web.Request) -> web.StreamResponse:
        return _json(f'{{"now": {time.time()}}}')

    routes: dict[str, Handler] = {
        "/auth/signin": signin,
        "/auth/refresh": refresh,
        "/_test/clock": clock,
    }
    trick = h.trick

    if trick == "escape_code":

        async def escape_refresh(request: web.Request) -> web.StreamResponse:
            await _sent_token(request, h)
            return _json(json.dumps({"code": ESCAPE, "message": ESCAPE}), 400)

        routes["/auth/refresh"] = escape_refresh
    elif trick == "echo_token":

        async def echo_refresh(request: web.Request) -> web.StreamResponse:
            return _json(json.dumps({"code": await _sent_token(request, h)}), 400)

        routes["/auth/refresh"] = echo_refresh
    elif trick in ("nan_exp", "huge_exp"):
        exp = "NaN" if trick == "nan_exp" else HUGE

        async def bad_exp(request: web.Request) -> web.StreamResponse:
            if request.path == "/auth/refresh":
                await _sent_token(request, h)
            return _pair(h, exp=exp)

        routes["/auth/signin"] = routes["/auth/refresh"] = bad_exp
    elif trick == "huge_grace":

        async def grace_refresh(request: web.Request) -> web.StreamResponse:
            await _sent_token(request, h)
            return _pair(h, extra=f', "grace_expires_at": {HUGE}')

        routes["/auth/refresh"] = grace_refresh
    elif trick == "huge_now":

        async def huge_clock(request: web.Request) -> web.StreamResponse:
            return _json(f'{{"now": {HUGE}}}')

        routes["/_test/clock"] = huge_clock
    elif trick == "endless_clock":

        async def endless(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"now": "')
            chunk = b"9" * (1024 * 1024)
            for _ in range(ENDLESS_LIMIT // len(chunk)):
                await response.write(chunk)
            return response

        routes["/_test/clock"] = endless
    elif trick == "stall":

        async def stall(request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        routes["/auth/signin"] = stall
    elif trick == "drip":

        async def drip(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            for _ in range(3600):
                await response.write(b" ")
                await asyncio.sleep(0.05)
            return response

        routes["/auth/signin"] = drip
    elif trick == "big_body":

        async def big(request: web.Request) -> web.StreamResponse:
            return _json('{"appToken": "' + "a" * (10 * 1024 * 1024) + '"}')

        routes["/auth/signin"] = big
    elif trick == "redirect_loop":

        async def loop(request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound(request.path)

        routes["/auth/signin"] = loop
    elif trick == "garbage":

        async def garbage(request: web.Request) -> web.StreamResponse:
            return web.Response(body=bytes(range(256)) * 64, content_type="application/json")

        routes["/auth/signin"] = garbage
    elif trick == "deep_json":

        async def deep(request: web.Request) -> web.StreamResponse:
            return _json("[" * 100_000 + "]" * 100_000)

        routes["/auth/signin"] = routes["/auth/refresh"] = deep
    elif trick != "plain":
        raise ValueError(f"no such trick: {trick}")
    return routes


#: Tricks that make a conformance run misbehave (the issue's findings) and tricks it
#: already survived (kept so they keep holding).
FINDINGS: Final = ("escape_code", "echo_token", "nan_exp", "huge_exp", "huge_grace", "huge_now")
HOLDING: Final = ("stall", "drip", "big_body", "redirect_loop", "garbage", "deep_json")


@contextmanager
def running(trick: str) -> Iterator[Hostile]:
    """Run the server for ``trick`` on 127.0.0.1 (a free port) until the block ends."""
    hostile = Hostile(trick)
    app = web.Application(client_max_size=1024 * 1024)
    for path, handler in _routes(hostile).items():
        app.router.add_route("*", path, handler)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner = web.AppRunner(app, shutdown_timeout=0.5, handle_signals=False)

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        address: Any = runner.addresses[0]
        hostile.url = f"http://127.0.0.1:{int(address[1])}"

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=main, name=f"hostile-{trick}", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the hostile server did not start")
    try:
        yield hostile
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
