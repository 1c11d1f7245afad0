"""Shared helpers for the reference-server tests (imported explicitly, not a conftest)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from tokenjournal.server import ReferenceServer, ServerConfig

DEVICE: dict[str, str] = {
    "deviceId": "0b7f3c1e-5d7a-4c36-9f1e-2f7c1d9a8b01",
    "deviceName": "pytest",
    "deviceType": "desktop",
    "userAgent": "tokenjournal-tests",
}
DEMO = {"email": "demo@example.com", "password": "demo"}


@dataclass
class Answer:
    """A fully read HTTP answer (the response is closed by the time a test sees it)."""

    status: int
    body: Any
    headers: CIMultiDictProxy[str]


@asynccontextmanager
async def serve(
    server: ReferenceServer | None = None, **config: Any
) -> AsyncIterator[tuple[ReferenceServer, aiohttp.ClientSession]]:
    """A test-mode server on 127.0.0.1 (port 0) and a session bound to its URL."""
    server = server or ReferenceServer(ServerConfig(**{"test_mode": True, **config}))
    async with server, aiohttp.ClientSession(server.url) as session:
        yield server, session


async def _answer(resp: aiohttp.ClientResponse) -> Answer:
    raw = await resp.read()
    try:
        body: Any = await resp.json(content_type=None) if raw else None
    except ValueError:
        body = raw
    return Answer(resp.status, body, resp.headers)


async def post(session: aiohttp.ClientSession, path: str, body: Any = None, **kw: Any) -> Answer:
    """POST JSON (or `data=`/`headers=` via kw) and read the whole answer."""
    if body is not None:
        kw["json"] = body
    async with session.post(path, **kw) as resp:
        return await _answer(resp)


async def get(session: aiohttp.ClientSession, path: str, **kw: Any) -> Answer:
    """GET and read the whole answer."""
    async with session.get(path, **kw) as resp:
        return await _answer(resp)


async def signin(session: aiohttp.ClientSession, device: dict[str, str] = DEVICE) -> Any:
    """Sign the demo user in over Mana; returns the 200 body."""
    answer = await post(session, "/auth/signin", {**DEMO, "deviceInfo": device})
    assert answer.status == 200, answer.body
    return answer.body


async def refresh(
    session: aiohttp.ClientSession, token: str, device: dict[str, str] = DEVICE
) -> Answer:
    """One Mana refresh."""
    return await post(session, "/auth/refresh", {"refreshToken": token, "deviceInfo": device})


async def me(session: aiohttp.ClientSession, access_token: str) -> Answer:
    """GET /api/me with a bearer token."""
    return await get(session, "/api/me", headers={"Authorization": f"Bearer {access_token}"})


async def oauth(session: aiohttp.ClientSession, form: dict[str, str], **kw: Any) -> Answer:
    """POST a form to /oauth/token."""
    return await post(session, "/oauth/token", data=form, **kw)
