"""The middleware on real loopback servers (aioresponses would bypass it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from yarl import URL

import tokenjournal as tj
from tokenjournal.server import ReferenceServer

from .conftest import DEMO


class Recorder:
    """A loopback app that records the Authorization header of every request it sees."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/echo", self.echo)
        self.app.router.add_get("/redirect", self.redirect)
        self.app.router.add_post("/always401", self.always401)
        self.target = ""
        self.url = ""

    async def echo(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers.get("Authorization"))
        return web.json_response({"ok": True})

    async def redirect(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers.get("Authorization"))
        raise web.HTTPFound(self.target)

    async def always401(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers.get("Authorization"))
        await request.read()
        return web.json_response({"message": "JWT expired"}, status=401)


@pytest.fixture
async def recorders() -> AsyncIterator[tuple[Recorder, Recorder]]:
    """Two recorders on two ports: two origins."""
    made = []
    runners = []
    for _ in range(2):
        rec = Recorder()
        runner = web.AppRunner(rec.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        made.append(rec)
        runners.append(runner)
    yield made[0], made[1]
    for runner in runners:
        await runner.cleanup()


async def test_401_refresh_replay_for_50_concurrent_requests(
    server: ReferenceServer, journal_path: Path
) -> None:
    """Invariant 10: the server outranks the clock; one refresh serves every 401."""
    async with tj.TokenManager(server.url, journal_path) as tm:
        old = await tm.sign_in(**DEMO)
        await server.advance(901)  # the server says expired; our clock does not know
        async with tm.client_session() as http:

            async def get() -> int:
                async with http.get(server.url + "/api/me") as response:
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(get() for _ in range(50)))
        assert statuses == [200] * 50
        assert tm.tokens is not None and tm.tokens.access_token != old.access_token
    stats = server.stats()
    assert (stats["refresh_requests"], stats["rotations"]) == (1, 1)
    assert stats["api_200"] == 50 and stats["api_401"] == 50


async def test_bearer_goes_only_to_allowed_origins(
    server: ReferenceServer, journal_path: Path, recorders: tuple[Recorder, Recorder]
) -> None:
    """Invariant 9."""
    allowed, foreign = recorders
    async with tj.TokenManager(
        server.url, journal_path, allowed_origins=[server.url, allowed.url]
    ) as tm:
        token = (await tm.sign_in(**DEMO)).access_token
        async with tm.client_session() as http:
            for url in (allowed.url + "/echo", foreign.url + "/echo"):
                async with http.get(url) as response:
                    assert response.status == 200
    assert allowed.seen == [f"Bearer {token}"]
    assert foreign.seen == [None]


async def test_no_bearer_on_a_redirect_to_another_origin(
    server: ReferenceServer, journal_path: Path, recorders: tuple[Recorder, Recorder]
) -> None:
    allowed, foreign = recorders
    allowed.target = foreign.url + "/echo"
    async with tj.TokenManager(server.url, journal_path, allowed_origins=[allowed.url]) as tm:
        token = (await tm.sign_in(**DEMO)).access_token
        async with tm.client_session() as http, http.get(allowed.url + "/redirect") as response:
            assert response.status == 200
    assert allowed.seen == [f"Bearer {token}"]
    assert foreign.seen == [None]


async def test_the_default_allows_only_the_auth_origin(
    server: ReferenceServer, journal_path: Path, recorders: tuple[Recorder, Recorder]
) -> None:
    other, _ = recorders
    async with tj.TokenManager(server.url, journal_path) as tm:
        await tm.sign_in(**DEMO)
        async with tm.client_session() as http, http.get(other.url + "/echo") as response:
            assert response.status == 200
    assert other.seen == [None]


async def test_a_stream_body_is_not_replayed_but_the_token_moves_on(
    server: ReferenceServer, journal_path: Path, recorders: tuple[Recorder, Recorder]
) -> None:
    api, _ = recorders
    async with tj.TokenManager(
        server.url, journal_path, allowed_origins=[server.url, api.url]
    ) as tm:
        old = (await tm.sign_in(**DEMO)).access_token

        async def stream() -> AsyncIterator[bytes]:
            yield b"chunk"

        async with tm.client_session() as http:
            async with http.post(api.url + "/always401", data=stream()) as response:
                assert response.status == 401
            assert api.seen == [f"Bearer {old}"]  # sent once, not replayed
            assert tm.tokens is not None and tm.tokens.access_token != old
            async with http.post(api.url + "/always401", json={"a": 1}) as response:
                assert response.status == 401  # a bytes body is replayed once, then returned
    assert len(api.seen) == 3
    assert server.stats()["refresh_requests"] == 2


