"""RequestsAuth and HttpxAuth: the middleware's rules (invariants 9 and 10) for requests and
httpx (and its fork httpx2), against the reference server and a recording server."""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests

import tokenjournal as tj
import tokenjournal.sync as tjs
from tokenjournal.adapters import HttpxAuth, RequestsAuth
from tokenjournal.testing import FakeClock, reference_server

from .conftest import DEMO, modules_loaded
from .harness.threaded import Recorder, ThreadedReferenceServer


def _httpx_flavours() -> list[Any]:
    params = []
    for name in ("httpx", "httpx2"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            module = None
        marks = [pytest.mark.skip(reason=f"{name} is not installed")] if module is None else []
        params.append(pytest.param(module, id=name, marks=marks))
    return params


HTTPX = _httpx_flavours()


@pytest.fixture
def server() -> Iterator[ThreadedReferenceServer]:
    with ThreadedReferenceServer() as srv:
        yield srv


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with Recorder() as rec:
        yield rec


@pytest.fixture
def foreign() -> Iterator[Recorder]:
    with Recorder() as rec:
        yield rec


@pytest.fixture
def tm(
    server: ThreadedReferenceServer, recorder: Recorder, journal_path: Path
) -> Iterator[tjs.TokenManager]:
    origins = [server.url, recorder.url]
    with tjs.TokenManager(server.url, journal_path, allowed_origins=origins) as manager:
        manager.sign_in(**DEMO)
        yield manager


def bearer(tm: tjs.TokenManager) -> str:
    assert tm.tokens is not None
    return "Bearer " + tm.tokens.access_token


def test_importing_tokenjournal_imports_neither_requests_nor_httpx() -> None:
    steps = ["import tokenjournal, tokenjournal.sync, tokenjournal.adapters"]
    assert modules_loaded(steps, ("requests", "httpx", "httpx2")) == [[]]


def test_the_auth_classes_are_what_the_clients_expect() -> None:
    import requests.auth

    assert issubclass(RequestsAuth, requests.auth.AuthBase)
    for param in HTTPX:
        module = param.values[0]
        if module is not None:
            assert issubclass(HttpxAuth, module.Auth)


# ---------------------------------------------------------------------------- requests


def test_requests_50_threads_across_an_expiry_make_one_refresh(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    clock = FakeClock()
    with tjs.TokenManager(server.url, journal_path, clock=clock) as manager:
        manager.sign_in(**DEMO)
        clock.advance(901)
        server.advance(901)
        barrier = threading.Barrier(50)

        def worker(_: int) -> list[int]:
            with requests.Session() as session:
                session.auth = RequestsAuth(manager)
                barrier.wait()
                return [session.get(server.url + "/api/me").status_code for _ in range(4)]

        with ThreadPoolExecutor(50) as pool:
            statuses = [s for batch in pool.map(worker, range(50)) for s in batch]
    assert statuses == [200] * 200
    stats = server.stats()
    assert stats["rotations"] == 1 and stats["api_401"] == 0
    assert manager.manager.refresh_requests == 1


def test_requests_a_401_refreshes_keyed_on_the_token_and_replays_once(
    server: ThreadedReferenceServer, tm: tjs.TokenManager
) -> None:
    server.advance(901)  # the server says the token is dead; the client clock does not know
    old = bearer(tm)
    with requests.Session() as session:
        session.auth = RequestsAuth(tm)
        response = session.get(server.url + "/api/me")
    assert response.status_code == 200
    assert bearer(tm) != old
    stats = server.stats()
    assert stats["rotations"] == 1 and stats["api_401"] == 1 and stats["api_200"] == 1


def test_requests_replays_only_once_and_never_a_stream(
    server: ThreadedReferenceServer, tm: tjs.TokenManager, recorder: Recorder
) -> None:
    with requests.Session() as session:
        session.auth = RequestsAuth(tm)
        first = bearer(tm)
        response = session.put(recorder.url + "/401", data=b"body")
        assert response.status_code == 401
        second = bearer(tm)
        assert [(p, a, b) for p, a, b in recorder.seen] == [
            ("/401", first, b"body"),
            ("/401", second, b"body"),  # the replay, with the fresh token; no third try
        ]
        recorder.seen.clear()
        response = session.put(recorder.url + "/401", data=iter([b"stre", b"am"]))
        assert response.status_code == 401
    assert [(p, a) for p, a, _ in recorder.seen] == [("/401", second)]  # not replayed
    assert bearer(tm) != second  # but the token moved on (invariant 10)
    assert server.stats()["rotations"] == 2


def test_requests_bearer_only_to_allowed_origins_never_after_a_foreign_redirect(
    tm: tjs.TokenManager, recorder: Recorder, foreign: Recorder
) -> None:
    with requests.Session() as session:
        session.auth = RequestsAuth(tm)
        session.get(foreign.url + "/direct")
        session.get(recorder.url + "/redirect?to=" + foreign.url + "/after-redirect")
        session.get(recorder.url + "/redirect?to=/same-origin")
        # A 401 from a hop that got no bearer says nothing of our token: no refresh.
        assert session.get(recorder.url + "/redirect?to=" + foreign.url + "/401").status_code == 401
        assert tm.manager.refresh_requests == 0
        # An explicit header is the caller's: left alone.
        session.get(recorder.url + "/own", headers={"Authorization": "Basic xyz"})
    assert [(p, a) for p, a, _ in foreign.seen] == [
        ("/direct", None),
        ("/after-redirect", None),
        ("/401", None),
    ]
    token = bearer(tm)
    assert [(p, a) for p, a, _ in recorder.seen] == [
        ("/redirect?to=" + foreign.url + "/after-redirect", token),
        ("/redirect?to=/same-origin", token),
        ("/same-origin", token),
        ("/redirect?to=" + foreign.url + "/401", token),
        ("/own", "Basic xyz"),
    ]


def test_requests_redirect_to_a_foreign_origin_on_the_same_host_loses_the_bearer(
    tm: tjs.TokenManager, recorder: Recorder, foreign: Recorder
) -> None:
    """requests strips the header only when the host changes; 127.0.0.1:A -> 127.0.0.1:B is
    another origin too (exact scheme, host and port: invariant 9)."""
    with requests.Session() as session:
        session.auth = RequestsAuth(tm)
        session.get(recorder.url + "/redirect?to=" + foreign.url + "/x")
    assert foreign.seen[0][1] is None


def test_requests_an_upgrade_redirect_requests_would_keep_the_bearer_on_loses_it(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    """requests keeps the header from http://host:80 to https://host:443; the middleware's
    rule says that is another origin, not allowed here, so the hook strips it first."""
    with tjs.TokenManager(server.url, journal_path, allowed_origins=["http://localhost"]) as m:
        m.sign_in(**DEMO)
        auth = RequestsAuth(m)
        request = auth(requests.Request("GET", "http://localhost/a").prepare())
        assert request.headers["Authorization"] == bearer(m)
        assert not requests.Session().should_strip_auth("http://localhost/a", "https://localhost/b")
        for target, kept in (("https://localhost/b", False), ("/same", True)):
            response = requests.Response()
            response.status_code, response.request = 302, request.copy()
            response.headers["Location"] = target
            auth._on_response(response)
            assert ("Authorization" in response.request.headers) is kept


def test_requests_a_redirect_answering_the_replay_gets_the_fresh_token_and_the_rule(
    tm: tjs.TokenManager, recorder: Recorder, foreign: Recorder
) -> None:
    """requests builds the next hop from the original request and runs no hook on the
    replay's answer: the hop used to carry the rejected token (a second 401 and a second
    replay) and, to another origin, skip the redirect rule."""
    with requests.Session() as session:
        session.auth = RequestsAuth(tm)
        first = bearer(tm)
        recorder.script = [(401, None), (302, "/after")]
        assert session.get(recorder.url + "/scripted").status_code == 200
        second = bearer(tm)
        recorder.script = [(401, None), (302, foreign.url + "/elsewhere")]
        assert session.get(recorder.url + "/scripted").status_code == 200
    third = bearer(tm)
    assert len({first, second, third}) == 3
    assert [(p, a) for p, a, _ in recorder.seen] == [
        ("/scripted", first),
        ("/scripted", second),
        ("/after", second),
        ("/scripted", second),
        ("/scripted", third),
    ]
    assert [(p, a) for p, a, _ in foreign.seen] == [("/elsewhere", None)]


def test_requests_no_bearer_over_plain_http_to_a_remote_host(
    server: ThreadedReferenceServer, journal_path: Path
) -> None:
    remote = "http://api.example.com"  # never contacted: the rule is checked first
    with tjs.TokenManager(server.url, journal_path, allowed_origins=[server.url, remote]) as m:
        m.sign_in(**DEMO)
        auth = RequestsAuth(m)
        prepared = requests.Request("GET", remote + "/x").prepare()
        assert "Authorization" not in auth(prepared).headers
        prepared = requests.Request("GET", server.url + "/x").prepare()
        assert auth(prepared).headers["Authorization"] == bearer(m)


def test_requests_auth_wants_the_sync_manager(journal_path: Path) -> None:
    with pytest.raises(TypeError, match="sync"):
        RequestsAuth(tj.TokenManager("http://127.0.0.1:1", journal_path))  # type: ignore[arg-type]


def test_no_token_in_logs_or_reprs(
    server: ThreadedReferenceServer, tm: tjs.TokenManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.advance(901)
    with requests.Session() as session:
        session.auth = RequestsAuth(tm)
        assert session.get(server.url + "/api/me").status_code == 200
    assert tm.tokens is not None
    text = caplog.text + repr(session.auth) + repr(tm) + repr(HttpxAuth(tm))
    assert tm.tokens.access_token not in text
    assert tm.tokens.refresh_token is not None and tm.tokens.refresh_token not in text


# ---------------------------------------------------------------------------- httpx


@pytest.mark.parametrize("httpx", HTTPX)
def test_httpx_sync_401_refresh_replay_and_foreign_redirects(
    httpx: ModuleType,
    server: ThreadedReferenceServer,
    tm: tjs.TokenManager,
    recorder: Recorder,
    foreign: Recorder,
) -> None:
    server.advance(901)
    old = bearer(tm)
    with httpx.Client(auth=HttpxAuth(tm), follow_redirects=True) as client:
        assert client.get(server.url + "/api/me").status_code == 200
        assert server.stats()["api_401"] == 1 and server.stats()["rotations"] == 1
        new = bearer(tm)
        assert new != old
        client.get(foreign.url + "/direct")
        client.get(recorder.url + "/redirect?to=" + foreign.url + "/after-redirect")
        client.get(recorder.url + "/redirect?to=/same-origin")
        # A 401 from a hop that got no bearer says nothing of our token: no refresh.
        assert client.get(recorder.url + "/redirect?to=" + foreign.url + "/401").status_code == 401
        assert server.stats()["rotations"] == 1
        assert client.put(recorder.url + "/401", content=b"body").status_code == 401
        newer = bearer(tm)

        def stream() -> Iterator[bytes]:
            yield b"stream"

        assert client.put(recorder.url + "/401", content=stream()).status_code == 401
    assert [(p, a) for p, a, _ in foreign.seen] == [
        ("/direct", None),
        ("/after-redirect", None),
        ("/401", None),
    ]
    assert [(p, a) for p, a, _ in recorder.seen] == [
        ("/redirect?to=" + foreign.url + "/after-redirect", new),
        ("/redirect?to=/same-origin", new),
        ("/same-origin", new),
        ("/redirect?to=" + foreign.url + "/401", new),
        ("/401", new),
        ("/401", newer),  # replayed once
        ("/401", newer),  # the stream: sent once, not replayed
    ]
    assert bearer(tm) != newer  # the stream's 401 still moved the token on
    assert server.stats()["rotations"] == 3


@pytest.mark.parametrize("httpx", HTTPX)
def test_httpx_a_request_sent_again_gets_a_fresh_token(
    httpx: ModuleType, server: ThreadedReferenceServer, tm: tjs.TokenManager
) -> None:
    """A retry loop around client.send(request): the header the auth set on the first send
    used to pass for the caller's own on the next, so the rejected token went out again and
    again, with no refresh."""
    with httpx.Client(auth=HttpxAuth(tm)) as client:
        request = client.build_request("GET", server.url + "/api/me")
        assert client.send(request).status_code == 200
        server.advance(901)  # the server says the token is dead; the client clock does not
        assert [client.send(request).status_code for _ in range(3)] == [200, 200, 200]
        assert request.headers["Authorization"] == bearer(tm)
        own = client.build_request("GET", server.url + "/api/me", headers={"Authorization": "x"})
        assert client.send(own).status_code == 401  # a caller's header is still left alone
    stats = server.stats()
    assert (stats["rotations"], stats["api_401"]) == (1, 2)


@pytest.mark.parametrize("httpx", HTTPX)
async def test_httpx_a_small_form_is_replayed_a_large_one_streamed(
    httpx: ModuleType,
    tm: tjs.TokenManager,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx streams a multipart form (files=) from its parts, and the flow replayed only a
    body already read: every form upload got its 401 back, where requests replays it."""
    files = {"f": ("a.txt", b"hello")}
    with httpx.Client(auth=HttpxAuth(tm)) as client:
        first = bearer(tm)
        assert client.post(recorder.url + "/401", files=files).status_code == 401
    async with httpx.AsyncClient(auth=HttpxAuth(tm)) as aclient:
        second = bearer(tm)
        assert (await aclient.post(recorder.url + "/401", files=files)).status_code == 401
        third = bearer(tm)
        monkeypatch.setattr("tokenjournal.adapters.FORM_BUFFER", len(recorder.seen[0][2]) - 1)
        assert (await aclient.post(recorder.url + "/401", files=files)).status_code == 401
    fourth = bearer(tm)
    assert len({first, second, third, fourth}) == 4
    seen = [(a, b"hello" in body) for _, a, body in recorder.seen]
    assert seen == [(first, True), (second, True), (second, True), (third, True), (third, True)]


@pytest.mark.parametrize("httpx", HTTPX)
async def test_httpx_async_with_the_async_manager(
    httpx: ModuleType, journal_path: Path, clock: FakeClock
) -> None:
    async with (
        reference_server() as server,
        tj.TokenManager(server.url, journal_path, clock=clock) as manager,
    ):
        first = await manager.sign_in(**DEMO)
        await server.advance(901)  # a 401 first: the server knows before the clock
        async with httpx.AsyncClient(auth=HttpxAuth(manager)) as client:
            assert (await client.get(server.url + "/api/me")).status_code == 200
            clock.advance(901)  # and now the clock knows too: no 401, a refresh up front
            await server.advance(901)
            assert (await client.get(server.url + "/api/me")).status_code == 200
        assert manager.tokens is not None and manager.tokens != first
        stats = server.stats()
    assert (stats["rotations"], stats["api_401"], stats["api_200"]) == (2, 1, 2)


@pytest.mark.parametrize("httpx", HTTPX)
async def test_httpx_async_with_the_sync_manager(
    httpx: ModuleType, server: ThreadedReferenceServer, tm: tjs.TokenManager
) -> None:
    server.advance(901)
    async with httpx.AsyncClient(auth=HttpxAuth(tm)) as client:
        assert (await client.get(server.url + "/api/me")).status_code == 200
    assert server.stats()["rotations"] == 1


@pytest.mark.parametrize("httpx", HTTPX)
async def test_httpx_sync_client_wants_the_sync_manager(
    httpx: ModuleType, journal_path: Path
) -> None:
    async with reference_server() as server, tj.TokenManager(server.url, journal_path) as manager:
        await manager.sign_in(**DEMO)
        with httpx.Client(auth=HttpxAuth(manager)) as client, pytest.raises(TypeError):
            client.get(server.url + "/api/me")
