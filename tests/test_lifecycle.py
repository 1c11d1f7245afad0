"""Cancellation, lifecycle and odd-but-legal input: a manager that is cancelled, never
closed, forked, ended, or fed a strange pair keeps a coherent state and never hangs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses

import tokenjournal as tj
from tokenjournal.server import ReferenceServer
from tokenjournal.testing import FakeClock

from .conftest import DEMO

AUTH = "http://127.0.0.1:9"  # aioresponses answers; nothing listens there


# ----------------------------------------------------------------------------- close and open


async def test_a_cancelled_close_is_finished_by_the_next_close(
    journal_path: Path, clock: FakeClock
) -> None:
    tm = tj.TokenManager(AUTH, journal_path, clock=clock)
    await tm.open()
    pair = tj.TokenSet("a0", "r0", datetime.now(UTC) - timedelta(seconds=1))
    await tm.set_tokens(pair)
    answered = asyncio.Event()

    async def hang(url: object, **_: object) -> None:
        await answered.wait()  # the refresh is in flight until told

    with aioresponses() as mock:
        mock.post(f"{AUTH}/auth/refresh", callback=hang, repeat=True)
        caller = asyncio.ensure_future(tm.access_token())
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):  # a shutdown timeout cancels close()
            await asyncio.wait_for(tm.close(), 0.05)
        http = tm._http
        assert http is not None and not http.closed  # the first close did not finish
        answered.set()
        await asyncio.wait_for(tm.close(), 10)  # the second one does
        assert http.closed and tm._http is None
        await asyncio.gather(caller, return_exceptions=True)
    with pytest.raises(RuntimeError, match="not open"):
        await tm.access_token()


async def test_concurrent_opens_share_one_session_and_one_connection(
    journal_path: Path,
) -> None:
    tm = tj.TokenManager(AUTH, journal_path)
    made: list[aiohttp.ClientSession] = []
    real = aiohttp.ClientSession.__init__

    def spy(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aiohttp.ClientSession, "__init__", spy)
        await asyncio.gather(tm.open(), tm.open(), tm.open())
    assert len(made) == 1
    await tm.set_tokens(tj.TokenSet("a", "r"))
    await tm.close()
    assert made[0].closed


async def test_events_iterators_end_when_the_manager_closes(journal_path: Path) -> None:
    tm = tj.TokenManager(AUTH, journal_path)
    await tm.open()
    seen: list[tj.EventKind] = []

    async def consume() -> None:
        async for event in tm.events():
            seen.append(event.kind)

    consumer = asyncio.ensure_future(consume())
    await asyncio.sleep(0)
    await tm.set_tokens(tj.TokenSet("a", "r"))
    await tm.close()
    await asyncio.wait_for(consumer, 2)  # ends by itself, after what was emitted
    assert tj.EventKind.SIGNED_IN in seen


async def test_events_end_even_when_close_is_cut_short(journal_path: Path) -> None:
    """A shutdown timeout cancelled close() while it waited for a refresh, before it ended
    the streams: the app's `async for` over events() then hung the very shutdown it was
    meant not to hang."""
    tm = tj.TokenManager(AUTH, journal_path)
    await tm.open()
    await tm.set_tokens(tj.TokenSet("a", "r", datetime.now(UTC) - timedelta(seconds=1)))
    answered = asyncio.Event()

    async def hang(url: object, **_: object) -> None:
        await answered.wait()

    stream = tm.events()
    consumer = asyncio.ensure_future(_kinds(stream))
    with aioresponses() as mock:
        mock.post(f"{AUTH}/auth/refresh", callback=hang, repeat=True)
        caller = asyncio.ensure_future(tm.access_token())
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(tm.close(), 0.05)
        assert tj.EventKind.STATE in await asyncio.wait_for(consumer, 2)
        answered.set()
        await asyncio.wait_for(tm.close(), 10)
        await asyncio.gather(caller, return_exceptions=True)


async def _kinds(stream: AsyncIterator[tj.TokenEvent]) -> list[tj.EventKind]:
    return [event.kind async for event in stream]


async def test_events_of_a_closed_manager_end_at_once_and_start_when_asked(
    journal_path: Path,
) -> None:
    """events() subscribed on its first read, so `s = tm.events(); await tm.sign_in(...)`
    missed the sign-in; on a closed manager it waited for ever (a supervisor restarting
    its reader during a shutdown)."""
    tm = tj.TokenManager(AUTH, journal_path)
    await tm.open()
    stream = tm.events()  # asked before the sign-in, read after it
    await tm.set_tokens(tj.TokenSet("a", "r"))
    await tm.close()
    assert await asyncio.wait_for(_kinds(stream), 2) == [
        tj.EventKind.STATE,
        tj.EventKind.SIGNED_IN,
    ]
    assert await asyncio.wait_for(_kinds(tm.events()), 2) == []
    await tm.open()  # open again: a stream waits for events as before
    late = tm.events()
    await tm.set_tokens(tj.TokenSet("a2", "r2"))
    await tm.close()
    assert tj.EventKind.SIGNED_IN in await asyncio.wait_for(_kinds(late), 2)


async def test_subscriptions_are_each_their_own_and_never_async(journal_path: Path) -> None:
    """An async def callback was called and its coroutine dropped (never run); the same
    function subscribed twice was one entry to each unsubscribe, so one handle called
    twice took the other subscription away. An events() iterator dropped unread no longer
    stays subscribed."""
    tm = tj.TokenManager(AUTH, journal_path)

    async def coroutine_callback(event: tj.TokenEvent) -> None:
        pass

    with pytest.raises(TypeError, match="called, not awaited"):
        tm.subscribe(coroutine_callback)
    seen: list[tj.TokenEvent] = []
    first = tm.subscribe(seen.append)
    tm.subscribe(seen.append)
    first()
    first()
    unread = tm.events()
    del unread
    async with tm:
        await tm.set_tokens(tj.TokenSet("a", "r"))
    assert [e.kind for e in seen] == [tj.EventKind.STATE, tj.EventKind.SIGNED_IN]
    assert len(tm._hub._callbacks) == 1  # the dropped iterator let go at the first event


@pytest.mark.parametrize("how", ["exception", "no_close"])
def test_a_manager_never_closed_does_not_hang_the_interpreter(tmp_path: Path, how: str) -> None:
    """An app bug between open() and close(): the process still exits."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        import tokenjournal as tj

        async def main():
            tm = tj.TokenManager("http://127.0.0.1:9", {str(tmp_path / "j.db")!r})
            await tm.open()
            await tm.set_tokens(tj.TokenSet("a", "r"))
            globals()["kept"] = tm  # alive at exit, as an app's global would be
            if {how!r} == "exception":
                raise SystemExit(3)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == (3 if how == "exception" else 0), done.stderr


