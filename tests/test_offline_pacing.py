"""Offline pacing and refresh spread: what one device does so that ten thousand of them do
not hammer an auth server that is away, or come back from it in one wave
(docs/architecture.md 1.6). The fleet run (``python -m tests.fleet``) measures the sum."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import tokenjournal as tj
from tokenjournal import _manager
from tokenjournal._manager import (
    BACKGROUND_LEAD,
    OFFLINE_FACTOR,
    OFFLINE_FLOOR,
    REFRESH_SPREAD,
    wide_spread,
)
from tokenjournal._transport import NetworkFailure
from tokenjournal.server import ReferenceServer
from tokenjournal.testing import FakeClock

from .conftest import DEMO

TTL = 900.0


class Line:
    """Between manager and server: refused (nothing sent) or cut mid-request (maybe sent)."""

    def __init__(self, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mode = "up"  # up | refused | cut
        self.sent: list[float] = []
        real = _manager.send

        async def send(http: aiohttp.ClientSession, request: Any, limit: float) -> Any:
            self.sent.append(clock.monotonic())
            if self.mode == "refused":
                raise NetworkFailure("ClientConnectorError", unsent=True)
            if self.mode == "cut":
                raise NetworkFailure("ServerDisconnectedError")
            return await real(http, request, limit)

        monkeypatch.setattr(_manager, "send", send)


async def _until(condition: Any, seconds: float = 5.0) -> bool:
    """Real time for background work (the journal's thread): until ``condition()`` holds."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return bool(condition())


async def _signed_in(
    server: ReferenceServer, path: Path, clock: FakeClock, retry: tj.RetryPolicy | None = None
) -> tj.TokenManager:
    tm = tj.TokenManager(server.url, path, clock=clock, retry=retry)
    await tm.open()
    await tm.sign_in(**DEMO)
    return tm


async def test_a_refused_refresh_starts_no_rescue_and_callers_fail_fast(
    server: ReferenceServer, journal_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every try refused before connecting: the token cannot have reached the server, so no
    grace rescue runs; callers until the next try get the error at once, with no request."""
    line = Line(clock, monkeypatch)
    tm = await _signed_in(server, journal_path, clock)
    line.sent.clear()
    try:
        clock.advance(TTL + 1)
        line.mode = "refused"
        with pytest.raises(tj.NetworkError):
            await tm.access_token()
        burst = len(line.sent)
        assert burst == tm.retry.max_attempts  # the first refresh tries its full budget
        for _ in range(20):  # callers inside the pause: no request, the same error at once
            with pytest.raises(tj.NetworkError) as raised:
                await tm.access_token()
            assert "next try" in "".join(raised.value.__notes__)
        assert len(line.sent) == burst
        clock.advance(tm.retry.max_delay)  # past the first pause (at most max_delay)
        for _ in range(40):
            await asyncio.sleep(0)  # let a rescue, if any were started, run
        assert len(line.sent) == burst  # nothing sent without a caller: no rescue
        with pytest.raises(tj.NetworkError):
            await tm.access_token()
        assert len(line.sent) == burst + 1  # one try per refresh inside a run of failures
        line.mode = "up"
        clock.advance(2 * OFFLINE_FACTOR * tm.retry.max_delay)
        assert await tm.access_token()
        assert tm.state is tj.SessionState.VALID
    finally:
        await tm.close()


async def test_a_cut_refresh_is_in_doubt_and_rescued(
    server: ReferenceServer, journal_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A try cut after the connection was made may have reached the server: the grace rescue
    keeps trying without any caller (invariant 11)."""
    line = Line(clock, monkeypatch)
    tm = await _signed_in(server, journal_path, clock)
    line.sent.clear()
    try:
        clock.advance(TTL + 1)
        line.mode = "cut"
        with pytest.raises(tj.NetworkError):
            await tm.refresh()
        before = len(line.sent)
        clock.advance(60)
        assert await _until(lambda: len(line.sent) > before)  # the rescue tried on its own
    finally:
        await tm.close()


@pytest.mark.parametrize(
    "retry", [tj.RetryPolicy(), tj.RetryPolicy.fleet()], ids=["default", "fleet"]
)
async def test_the_pause_grows_with_the_time_offline_up_to_its_cap(
    server: ReferenceServer,
    journal_path: Path,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    retry: tj.RetryPolicy,
) -> None:
    """Full jitter over min(10 x max_delay, max(max_delay, offline_growth x time offline)): a
    device that has been away for long does not come back at the same instant as all the
    others; the fleet's policy reaches its longest pause (15 minutes) at the second."""
    monkeypatch.setattr(_manager.random, "random", lambda: 1.0)  # the top of each jitter
    line = Line(clock, monkeypatch)
    tm = await _signed_in(server, journal_path, clock, retry)
    line.sent.clear()
    try:
        clock.advance(TTL + 1)
        line.mode = "refused"
        pauses = []
        for _ in range(12):
            with pytest.raises(tj.NetworkError):
                await tm.access_token()
            pauses.append(tm._quiet_until - clock.monotonic())
            clock.advance(pauses[-1])
        assert pauses[0] == pytest.approx(tm.retry.max_delay)  # offline for no time yet
        # offline_growth x the time offline (3 x 30 s; 40 x 90 s, capped at 10 x 90 s)
        expected = min(retry.offline_growth * pauses[0], OFFLINE_FACTOR * retry.max_delay)
        assert pauses[1] == pytest.approx(expected)
        assert pauses[1] == pytest.approx(90.0 if retry.offline_growth == 3.0 else 900.0)
        assert all(b >= a - 1e-6 for a, b in itertools.pairwise(pauses))
        assert max(pauses) == pytest.approx(OFFLINE_FACTOR * tm.retry.max_delay)
        # One request per pause: the device's rate while away falls as the outage goes on.
        assert len(line.sent) == tm.retry.max_attempts + 11
    finally:
        await tm.close()


async def test_a_proactive_refresh_that_fails_sends_one_try(
    server: ReferenceServer, journal_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside the margin the token still works: nobody waits on the refresh, so it makes one
    try and waits for a later call, instead of a burst of retries from every device."""
    monkeypatch.setattr(_manager.random, "random", lambda: 0.5)  # a pause of 15 s, not ~0
    line = Line(clock, monkeypatch)
    tm = await _signed_in(server, journal_path, clock)
    line.sent.clear()
    try:
        clock.advance(TTL - 5)  # inside any refresh point, not expired
        line.mode = "refused"
        token = await tm.access_token()
        assert await _until(lambda: tm.state is not tj.SessionState.REFRESHING and line.sent)
        assert len(line.sent) == 1
        assert await tm.access_token() == token  # still served, no new try in the pause
        assert len(line.sent) == 1
    finally:
        await tm.close()


async def _failed_in_background(
    server: ReferenceServer, path: Path, clock: FakeClock, line: Line, left: float
) -> tuple[tj.TokenManager, str]:
    """A manager whose proactive refresh was refused ``left`` seconds before the token lapses
    (past the wide refresh point of a 0.5 draw: 465 s)."""
    tm = await _signed_in(server, path, clock)
    line.sent.clear()
    clock.advance(TTL - left)
    line.mode = "refused"
    token = await tm.access_token()
    assert await _until(lambda: tm.state is not tj.SessionState.REFRESHING and line.sent)
    assert len(line.sent) == 1
    return tm, token


async def test_a_background_try_while_the_token_works_waits_for_its_last_stretch(
    server: ReferenceServer, journal_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proactive refresh that failed while the token still works: nobody waits on it, so the
    next background try comes at a random point of the token's last BACKGROUND_LEAD x
    max_delay, not after the short pause of a device whose token lapsed (a fleet's tries then
    come at the rate its tokens lapse, not all at once when the server returns)."""
    monkeypatch.setattr(_manager.random, "random", lambda: 0.5)
    line = Line(clock, monkeypatch)
    left = 250.0
    tm, token = await _failed_in_background(server, journal_path, clock, line, left)
    try:
        line.mode = "up"
        lead = BACKGROUND_LEAD * tm.retry.max_delay
        at = left - 0.5 * lead  # seconds from the failure: the middle of the last stretch
        idle = lambda: tm._task is None or tm._task.done()  # noqa: E731 - no try in flight
        clock.advance(tm.retry.max_delay)  # past the short pause (half of max_delay)
        assert await tm.access_token() == token
        assert idle()  # no background try started
        clock.advance(at - 2 - tm.retry.max_delay)  # just before the drawn point
        assert await tm.access_token() == token
        assert idle()
        assert len(line.sent) == 1
        clock.advance(4)
        assert await tm.access_token() == token  # served; the try starts behind it
        assert await _until(lambda: tm.tokens is not None and tm.tokens.access_token != token)
        assert len(line.sent) == 2
    finally:
        await tm.close()


async def test_a_rejected_token_gets_the_short_pause_even_while_it_has_time_left(
    server: ReferenceServer, journal_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server rejected the token (401): its remaining life means nothing to the caller, who
    waits the offline pacing's short pause only, not the background try's long one."""
    monkeypatch.setattr(_manager.random, "random", lambda: 0.5)
    line = Line(clock, monkeypatch)
    tm, token = await _failed_in_background(server, journal_path, clock, line, 250.0)
    try:
        floor = OFFLINE_FLOOR * tm.retry.max_delay  # the short pause, drawn at 0.5 above it
        clock.advance(floor + (tm.retry.max_delay - floor) / 2 - 1)  # inside: the error at once
        with pytest.raises(tj.NetworkError):
            await tm.refresh_for(token)
        assert len(line.sent) == 1
        clock.advance(2)  # past it (the background try still waits ~200 s)
        line.mode = "up"
        fresh = await tm.refresh_for(token)
        assert fresh.access_token != token
        assert len(line.sent) == 2
    finally:
        await tm.close()


async def test_a_lapsed_token_gets_the_short_pause(
    server: ReferenceServer, journal_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the token has lapsed, the pause is the offline pacing's alone, whatever is left."""
    monkeypatch.setattr(_manager.random, "random", lambda: 1.0)
    line = Line(clock, monkeypatch)
    tm = await _signed_in(server, journal_path, clock)
    try:
        clock.advance(TTL + 1)
        line.mode = "refused"
        with pytest.raises(tj.NetworkError):
            await tm.access_token()
        now = clock.monotonic()
        assert tm._lazy_until - now == pytest.approx(tm.retry.max_delay)
        assert tm._quiet_until - now == pytest.approx(tm.retry.max_delay)
    finally:
        await tm.close()


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999])
async def test_the_refresh_point_spreads_over_a_share_of_the_life(
    server: ReferenceServer,
    journal_path: Path,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    draw: float,
) -> None:
    """A pair is refreshed at a random point of a share of its life before the margin: the
    wide spread (one whole refresh period) for the pair of a sign-in (a fleet provisioned at
    once), REFRESH_SPREAD for a
    routine refresh, the wide one again for the first pair after a run of failures (a fleet
    back from an outage at once). Devices that moved together drift apart."""
    monkeypatch.setattr(_manager.random, "random", lambda: draw)
    line = Line(clock, monkeypatch)
    tm = await _signed_in(server, journal_path, clock)
    try:
        margin = tm.refresh_margin

        async def refreshed_at(spread: float) -> None:
            """The pair in hand is refreshed at the point ``spread`` puts it, not before."""
            signed = tm.tokens
            assert signed is not None
            before = tm.refresh_requests
            point = TTL - margin - draw * spread * TTL
            clock.advance(point - 2)  # the Date header can round the life by up to a second
            assert await tm.access_token() == signed.access_token
            assert tm.refresh_requests == before
            clock.advance(4)
            await tm.access_token()
            assert await _until(lambda: tm.refresh_requests == before + 1)
            assert await _until(lambda: tm.tokens != signed)

        await refreshed_at(wide_spread(TTL, margin))  # the sign-in's pair
        await refreshed_at(REFRESH_SPREAD)  # a routine refresh's pair
        # A run of failures (the token lapsed, the server away), then the way back.
        signed = tm.tokens
        assert signed is not None
        clock.advance(TTL + 1)
        line.mode = "refused"
        with pytest.raises(tj.NetworkError):
            await tm.access_token()
        line.mode = "up"
        clock.advance(OFFLINE_FACTOR * tm.retry.max_delay)
        assert await tm.access_token() != signed.access_token
        await refreshed_at(wide_spread(TTL, margin))
    finally:
        await tm.close()


class HeldClock(FakeClock):
    """A fake clock whose sleeps wait for the test to move it (FakeClock's sleep moves it):
    the rescue's pauses and the app's calls then share one timeline the test drives."""

    async def sleep(self, seconds: float) -> None:
        deadline = self.monotonic() + max(0.0, seconds)
        await asyncio.sleep(0)
        while self.monotonic() < deadline:
            await asyncio.sleep(0.001)


async def _step(clock: HeldClock) -> None:
    """One simulated second; real time for background work (the rescue, the journal's
    thread) to catch up."""
    clock.advance(1.0)
    for _ in range(5):
        await asyncio.sleep(0.002)


async def _fails(clock: HeldClock, call: Any) -> None:
    """Run ``call`` (the first caller's burst of tries) to its error, moving the clock."""
    task = asyncio.ensure_future(call)
    while not task.done():
        await _step(clock)
    with pytest.raises(tj.NetworkError):
        await task


async def _sent_while_away(
    server: ReferenceServer,
    journal_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    draw: float,
    mode: str,
    first: Callable[[tj.TokenManager], Awaitable[Any]],
    seconds: int,
) -> tuple[list[float], float]:
    """Sign in, let the token lapse with the line ``mode``, fail the first caller's burst of
    tries (``first``, once), then run an app that wants its token every second for
    ``seconds``, errors and all: the requests sent after the burst, and the offline floor."""
    monkeypatch.setattr(_manager.random, "random", lambda: draw)
    clock = HeldClock()
    line = Line(clock, monkeypatch)
    tm = await _signed_in(server, journal_path, clock)
    try:
        clock.advance(TTL + 1)
        line.mode = mode
        await _fails(clock, first(tm))
        line.sent.clear()
        for _ in range(seconds):
            await _step(clock)
            with contextlib.suppress(tj.TokenJournalError):
                await tm.access_token()
        return line.sent, OFFLINE_FLOOR * tm.retry.max_delay
    finally:
        await tm.close()


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.75])  # 0.75: a caller's pause ends mid-gap
async def test_the_rescue_waits_a_whole_gap_after_any_try(
    server: ReferenceServer, journal_path: Path, monkeypatch: pytest.MonkeyPatch, draw: float
) -> None:
    """A refresh cut mid-request is in doubt, and the grace rescue tries every 30 s without a
    caller. A caller's try (paced by the offline pause) replays the same intent, so the
    rescue's next try waits a whole gap from it: one right after it would be a second request
    inside one gap (the fleet run saw devices send 2 in 10 s while the server was down)."""
    sent, floor = await _sent_while_away(
        server, journal_path, monkeypatch, draw=draw, mode="cut", seconds=150,
        first=lambda tm: tm.refresh(),  # in doubt from here: the rescue runs
    )  # fmt: skip
    assert len(sent) >= 4  # the device kept trying
    assert min(b - a for a, b in itertools.pairwise(sent)) >= floor, sent