async def test_an_explicit_authorization_header_is_left_alone(
    server: ReferenceServer, journal_path: Path, recorders: tuple[Recorder, Recorder]
) -> None:
    api, _ = recorders
    async with tj.TokenManager(server.url, journal_path, allowed_origins=[api.url]) as tm:
        await tm.sign_in(**DEMO)
        async with (
            tm.client_session() as http,
            http.get(api.url + "/echo", headers={"Authorization": "Basic abc"}) as response,
        ):
            assert response.status == 200
    assert api.seen == ["Basic abc"]


def test_plain_http_to_a_remote_host_needs_explicit_consent(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    api = ["https://auth.example.com", "http://api.example.com"]
    strict = tj.TokenManager("https://auth.example.com", journal, allowed_origins=api)
    assert not strict.middleware.allows(URL("http://api.example.com/x"))
    relaxed = tj.TokenManager(
        "https://auth.example.com", journal, allowed_origins=api, allow_insecure_http=True
    )
    assert relaxed.middleware.allows(URL("http://api.example.com/x"))
    secure = tj.TokenManager("https://api.example.com", journal)
    assert secure.middleware.allows(URL("https://api.example.com/x"))
    assert not secure.middleware.allows(URL("https://api.example.com:8443/x"))
    assert not secure.middleware.allows(URL("https://evil.example.com/x"))


async def test_a_session_ended_during_a_401_is_raised(
    server: ReferenceServer, journal_path: Path
) -> None:
    async with tj.TokenManager(server.url, journal_path) as tm:
        await tm.sign_in(**DEMO)
        await server.advance(40 * 86400)  # access and refresh tokens both dead
        async with tm.client_session() as http:
            with pytest.raises(tj.SessionEnded):
                async with http.get(server.url + "/api/me"):
                    pass
        assert tm.state is tj.SessionState.ENDED


@pytest.mark.parametrize("bad", [["ftp://api.example.com"], ["not a url"], ["https://"]])
def test_the_middleware_validates_its_origins_at_construction(
    tmp_path: Path, bad: list[str]
) -> None:
    with pytest.raises(ValueError, match="allowed_origins"):
        tj.TokenManager("https://auth.example.com", tmp_path / "j.db", allowed_origins=bad)
    with pytest.raises(TypeError, match="not one string"):
        tj.TokenMiddleware(object(), "https://api.example.com")  # type: ignore[arg-type]


class _NoSource:
    async def access_token(self) -> str:
        raise AssertionError("not called")

    async def refresh_for(self, rejected_access_token: str) -> tj.TokenSet:
        raise AssertionError("not called")


def test_the_remembered_origin_decision_is_the_decision() -> None:
    """Decided once per origin (the per-request cost): asked again, in any order, past the
    memory's size, the answer is what the full check says, for every kind of origin."""
    from tokenjournal._middleware import DECISIONS

    allowed = ["https://api.example.com", "http://127.0.0.1:8080", "http://intranet.example:81"]
    mw = tj.TokenMiddleware(_NoSource(), allowed)
    expected = {
        "https://api.example.com/x?q=1": True,
        "https://API.example.com:443/y": True,
        "https://api.example.com:8443/x": False,  # another port is another origin
        "http://api.example.com/x": False,  # another scheme too
        "http://127.0.0.1:8080/me": True,  # plain HTTP, but loopback
        "http://intranet.example:81/me": False,  # plain HTTP to a remote host: no consent
        "https://evil.example.com/x": False,
    }
    for _ in range(3):
        for url, allowed_here in expected.items():
            assert mw.allows(URL(url)) is allowed_here, url
    for n in range(DECISIONS * 2):  # more origins than remembered: forgotten, still right
        assert mw.allows(URL(f"https://host{n}.example.com/")) is False
    for url, allowed_here in expected.items():
        assert mw.allows(URL(url)) is allowed_here, url
    consenting = tj.TokenMiddleware(_NoSource(), allowed, allow_insecure_http=True)
    assert consenting.allows(URL("http://intranet.example:81/me")) is True


def test_the_origin_policy_is_read_only() -> None:
    """What is decided once cannot be changed behind the decisions' back."""
    mw = tj.TokenMiddleware(_NoSource(), ["https://api.example.com"])
    with pytest.raises(AttributeError):
        mw.allow_insecure_http = True  # type: ignore[misc]
    with pytest.raises(AttributeError):
        mw.allowed_origins = frozenset()  # type: ignore[misc]
    assert mw.allowed_origins == frozenset({("https", "api.example.com", 443)})
