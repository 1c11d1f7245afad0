"""RFC 8628 device sign-in, end to end against the reference server, with a journaled code.

The SDK's clock is a FakeClock; where the server must see the same time pass, the clock also
advances the server's clock when the SDK sleeps, so no test waits for a polling interval.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from yarl import URL

import tokenjournal as tj
from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.testing import FakeClock

CLIENT_ID = "tokenjournal-demo"


class ServerClock(FakeClock):
    """A FakeClock whose sleeps also move the server's clock, and that can run a hook."""

    def __init__(self, server: ReferenceServer | None) -> None:
        super().__init__()
        self.server = server
        self.before_sleep: Callable[[int], Awaitable[None]] | None = None

    async def sleep(self, seconds: float) -> None:
        if self.before_sleep is not None:
            await self.before_sleep(len(self.sleeps))
        if self.server is not None:
            await self.server.advance(max(0.0, seconds))
        await super().sleep(seconds)


@asynccontextmanager
async def serving(**config: Any) -> AsyncIterator[ReferenceServer]:
    async with ReferenceServer(ServerConfig(test_mode=True, **config)) as server:
        yield server


def protocol(url: str, **kw: Any) -> tj.OAuth2Protocol:
    return tj.OAuth2Protocol(
        url + "/oauth/token",
        client_id=CLIENT_ID,
        client_auth="none",
        device_authorization_url=url + "/oauth/device_authorization",
        **kw,
    )


def manager(
    server: ReferenceServer, journal: Path | tj.Journal, clock: FakeClock
) -> tj.TokenManager:
    return tj.TokenManager(server.url, journal, protocol=protocol(server.url), clock=clock)


class Shown:
    """An on_code callback that records what the person was shown, and can act on it."""

    def __init__(self, act: Callable[[tj.DeviceCode], Awaitable[None] | None] | None = None):
        self.codes: list[tj.DeviceCode] = []
        self.event = asyncio.Event()
        self._act = act

    async def __call__(self, code: tj.DeviceCode) -> None:
        self.codes.append(code)
        self.event.set()
        if self._act is not None:
            result = self._act(code)
            if result is not None:
                await result


async def intent_kind(tm: tj.TokenManager) -> str | None:
    record = await tm.journal.load(tm.account)
    return record.intent.kind if record.intent else None


# ----------------------------------------------------------------------------- outcomes


async def test_approve_signs_in(journal_path: Path) -> None:
    async with serving() as server:
        clock = ServerClock(server)
        shown = Shown(lambda code: server.device_action(code.user_code, "approve"))
        async with manager(server, journal_path, clock) as tm:
            tokens = await tm.sign_in_device(shown)
            assert tm.state is tj.SessionState.VALID and tm.tokens == tokens
            assert await intent_kind(tm) is None  # the stored pair replaced the pending code
            async with tm.client_session() as http, http.get(server.url + "/api/me") as resp:
                assert (resp.status, (await resp.json())["email"]) == (200, "demo@example.com")
        (code,) = shown.codes
        assert code.verification_uri == server.url + "/device"
        assert code.verification_uri_complete == f"{server.url}/device?user_code={code.user_code}"
        assert code.interval == 5.0
        assert clock.sleeps == [5.0]  # polled once, at the server's interval
        assert server.stats()["device_authorizations"] == 1


async def test_an_async_or_a_plain_callback_both_work(journal_path: Path) -> None:
    async with serving() as server:
        clock = ServerClock(server)
        seen: list[str] = []

        def plain(code: tj.DeviceCode) -> None:
            seen.append(code.user_code)
            server.device_action(code.user_code, "approve")

        async with manager(server, journal_path, clock) as tm:
            await tm.sign_in_device(plain)
        assert len(seen) == 1


async def test_deny_is_sign_in_failed_access_denied(journal_path: Path) -> None:
    async with serving() as server:
        clock = ServerClock(server)
        shown = Shown(lambda code: server.device_action(code.user_code, "deny"))
        async with manager(server, journal_path, clock) as tm:
            with pytest.raises(tj.SignInFailed) as raised:
                await tm.sign_in_device(shown)
            assert raised.value.code == "access_denied"
            assert tm.state is tj.SessionState.SIGNED_OUT and tm.tokens is None
            assert await intent_kind(tm) is None  # a dead code is not resumed next time


