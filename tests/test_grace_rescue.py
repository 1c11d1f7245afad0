"""The grace rescue (invariant 11): a pending refresh is retried inside the server's grace
window without any caller, so an idle app loses no session that could be saved.

The reference server runs on the client's fake clock; the network between them fails on a
script: a refresh answer lost after the server rotated, then the network down for a while.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import tokenjournal as tj
from tokenjournal import _manager
from tokenjournal._transport import NetworkFailure
from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.server._clock import ServerClock
from tokenjournal.testing import FakeClock

from .conftest import DEMO

GRACE = 300.0


class LinkedClock(ServerClock):
    """The server reads the client's fake wall clock: both sides live in one timeline."""

    __slots__ = ("fake",)

    def __init__(self, fake: FakeClock) -> None:
        super().__init__()
        self.fake = fake

    def now(self) -> float:
        return self.fake.time()


class Network:
    """Between manager and server: loses the next refresh answer (the server rotated), and
    from then on is down for ``outage`` seconds."""

    def __init__(self, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clock = clock
        self.lose_next_answer = False
        self.outage = 0.0
        self.down_until = -math.inf
        self.sent: list[float] = []  # when each request left, fake wall time
        real = _manager.send

        async def send(http: aiohttp.ClientSession, request: Any, limit: float) -> Any:
            self.sent.append(clock.time())
            if clock.time() < self.down_until:
                raise NetworkFailure("ClientConnectionError")  # what send() makes of it
            answer = await real(http, request, limit)
            if self.lose_next_answer and request.url.endswith("/auth/refresh"):
                self.lose_next_answer = False
                self.down_until = clock.time() + self.outage
                raise NetworkFailure("ServerDisconnectedError")  # the server did rotate
            return answer

        monkeypatch.setattr(_manager, "send", send)


@pytest.fixture
async def linked(clock: FakeClock) -> AsyncIterator[ReferenceServer]:
    async with ReferenceServer(ServerConfig(test_mode=True, grace=GRACE)) as server:
        server.state.clock = LinkedClock(clock)
        yield server


async def _lose_answer_then_go_down(
    tm: tj.TokenManager, net: Network, clock: FakeClock, down_for: float
) -> list[tj.TokenEvent]:
    events: list[tj.TokenEvent] = []
    tm.subscribe(events.append)
    await tm.sign_in(**DEMO)
    clock.advance(901)  # the access token (900 s) is dead: the next call must refresh
    net.lose_next_answer, net.outage = True, down_for
    with pytest.raises(tj.NetworkError):  # the one call the app makes; then it goes idle
        await tm.access_token()
    assert tm._rescue is not None
    await asyncio.wait_for(tm._rescue, 30)  # real seconds; the fake clock runs the window
    return events


async def test_idle_app_keeps_its_session_through_a_60s_outage(
    linked: ReferenceServer, journal_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = Network(clock, monkeypatch)
    async with tj.TokenManager(linked.url, journal_path, clock=clock) as tm:
        events = await _lose_answer_then_go_down(tm, net, clock, down_for=60)
        assert tm.state is tj.SessionState.VALID
        kinds = [e.kind for e in events]
        assert tj.EventKind.RECOVERING in kinds
        assert kinds[-1] is tj.EventKind.REFRESHED or tj.EventKind.REFRESHED in kinds
        stats = linked.stats()
        assert stats["rotations"] == 1 and stats["grace_replays"] == 1
        # The rescue noticed the network within min(10% of the window, 30 s) of its return.
        assert net.sent[-1] - net.down_until <= min(0.1 * GRACE, 30) + 1e-6
        record = await tm.journal.load(tm.account)
        assert record.intent is None and record.tokens == tm.tokens
        await tm.access_token()  # and the app's next call is served from memory


async def test_outage_past_the_window_ends_in_one_clean_session_ended(
    linked: ReferenceServer, journal_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = Network(clock, monkeypatch)
    async with tj.TokenManager(linked.url, journal_path, clock=clock) as tm:
        events = await _lose_answer_then_go_down(tm, net, clock, down_for=400)
        tries_in_window = len(net.sent) - 2  # sign-in and the lost answer
        assert 0 < tries_in_window <= 36  # a few dozen at the most
        assert tm.state is tj.SessionState.OFFLINE
        # The network is back at 400 s; the app calls again once the offline pause is over
        # (the last rescue try failed: the next comes within 10 x max_delay).
        clock.advance(_manager.OFFLINE_FACTOR * tm.retry.max_delay)
        with pytest.raises(tj.SessionEnded) as ended:
            await tm.access_token()
        assert ended.value.code == "token_expired"
        with pytest.raises(tj.SessionEnded):
            await tm.access_token()  # from memory: the server is not asked again
        assert [e.kind for e in events].count(tj.EventKind.ENDED) == 1
        assert linked.stats()["rotations"] == 1


async def test_a_pending_intent_found_at_open_is_rescued_without_a_caller(
    linked: ReferenceServer, journal_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = Network(clock, monkeypatch)
    async with tj.TokenManager(linked.url, journal_path, clock=clock) as tm:
        await tm.sign_in(**DEMO)
        clock.advance(901)
        net.lose_next_answer, net.outage = True, 90
        with pytest.raises(tj.NetworkError):
            await tm.access_token()
    # The process restarts with the intent pending; the network is still down; nobody calls.
    async with tj.TokenManager(linked.url, journal_path, clock=clock) as tm:
        async with asyncio.timeout(10):  # open()'s own recovery fails, then the rescue runs
            while tm._rescue is None:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(tm._rescue, 30)
        assert tm.state is tj.SessionState.VALID
        assert linked.stats()["grace_replays"] == 1


async def test_close_stops_the_rescue_at_once_and_keeps_the_intent(
    linked: ReferenceServer, journal_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    net = Network(clock, monkeypatch)
    real_sleep = clock.sleep

    async def slow_sleep(seconds: float) -> None:  # the rescue's pauses take real time
        if seconds >= 5:
            await asyncio.sleep(3600)
        await real_sleep(seconds)

    monkeypatch.setattr(clock, "sleep", slow_sleep)
    # The first refresh's own backoff stays under 5 s (fake, instant); the rescue's 30 s gap
    # is the real wait that close() must cut short.
    policy = tj.RetryPolicy(max_delay=2.0)
    tm = tj.TokenManager(linked.url, journal_path, clock=clock, retry=policy)
    await tm.open()
    await tm.sign_in(**DEMO)
    clock.advance(901)
    net.lose_next_answer, net.outage = True, 60
    with pytest.raises(tj.NetworkError):
        await tm.access_token()
    assert tm._rescue is not None and not tm._rescue.done()
    await asyncio.wait_for(tm.close(), 2)  # not CLOSE_WAIT, not an hour: close wakes it
    assert tm._rescue.done()
    async with tj.TokenManager(linked.url, journal_path, clock=clock) as again:
        record = await again.journal.load(again.account)
        assert record.intent is not None and record.intent.kind == "refresh"


async def test_a_commit_that_failed_after_the_rotation_is_rescued_too(
    linked: ReferenceServer, journal_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full at the commit, after the server rotated: the intent stays, and the rescue
    replays it inside the window once the disk has room, with no caller."""
    Network(clock, monkeypatch)
    async with tj.TokenManager(linked.url, journal_path, clock=clock) as tm:
        await tm.sign_in(**DEMO)
        clock.advance(901)
        real = tm.journal.commit_refresh
        failures = iter([tj.JournalError("database or disk is full")])

        async def full_once(*args: Any, **kwargs: Any) -> Any:
            failure = next(failures, None)
            if failure is not None:
                raise failure
            return await real(*args, **kwargs)

        monkeypatch.setattr(tm.journal, "commit_refresh", full_once)
        with pytest.raises(tj.JournalError):
            await tm.access_token()
        assert tm._rescue is not None
        await asyncio.wait_for(tm._rescue, 30)
        assert tm.state is tj.SessionState.VALID
        stats = linked.stats()
        assert stats["rotations"] == 1 and stats["grace_replays"] == 1