async def test_a_device_offline_sends_at_most_one_request_per_pause_floor(
    server: ReferenceServer, journal_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full jitter above a floor: even the lowest draw waits OFFLINE_FLOOR x max_delay (10 s by
    default) before the next try, so an app that calls every second while its server is away
    sends at most one request per 10 s (the fleet target), not one per call."""
    sent, floor = await _sent_while_away(
        server, journal_path, monkeypatch, draw=0.0, mode="refused", seconds=100,
        first=lambda tm: tm.access_token(),  # refused before connecting: no rescue
    )  # fmt: skip
    assert 100 // floor - 1 <= len(sent) <= 100 // floor  # one per floor, no more
    assert min(b - a for a, b in itertools.pairwise(sent)) >= floor - 1e-6, sent


@pytest.mark.parametrize("status", [503, 429])
async def test_a_retry_after_longer_than_the_pause_is_honoured(
    server: ReferenceServer, journal_path: Path, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """A background try answered 503 (or 429) with ``Retry-After: 120``: no try, the grace
    rescue's included, comes before it, although the offline pause (10 s to 30 s at first)
    and the rescue's gap (30 s) would both be over after a minute. A one-try refresh used to
    drop the hint."""
    monkeypatch.setattr(_manager.random, "random", lambda: 0.5)
    clock = HeldClock()  # the rescue (an answer came: in doubt) must not move the clock
    tm = await _signed_in(server, journal_path, clock)
    try:
        server.set_faults([{"kind": "status", "status": status, "retry_after": 120, "count": 1}])
        clock.advance(TTL - 30)  # inside the margin: a background try, which is refused
        await tm.access_token()
        # It failed (the token still works: VALID again), and nothing else went out.
        assert await _until(lambda: tm.refresh_requests == 1 and tm.state is tj.SessionState.VALID)
        sent = tm.refresh_requests
        clock.advance(60)  # the token lapsed; the pause alone would be over
        with pytest.raises(tj.TransientError) as raised:
            await tm.access_token()
        assert raised.value.retry_after == 120
        assert tm.refresh_requests == sent  # no request before the server's time
        floor = OFFLINE_FLOOR * tm.retry.max_delay
        clock.advance(60 + 0.5 * floor + 1)  # past Retry-After and its share of the floor
        assert await tm.access_token()
        assert tm.refresh_requests == sent + 1
        assert tm.state is tj.SessionState.VALID
    finally:
        await tm.close()


async def test_a_retry_after_of_a_day_is_believed_up_to_the_longest_pause(
    server: ReferenceServer, journal_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile or misconfigured ``Retry-After: 86400`` must not lock the device out for a
    day: it is honoured up to the offline pacing's longest pause (10 x max_delay)."""
    monkeypatch.setattr(_manager.random, "random", lambda: 0.5)
    clock = HeldClock()
    tm = await _signed_in(server, journal_path, clock)
    try:
        server.set_faults([{"kind": "status", "status": 503, "retry_after": 86400, "count": 1}])
        clock.advance(TTL + 1)
        with pytest.raises(tj.TransientError):
            await tm.access_token()  # the first caller's burst stops on the long hint
        longest = OFFLINE_FACTOR * tm.retry.max_delay
        assert tm._quiet_until - clock.monotonic() <= longest + OFFLINE_FLOOR * tm.retry.max_delay
        clock.advance(longest + OFFLINE_FLOOR * tm.retry.max_delay + 1)
        assert await tm.access_token()
        assert tm.state is tj.SessionState.VALID
    finally:
        await tm.close()