async def test_slow_down_grows_the_interval_by_5_seconds(journal_path: Path) -> None:
    """The server's clock does not move here, so every poll after the first is too soon: the
    second poll gets slow_down and the third waits 10 s, not 5 (RFC 8628 3.5). The slower
    interval is journaled, so a restart keeps the pace the server asked for."""
    async with serving() as server:
        clock = ServerClock(None)
        journaled: list[float] = []

        async def hook(sleeps_so_far: int) -> None:
            if sleeps_so_far == 2:  # after pending, then slow_down
                record = await tm.journal.load(tm.account)
                assert record.intent is not None
                journaled.append(json.loads(record.intent.payload or "")["code"]["interval"])
                server.device_action(shown.codes[0].user_code, "approve")

        clock.before_sleep = hook
        shown = Shown()
        async with manager(server, journal_path, clock) as tm:
            await tm.sign_in_device(shown)
            assert tm.state is tj.SessionState.VALID
        assert clock.sleeps == [5.0, 5.0, 10.0]
        assert journaled == [10.0]


async def test_expiry_on_the_device_clock_is_expired_token(journal_path: Path) -> None:
    async with serving(device_expires_in=30) as server:
        clock = ServerClock(server)
        shown = Shown()  # nobody approves
        async with manager(server, journal_path, clock) as tm:
            with pytest.raises(tj.SignInFailed) as raised:
                await tm.sign_in_device(shown)
            assert raised.value.code == "expired_token"
            assert await intent_kind(tm) is None
        assert sum(clock.sleeps) == 30.0  # polled until the code's expires_in, no longer


async def test_expiry_said_by_the_server_is_expired_token_and_the_next_try_gets_a_new_code(
    journal_path: Path,
) -> None:
    """The server's clock is ahead: its expired_token wins over the device's view."""
    async with serving(device_expires_in=600) as server:
        clock = ServerClock(server)

        async def late(code: tj.DeviceCode) -> None:
            if len(shown.codes) == 1:
                await server.advance(601)
            else:
                server.device_action(code.user_code, "approve")

        shown = Shown(late)
        async with manager(server, journal_path, clock) as tm:
            with pytest.raises(tj.SignInFailed) as raised:
                await tm.sign_in_device(shown)
            assert raised.value.code == "expired_token"
            assert sum(clock.sleeps) == 5.0  # one poll, refused
            await tm.sign_in_device(shown)  # a fresh code, not the dead one
            assert tm.state is tj.SessionState.VALID
        first, second = shown.codes
        assert first.user_code != second.user_code
        assert server.stats()["device_authorizations"] == 2


# ----------------------------------------------------------------------------- restart


async def test_restart_mid_poll_resumes_the_same_code(journal_path: Path) -> None:
    """Close the manager while it polls; a new manager on the same journal shows the SAME
    user code again (on_code is called again), polls the SAME device code, and once the person
    approves it is signed in. The server issued exactly one device authorization."""
    async with serving() as server:
        clock = ServerClock(server)
        polling, resume = asyncio.Event(), asyncio.Event()

        async def park(sleeps_so_far: int) -> None:
            if sleeps_so_far == 2:  # two polls answered authorization_pending
                polling.set()
                await resume.wait()  # the manager is closed while the flow waits here

        clock.before_sleep = park
        first = Shown()
        tm = manager(server, journal_path, clock)
        await tm.open()
        task = asyncio.create_task(tm.sign_in_device(first))
        async with asyncio.timeout(30):  # bounds a hang; no timing is asserted
            await polling.wait()
        await tm.close()
        resume.set()
        with pytest.raises(RuntimeError, match="closed during the device sign-in"):
            await task
        assert server.stats()["device_authorizations"] == 1
        assert tm.state is tj.SessionState.SIGNED_OUT

        second = Shown(lambda code: server.device_action(code.user_code, "approve"))
        async with manager(server, journal_path, ServerClock(server)) as again:
            assert await intent_kind(again) == "device_code"
            tokens = await again.sign_in_device(second)
            assert again.state is tj.SessionState.VALID and again.tokens == tokens
            assert await intent_kind(again) is None
        (before,) = first.codes
        (after,) = second.codes
        assert after.user_code == before.user_code
        assert after.device_code == before.device_code
        assert after.expires_at == before.expires_at
        assert server.stats()["device_authorizations"] == 1