# ----------------------------------------------------------------------------- fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_manager_built_before_fork_has_its_own_lease_identity_in_the_child(
    tmp_path: Path,
) -> None:
    tm = tj.TokenManager(AUTH, tmp_path / "j.db")
    parent = tm._holder
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the identity it would take leases with, and leave
        try:
            os.write(write, f"{tm._holder.id}|{tm._holder.pid}".encode())
        finally:
            os._exit(0)
    os.close(write)
    child_id, child_pid = os.read(read, 200).decode().split("|")
    os.close(read)
    os.waitpid(pid, 0)
    assert child_id != parent.id and int(child_pid) == pid
    assert tm._holder == parent  # the parent keeps its own


# ----------------------------------------------------------------------------- ENDED adopts


async def test_an_ended_manager_adopts_a_sign_in_made_by_another_process(
    server: ReferenceServer, journal_path: Path
) -> None:
    async with tj.TokenManager(server.url, journal_path) as daemon:
        await daemon.sign_in(**DEMO)
        await server.advance(40 * 86400)  # both tokens dead
        with pytest.raises(tj.SessionEnded):
            await daemon.refresh()
        assert daemon.state is tj.SessionState.ENDED
        async with tj.TokenManager(server.url, journal_path) as gui:  # the person signs in
            fresh = await gui.sign_in(**DEMO)
        assert await daemon.access_token() == fresh.access_token
        assert daemon.state is tj.SessionState.VALID


# ----------------------------------------------------------------------------- odd pairs


async def test_a_pair_without_refresh_token_is_used_until_a_401_then_ends_cleanly(
    journal_path: Path, clock: FakeClock
) -> None:
    async with tj.TokenManager(AUTH, journal_path, clock=clock) as tm:
        expired = datetime.fromtimestamp(clock.time() - 5, UTC)
        await tm.set_tokens(tj.TokenSet("a0", None, expired))
        with aioresponses() as mock:
            assert await tm.access_token() == "a0"  # the server decides, not our clock
            assert tm.state is tj.SessionState.VALID
            record = await tm.journal.load(tm.account)
            assert record.intent is None and record.lease is None
            with pytest.raises(tj.SessionEnded) as ended:
                await tm.refresh_for("a0")  # the 401
            assert not mock.requests  # nothing could be sent, nothing was
        assert ended.value.code == "no_refresh_token"
        assert tm.state is tj.SessionState.ENDED
    async with tj.TokenManager(AUTH, journal_path, clock=clock) as again:
        record = await again.journal.load(again.account)
        assert record.intent is None and record.ended_code == "no_refresh_token"


