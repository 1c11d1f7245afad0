"""Shared fixtures: the reference server on loopback, a fake clock, a journal path.

aioresponses 0.7.9 builds ``ClientResponse`` without the ``stream_writer`` argument that
aiohttp 3.14 made mandatory (aioresponses issue 289). Rather than pin aiohttp below its
security release, the shim below supplies the missing argument. aioresponses patches
``ClientSession._request``, so client middlewares never run under it: it is used only for
the manager's own calls to the auth server; the middleware is tested on real servers.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import aioresponses.core
import pytest

import tokenjournal as tj
from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.testing import FakeClock

if "stream_writer" in inspect.signature(aiohttp.ClientResponse.__init__).parameters:

    class _CompatResponse(aiohttp.ClientResponse):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # A mocked response was never written: nothing was sent on any stream.
            kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
            super().__init__(*args, **kwargs)

    aioresponses.core.ClientResponse = _CompatResponse  # type: ignore[misc]

DEMO = {"email": "demo@example.com", "password": "demo"}


@asynccontextmanager
async def manager(
    server: ReferenceServer, journal: Any, *, sign_in: bool = True, **kw: Any
) -> AsyncIterator[tj.TokenManager]:
    """An open manager on ``server`` (signed in as the demo user unless ``sign_in=False``)."""
    async with tj.TokenManager(server.url, journal=journal, **kw) as tm:
        if sign_in:
            await tm.sign_in(**DEMO)
        yield tm


@pytest.fixture
def clock() -> FakeClock:
    """A clock that moves only when told (or when the SDK sleeps)."""
    return FakeClock()


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    """A journal file in a fresh folder."""
    return tmp_path / "state" / "tokens.db"


@pytest.fixture
async def server() -> AsyncIterator[ReferenceServer]:
    """The reference server in test mode on a free 127.0.0.1 port (access TTL 900 s)."""
    async with ReferenceServer(ServerConfig(test_mode=True)) as srv:
        yield srv


@pytest.fixture
async def server409() -> AsyncIterator[ReferenceServer]:
    """The reference server answering concurrent rotations with 409 rotation_in_progress."""
    async with ReferenceServer(ServerConfig(test_mode=True, conflict="409")) as srv:
        yield srv


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``predicate`` on the loop until it holds; ``timeout`` (real seconds) only stops a
    hang, it is never what a test waits for."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def modules_loaded(steps: Sequence[str], watch: Sequence[str]) -> list[list[str]]:
    """Run ``steps`` (Python statements) one after another in a fresh interpreter and say,
    after each, which of the ``watch`` modules it has loaded: what an import costs an app
    that never uses an optional part."""
    report = f"print(json.dumps(sorted(m for m in {tuple(watch)!r} if m in sys.modules)))"
    code = "\n".join(["import json, sys", *(f"{step}\n{report}" for step in steps)])
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return [json.loads(line) for line in out.splitlines()]