async def test_an_expired_journaled_code_is_not_resumed(journal_path: Path) -> None:
    async with serving(device_expires_in=30) as server:
        clock = ServerClock(server)
        first = Shown()
        async with manager(server, journal_path, clock) as tm:
            task = asyncio.create_task(tm.sign_in_device(first))
            await first.event.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await intent_kind(tm) == "device_code"
        clock.advance(31)
        await server.advance(31)
        second = Shown(lambda code: server.device_action(code.user_code, "approve"))
        async with manager(server, journal_path, clock) as tm:
            await tm.sign_in_device(second)
        assert first.codes[0].user_code != second.codes[0].user_code
        assert server.stats()["device_authorizations"] == 2


async def test_a_code_journaled_for_another_client_is_not_resumed(journal_path: Path) -> None:
    async with serving(clients=((CLIENT_ID, None), ("kiosk", None))) as server:
        clock = ServerClock(server)
        first = Shown()
        async with manager(server, journal_path, clock) as tm:
            task = asyncio.create_task(tm.sign_in_device(first))
            await first.event.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        other = tj.OAuth2Protocol(
            server.url + "/oauth/token",
            client_id="kiosk",
            device_authorization_url=server.url + "/oauth/device_authorization",
        )
        second = Shown(lambda code: server.device_action(code.user_code, "approve"))
        async with tj.TokenManager(server.url, journal_path, protocol=other, clock=clock) as tm:
            await tm.sign_in_device(second)
        assert first.codes[0].user_code != second.codes[0].user_code


# ----------------------------------------------------------------------------- transient failures

MOCK = "https://auth.example.test"
AUTHORIZATION = {
    "device_code": "dc-1",
    "user_code": "BCDF-GHJK",
    "verification_uri": MOCK + "/device",
    "expires_in": 600,
    "interval": 5,
}
TOKENS = {"access_token": "a1", "token_type": "Bearer", "expires_in": 900, "refresh_token": "r1"}


async def test_transient_poll_failures_back_off_and_keep_polling_the_same_code() -> None:
    """Network errors, 5xx and 429 neither end the sign-in nor change the code; the wait grows
    (RFC 8628 3.5 asks for backoff) and a Retry-After is honoured."""
    clock = ServerClock(None)
    tm = tj.TokenManager(MOCK, tj.MemoryJournal(), protocol=protocol(MOCK), clock=clock)
    async with tm:
        with aioresponses() as mock:
            mock.post(MOCK + "/oauth/device_authorization", payload=AUTHORIZATION)
            token_url = MOCK + "/oauth/token"
            mock.post(token_url, status=400, payload={"error": "authorization_pending"})
            mock.post(token_url, exception=aiohttp.ClientConnectionError("down"))
            mock.post(token_url, status=503, payload={"error": "temporarily_unavailable"})
            mock.post(token_url, status=429, headers={"Retry-After": "42"})
            mock.post(token_url, status=400, payload={"error": "authorization_pending"})
            mock.post(token_url, payload=TOKENS)
            tokens = await tm.sign_in_device(Shown())
            polls = mock.requests[("POST", URL(token_url))]
        assert tokens.access_token == "a1" and tm.state is tj.SessionState.VALID
        assert clock.sleeps == [5.0, 5.0, 10.0, 20.0, 42.0, 5.0]
        assert {call.kwargs["data"] for call in polls} == {
            b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code"
            b"&device_code=dc-1&client_id=tokenjournal-demo"
        }


