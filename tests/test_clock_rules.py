"""The process measures its own time (invariant 12): wall-clock steps, devices whose clock
is a day off, and tokens that look expired on arrival never serve an expired token, storm
the server with rotations or end a session."""

from __future__ import annotations

import dataclasses
import json
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import jwt
import pytest
from aioresponses import CallbackResult, aioresponses

import tokenjournal as tj
from tokenjournal._manager import FRESH_FLOOR
from tokenjournal._protocols import jwt_lifetime
from tokenjournal._tokens import to_datetime
from tokenjournal.server import ReferenceServer
from tokenjournal.testing import FakeClock

from .conftest import DEMO

AUTH = "http://127.0.0.1:9"  # aioresponses answers; nothing listens there


async def test_wall_clock_stepped_back_never_serves_an_expired_token(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    async with tj.TokenManager(server.url, journal_path, clock=clock) as tm:
        first = (await tm.sign_in(**DEMO)).access_token
        clock.advance(901)  # the token's 900 s are over, on the monotonic clock too
        await server.advance(901)
        clock.jump(-3600)  # NTP (or a user) sets the wall clock back an hour
        token = await tm.access_token()
        assert token != first
        assert server.stats()["rotations"] == 1


async def test_wall_clock_stepped_forward_a_day_ends_and_storms_nothing(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    async with tj.TokenManager(server.url, journal_path, clock=clock) as tm:
        first = (await tm.sign_in(**DEMO)).access_token
        clock.jump(86400)
        for _ in range(20):
            assert await tm.access_token() == first
        assert server.stats()["rotations"] == 0
        assert tm.state is tj.SessionState.VALID
        clock.jump(-2 * 86400)  # and back, past where it started
        clock.advance(800)  # inside the 60 s margin of the token's real 900 s
        await server.advance(800)
        await tm.access_token()
        await tm.refresh()  # joins the background refresh the margin started, if any
        for _ in range(20):
            await tm.access_token()
        assert server.stats()["rotations"] <= 2


def _jwt(exp: float, iat: float | None = None) -> str:
    claims = {"sub": "u", "exp": int(exp)}
    if iat is not None:
        claims["iat"] = int(iat)
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


class SkewedServer:
    """A Mana server whose JWTs carry ``exp`` and no ``iat`` (legal), on the real clock."""

    def __init__(self, date_header: bool) -> None:
        self.date_header = date_header
        self.rotations = 0

    def answer(self, url: object, **_: object) -> CallbackResult:
        self.rotations += 1
        now = time.time()
        body = {"appToken": _jwt(now + 900), "refreshToken": f"r{self.rotations}"}
        headers = {"Date": formatdate(now, usegmt=True)} if self.date_header else {}
        return CallbackResult(status=200, body=json.dumps(body), headers=headers)


@pytest.mark.parametrize("date_header", [True, False])
@pytest.mark.parametrize("skew", [86400.0, 3600.0, -86400.0])
async def test_a_device_clock_off_by_a_day_causes_no_refresh_storm(
    date_header: bool, skew: float
) -> None:
    """exp without iat on a device whose clock is off: today every call rotated."""
    clock = FakeClock(time.time() + skew)
    server = SkewedServer(date_header)
    with aioresponses() as mock:
        mock.post(f"{AUTH}/auth/signin", callback=server.answer, repeat=True)
        mock.post(f"{AUTH}/auth/refresh", callback=server.answer, repeat=True)
        async with tj.TokenManager(AUTH, tj.MemoryJournal(), clock=clock) as tm:
            await tm.sign_in(**DEMO)
            for _ in range(20):
                await tm.access_token()
            assert server.rotations == 1  # the sign-in; no refresh at all
            if date_header:  # the server's own clock gives the real lifetime
                assert tm.tokens is not None and tm.tokens.lifetime == pytest.approx(900, abs=2)


class AbsoluteExpiry(tj.ManaProtocol):
    """A third-party protocol that reads ``exp`` against the device clock (as ours once
    did): on a device a day ahead, every pair it returns looks expired on arrival."""

    def parse_tokens(self, *args: Any, **kwargs: Any) -> tj.TokenSet | tj.Failure:
        answer = super().parse_tokens(*args, **kwargs)
        if isinstance(answer, tj.TokenSet):
            exp, _ = jwt_lifetime(answer.access_token)
            assert exp is not None
            answer = dataclasses.replace(answer, expires_at=to_datetime(exp))
        return answer


async def test_a_pair_just_received_is_not_refreshed_again_within_the_floor() -> None:
    """The brake: whatever the protocol says, a pair just received is not refreshed for
    staleness within FRESH_FLOOR seconds; only a 401 (refresh_for) can force it."""
    clock = FakeClock(time.time() + 86400)
    server = SkewedServer(date_header=True)
    with aioresponses() as mock:
        mock.post(f"{AUTH}/auth/signin", callback=server.answer, repeat=True)
        mock.post(f"{AUTH}/auth/refresh", callback=server.answer, repeat=True)
        async with tj.TokenManager(
            AUTH, tj.MemoryJournal(), protocol=AbsoluteExpiry(AUTH), clock=clock
        ) as tm:
            await tm.sign_in(**DEMO)
            for _ in range(50):
                await tm.access_token()
                clock.advance(0.1)
            assert server.rotations == 1  # 5 s of calls: the sign-in only
            for _ in range(60):  # 60 s more: one refresh per floor at the most
                await tm.access_token()
                clock.advance(1)
            assert 2 <= server.rotations <= 1 + 60 / FRESH_FLOOR + 1
            assert tm.tokens is not None
            await tm.refresh_for(tm.tokens.access_token)  # a 401 is obeyed at once
            assert server.rotations >= 3


def test_lifetime_is_read_on_the_servers_clock() -> None:
    """exp against the answer's Date first (right for a grace replay minted a while ago),
    then exp - iat, then the device clock; dead by the server's clock means expires now,
    dead by the device clock alone means unknown (used until the 401)."""
    mana = tj.ManaProtocol(AUTH)
    now = 1_800_000_000.0

    def parse(token: str, date: float | None, device_now: float = now) -> tj.TokenSet:
        headers = {"Date": formatdate(date, usegmt=True)} if date is not None else {}
        body = json.dumps({"appToken": token, "refreshToken": "r"}).encode()
        answer = mana.parse_tokens(200, headers, body, device_now, None)
        assert isinstance(answer, tj.TokenSet)
        return answer

    replayed = _jwt(now + 60, iat=now)  # minted a minute... and replayed 70 s later
    assert parse(replayed, date=now + 70).lifetime == 0.0  # dead: refresh after the floor
    assert parse(replayed, date=now + 20).lifetime == pytest.approx(40)
    assert parse(replayed, date=None).lifetime == pytest.approx(60)  # no Date: exp - iat
    no_iat = _jwt(now + 900)
    assert parse(no_iat, date=None, device_now=now + 86400).expires_at is None  # unknown
    assert parse(no_iat, date=now, device_now=now + 86400).lifetime == pytest.approx(900)
    assert parse(no_iat, date=None, device_now=now - 3600).lifetime == pytest.approx(4500)