def test_an_empty_token_type_is_refused() -> None:
    with pytest.raises(ValueError, match="token_type"):
        tj.TokenSet("a", "r", token_type="")


def test_http_request_repr_shows_no_secret() -> None:
    device = tj.DeviceInfo("d")
    mana = tj.ManaProtocol("https://a.example")
    oauth = tj.OAuth2Protocol(
        "https://a.example/token", client_id="app", client_secret="CLIENT-SECRET"
    )
    requests = [
        mana.build_refresh(tj.TokenSet("ACCESS", "REFRESH-SECRET"), device),
        mana.build_sign_in({"email": "e@x", "password": "PASSWORD-SECRET"}, device),
        oauth.build_refresh(tj.TokenSet("ACCESS", "REFRESH-SECRET"), device),
        oauth.build_sign_in({"username": "u", "password": "PASSWORD-SECRET"}, device),
    ]
    for request in requests:
        for text in (repr(request), str(request), repr([request])):
            assert "SECRET" not in text and "Basic" not in text
            assert "a.example" in text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"auth_url": "http://auth.example.com"},
        {
            "auth_url": "https://auth.example.com",
            "protocol": tj.OAuth2Protocol("http://auth.example.com/token", client_id="c"),
        },
    ],
)
def test_plain_http_to_a_remote_auth_server_is_refused(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="plain HTTP"):
        tj.TokenManager(journal=tmp_path / "j.db", **kwargs)
    tj.TokenManager(journal=tmp_path / "j.db", allow_insecure_http=True, **kwargs)
    tj.TokenManager("http://127.0.0.1:8080", tmp_path / "j.db")  # this machine is fine


class Exploding(tj.ManaProtocol):
    """A protocol that raises on what it reads (a third-party one, or a case ours missed)."""

    def parse_tokens(self, *args: Any, **kwargs: Any) -> tj.TokenSet | tj.Failure:
        raise RecursionError("maximum recursion depth exceeded")


async def test_a_protocol_that_raises_leaves_a_coherent_state(clock: FakeClock) -> None:
    policy = tj.RetryPolicy(max_attempts=2)
    tm = tj.TokenManager(
        AUTH, tj.MemoryJournal(), protocol=Exploding(AUTH), clock=clock, retry=policy
    )
    events: list[tj.TokenEvent] = []
    tm.subscribe(events.append)
    async with tm:
        await tm.set_tokens(tj.TokenSet("a0", "r0", datetime.now(UTC) + timedelta(hours=1)))
        with aioresponses() as mock:
            mock.post(f"{AUTH}/auth/refresh", payload={}, repeat=True)
            with pytest.raises(tj.ProtocolError):
                await tm.refresh()
        assert tm.state is tj.SessionState.VALID  # not stuck at REFRESHING
        assert tj.EventKind.REFRESH_FAILED in [e.kind for e in events]
        assert tm.tokens is not None and tm.tokens.refresh_token == "r0"


def test_exported_names_live_in_the_public_module() -> None:
    import pickle

    for name in ("SessionEnded", "TokenManager", "TokenSet", "RetryPolicy", "fingerprint"):
        assert getattr(tj, name).__module__ == "tokenjournal"
    error = pickle.loads(pickle.dumps(tj.SessionEnded("token_expired")))
    assert isinstance(error, tj.SessionEnded) and error.code == "token_expired"
    assert "tokenjournal.SessionEnded" in repr(type(error))


async def test_a_cancelled_sign_out_still_finishes_and_never_hands_out_the_old_pair(
    server: ReferenceServer, journal_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the torture run: sign_out() timed out after the logout left; the old pair
    stayed in memory, the app stored it back with set_tokens(tm.tokens), and the next
    refresh sent a revoked token (invalid_token_state: session lost)."""
    async with tj.TokenManager(server.url, journal_path) as tm:
        await tm.sign_in(**DEMO)
        real = tm._send
        answered = asyncio.Event()

        async def slow(request: Any) -> Any:
            raw = await real(request)  # the server has the logout now
            answered.set()
            await asyncio.sleep(0.2)  # its answer is slow to come back
            return raw

        monkeypatch.setattr(tm, "_send", slow)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(tm.sign_out(), 0.05)
        assert answered.is_set()
        assert tm.tokens is None and tm.state is tj.SessionState.SIGNED_OUT
        with pytest.raises(tj.NotSignedIn):
            await tm.access_token()
        async with asyncio.timeout(5):  # the sign-out runs to its end all the same
            while (await tm.journal.load(tm.account)).intent is not None:
                await asyncio.sleep(0.01)
        record = await tm.journal.load(tm.account)
        assert record.tokens is None