async def test_device_authorization_is_retried_then_raises_a_transient_error() -> None:
    clock = ServerClock(None)
    policy = tj.RetryPolicy(max_attempts=3)
    tm = tj.TokenManager(
        MOCK, tj.MemoryJournal(), protocol=protocol(MOCK), clock=clock, retry=policy
    )
    async with tm:
        with aioresponses() as mock:
            url = MOCK + "/oauth/device_authorization"
            mock.post(url, status=503, repeat=True)
            with pytest.raises(tj.ServerError):
                await tm.sign_in_device(Shown())
            assert sum(len(calls) for calls in mock.requests.values()) == 3
        with aioresponses() as mock:
            mock.post(
                MOCK + "/oauth/device_authorization",
                status=401,
                payload={"error": "invalid_client"},
            )
            with pytest.raises(tj.SignInFailed) as raised:
                await tm.sign_in_device(Shown())
            assert raised.value.code == "invalid_client"
        assert await intent_kind(tm) is None


@pytest.mark.parametrize(
    "answer",
    [
        {"status": 429, "headers": {"Retry-After": "86400"}},
        {"status": 503, "headers": {"Retry-After": "86400"}},
        {"status": 400, "payload": {"error": "slow_down", "interval": 86400}},
    ],
)
async def test_a_day_long_wait_is_bounded_by_the_codes_expiry(answer: dict[str, Any]) -> None:
    """A server asking for a day is not slept on past the code's expiry (600 s)."""
    clock = ServerClock(None)
    tm = tj.TokenManager(MOCK, tj.MemoryJournal(), protocol=protocol(MOCK), clock=clock)
    async with tm:
        with aioresponses() as mock:
            mock.post(MOCK + "/oauth/device_authorization", payload=AUTHORIZATION)
            mock.post(MOCK + "/oauth/token", **answer)
            mock.post(MOCK + "/oauth/token", payload=TOKENS, repeat=True)
            started = clock.time()
            with pytest.raises(tj.SignInFailed) as raised:
                await tm.sign_in_device(Shown())
        assert raised.value.code == "expired_token"
        assert clock.time() - started <= 600 + 1e-6
        assert max(clock.sleeps) <= 600


async def test_close_ends_a_device_flow_waiting_on_a_long_interval() -> None:
    """close() wakes the poll's wait and the flow ends with a clear error, code kept."""
    clock = FakeClock()
    real_sleep = clock.sleep

    async def sleep(seconds: float) -> None:  # the interval takes real time here
        await asyncio.sleep(3600 if seconds >= 5 else 0)
        await real_sleep(seconds)

    clock.sleep = sleep  # type: ignore[method-assign]
    tm = tj.TokenManager(MOCK, tj.MemoryJournal(), protocol=protocol(MOCK), clock=clock)
    await tm.open()
    shown = Shown()
    with aioresponses() as mock:
        mock.post(MOCK + "/oauth/device_authorization", payload=AUTHORIZATION)
        flow = asyncio.ensure_future(tm.sign_in_device(shown))
        await asyncio.wait_for(shown.event.wait(), 5)
        await asyncio.wait_for(tm.close(), 2)
        with pytest.raises(RuntimeError, match="closed during the device sign-in"):
            await asyncio.wait_for(flow, 2)


async def test_the_verification_page_signs_the_device_in(journal_path: Path) -> None:
    """The verification_uri the reference server hands out opens a page (it was a 404):
    a person enters the code with the account's password and the device is signed in."""
    async with serving(device_interval=1) as server:
        clock = ServerClock(server)
        tm = manager(server, journal_path, clock)

        async def person(code: tj.DeviceCode) -> None:
            async with aiohttp.ClientSession() as browser:
                assert code.verification_uri_complete is not None
                async with browser.get(code.verification_uri_complete) as page:
                    text = await page.text()
                    assert page.status == 200 and code.user_code in text
                wrong = {"user_code": code.user_code, "email": "demo@example.com"}
                async with browser.post(
                    code.verification_uri, data={**wrong, "password": "no", "action": "approve"}
                ) as refused:
                    assert refused.status == 401
                async with browser.post(
                    code.verification_uri, data={**wrong, "password": "demo", "action": "approve"}
                ) as done:
                    assert done.status == 200 and "signed in" in await done.text()

        async with tm:
            tokens = await tm.sign_in_device(Shown(person))
            assert tokens.access_token and tm.state is tj.SessionState.VALID


async def test_the_verification_page_escapes_what_it_echoes() -> None:
    async with serving() as server, aiohttp.ClientSession() as browser:
        async with browser.get(server.url + "/device", params={"user_code": '"><script>'}) as page:
            text = await page.text()
        assert "<script>" not in text and "&lt;script&gt;" in text


async def test_a_refusal_of_a_poll_never_prints_control_characters_or_the_device_code() -> None:
    """Regression: the device flow parses its polls itself, past the manager's scrub, so a
    server's error code reached ``SignInFailed.code`` and its message raw: an escape sequence
    for the terminal that prints it, or the device code echoed back (invariant 8)."""
    clock = ServerClock(None)
    tm = tj.TokenManager(MOCK, tj.MemoryJournal(), protocol=protocol(MOCK), clock=clock)
    secret = "device-code-secret-1234"
    hostile = f"\x1b]0;pwned\x07 {secret} " + "x" * 500
    async with tm:
        with aioresponses() as mock:
            authorization = {**AUTHORIZATION, "device_code": secret}
            mock.post(MOCK + "/oauth/device_authorization", payload=authorization)
            mock.post(
                MOCK + "/oauth/token",
                status=400,
                payload={"error": hostile, "error_description": f"bad {hostile}"},
            )
            with pytest.raises(tj.SignInFailed) as raised:
                await tm.sign_in_device(Shown())
    error = raised.value
    for text in (error.code, str(error), error.description or ""):
        assert "\x1b" not in text and "\x07" not in text
        assert secret not in text
    assert len(error.code) <= 64


async def test_a_wall_clock_step_does_not_expire_a_code_being_approved() -> None:
    """A box without a real-time clock steps its wall clock at its first NTP sync, which is
    when it runs its device sign-in: the code's life was measured on the wall clock, so a
    year's step ended an approved sign-in with expired_token."""
    clock = ServerClock(None)

    async def ntp(sleeps_so_far: int) -> None:
        if sleeps_so_far == 1:
            clock.jump(365 * 86400)

    clock.before_sleep = ntp
    tm = tj.TokenManager(MOCK, tj.MemoryJournal(), protocol=protocol(MOCK), clock=clock)
    async with tm:
        with aioresponses() as mock:
            mock.post(MOCK + "/oauth/device_authorization", payload=AUTHORIZATION)
            mock.post(MOCK + "/oauth/token", status=400, payload={"error": "authorization_pending"})
            mock.post(MOCK + "/oauth/token", payload=TOKENS)
            tokens = await tm.sign_in_device(Shown())
        assert tokens.access_token == "a1" and tm.state is tj.SessionState.VALID
        assert clock.sleeps == [5.0, 5.0]


class HeldStore(tj.MemoryJournal):
    """A journal whose store of a sign-in waits until told, so a cancel can land in it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.go = asyncio.Event(), asyncio.Event()

    async def store_tokens(self, *args: Any, **kwargs: Any) -> int:
        self.entered.set()
        await self.go.wait()
        return await super().store_tokens(*args, **kwargs)


async def test_a_sign_in_cancelled_while_its_pair_is_stored_keeps_the_pair() -> None:
    """The server issued the pair and the device code is single use: a cancel (an app's
    timeout, a Cancel button) that landed in the store used to drop the pair and leave the
    spent code journaled, so the next sign-in polled it, got invalid_grant, and the person
    had to approve again. The store now runs to its end as the manager's own work."""
    journal = HeldStore()
    tm = tj.TokenManager(MOCK, journal, protocol=protocol(MOCK), clock=ServerClock(None))
    signed_in = asyncio.Event()
    async with tm:
        tm.subscribe(lambda event: event.kind is tj.EventKind.SIGNED_IN and signed_in.set())
        with aioresponses() as mock:
            mock.post(MOCK + "/oauth/device_authorization", payload=AUTHORIZATION)
            mock.post(MOCK + "/oauth/token", payload=TOKENS)
            flow = asyncio.ensure_future(tm.sign_in_device(Shown()))
            await asyncio.wait_for(journal.entered.wait(), 5)
            flow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await flow
            journal.go.set()
            await asyncio.wait_for(signed_in.wait(), 5)
        assert tm.tokens is not None and tm.tokens.access_token == "a1"
        assert tm.state is tj.SessionState.VALID
        record = await journal.load(tm.account)
        assert record.tokens == tm.tokens and record.intent is None  # the code is gone
