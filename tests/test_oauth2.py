"""TokenManager + OAuth2Protocol against the reference server's OAuth 2.0 endpoint (and, for the
status codes the reference server never sends, aioresponses with the conftest shim).

Every test names the behaviour or invariant (docs/architecture.md section 2) it proves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aioresponses import aioresponses

import tokenjournal as tj
from tokenjournal.server import ReferenceServer, ServerConfig
from tokenjournal.testing import FakeClock

CLIENT_ID = "tokenjournal-demo"
USER = {"username": "demo@example.com", "password": "demo"}
MOCK_URL = "https://auth.example.test"
MOCK_TOKEN_URL = MOCK_URL + "/oauth/token"


def oauth(server: ReferenceServer, **kw: Any) -> tj.OAuth2Protocol:
    kw.setdefault("client_id", CLIENT_ID)
    kw.setdefault("client_auth", "none")
    return tj.OAuth2Protocol(
        server.url + "/oauth/token",
        device_authorization_url=server.url + "/oauth/device_authorization",
        **kw,
    )


def manager(
    server: ReferenceServer, journal: Path | tj.Journal, clock: FakeClock | None = None, **kw: Any
) -> tj.TokenManager:
    protocol = kw.pop("protocol", None) or oauth(server)
    return tj.TokenManager(server.url, journal, protocol=protocol, clock=clock, **kw)


@asynccontextmanager
async def serving(**config: Any) -> AsyncIterator[ReferenceServer]:
    async with ReferenceServer(ServerConfig(test_mode=True, **config)) as server:
        yield server


async def me(tm: tj.TokenManager, server: ReferenceServer) -> tuple[int, Any]:
    """GET /api/me through the manager's middleware (bearer + the 401 rule)."""
    async with tm.client_session() as http, http.get(server.url + "/api/me") as resp:
        return resp.status, await resp.json()


# ----------------------------------------------------------------------------- sign-in, refresh


async def test_password_sign_in_then_refresh(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    async with manager(server, journal_path, clock) as tm:
        first = await tm.sign_in(**USER)
        assert tm.state is tj.SessionState.VALID
        assert first.refresh_token and first.token_type == "Bearer"
        assert first.expires_at_epoch == pytest.approx(clock.time() + 900)
        clock.advance(901)
        await server.advance(901)
        token = await tm.access_token()  # expired: one refresh, then the new token
        assert token != first.access_token
        assert tm.tokens is not None and tm.tokens.refresh_token != first.refresh_token
        assert tm.refresh_requests == 1
        status, body = await me(tm, server)
        assert (status, body["email"]) == (200, "demo@example.com")
    stats = server.stats()
    assert (stats["signins"], stats["rotations"], stats["grace_replays"]) == (1, 1, 0)
    # The rotated pair is durable: a new manager on the same journal starts with it.
    async with manager(server, journal_path, clock) as again:
        assert again.tokens is not None and again.tokens.access_token == token


async def test_wrong_password_is_sign_in_failed_and_stores_nothing(
    server: ReferenceServer, clock: FakeClock
) -> None:
    async with manager(server, tj.MemoryJournal(), clock) as tm:
        with pytest.raises(tj.SignInFailed) as raised:
            await tm.sign_in(username="demo@example.com", password="nope")
        assert raised.value.code == "invalid_grant"
        assert tm.state is tj.SessionState.SIGNED_OUT and tm.tokens is None


@pytest.mark.parametrize("style", ["same", "new"])
async def test_grace_replay_in_both_styles_is_success(style: str, clock: FakeClock) -> None:
    """The server rotates, then drops the connection: the retry spends the same refresh token
    inside the grace window. django-oauth-toolkit answers with the pair it generated (same),
    Auth0/Okta/Hydra mint a new one (new); both must be taken as success, and the chain goes
    on from whichever pair came back."""
    async with (
        serving(oauth_replay=style) as server,
        manager(server, tj.MemoryJournal(), clock) as tm,
    ):
        first = await tm.sign_in(**USER)
        server.set_faults([{"kind": "drop_after_commit"}])
        replayed = await tm.refresh()
        assert replayed.refresh_token not in (None, first.refresh_token)
        assert tm.refresh_requests == 2
        stats = server.stats()
        assert (stats["rotations"], stats["grace_replays"]) == (1, 1)
        assert (await me(tm, server))[0] == 200
        await tm.refresh()  # the chain continues from the replayed pair
        assert server.stats()["rotations"] == 2
        assert server.stats()["reuse_detections"] == 0
        assert (await me(tm, server))[0] == 200


async def test_overstated_expires_in_on_replay_is_harmless(clock: FakeClock) -> None:
    """Invariant 10. A same-style replay repeats the original expires_in, so the client thinks
    the replayed access token lives longer than it does. The 401 it eventually gets from the
    API refreshes (keyed on that token) and the request is replayed once: the caller sees 200."""
    async with serving(oauth_replay="same") as server:
        policy = tj.RetryPolicy(max_attempts=1)
        async with manager(server, tj.MemoryJournal(), clock, retry=policy) as tm:
            await tm.sign_in(**USER)
            clock.advance(850)
            await server.advance(850)
            server.set_faults([{"kind": "drop_after_commit"}])  # rotated at t=850, answer lost
            with pytest.raises(tj.NetworkError):
                await tm.refresh()
            clock.advance(200)
            await server.advance(200)
            replayed = await tm.refresh()  # t=1050: replay inside the 300 s grace window
            assert server.stats()["grace_replays"] == 1
            # The token was minted at t=850 (real expiry 1750); the client believes 1950.
            assert replayed.expires_at_epoch == pytest.approx(clock.time() + 900)
            clock.advance(750)
            await server.advance(750)  # t=1800: expired for the server, fresh for the client
            assert await tm.access_token() == replayed.access_token  # no proactive refresh
            status, body = await me(tm, server)
            assert status == 200 and body["email"] == "demo@example.com"
            stats = server.stats()
            assert (stats["api_401"], stats["api_200"], stats["rotations"]) == (1, 1, 2)
            assert tm.refresh_requests == 3


async def test_200_concurrent_callers_make_one_refresh_request(
    server: ReferenceServer, clock: FakeClock
) -> None:
    """Invariant 4: per account, one refresh in flight; every caller gets its result."""
    async with manager(server, tj.MemoryJournal(), clock) as tm:
        first = await tm.sign_in(**USER)
        clock.advance(901)
        await server.advance(901)
        tokens = await asyncio.gather(*(tm.access_token() for _ in range(200)))
        assert len(set(tokens)) == 1 and tokens[0] != first.access_token
        assert tm.refresh_requests == 1
        assert server.stats()["refresh_requests"] == 1


async def test_invalid_grant_from_the_reference_server_ends_the_session(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    """invalid_grant as 400 (the reference server's status): the session ends, the journal says
    why, and a restarted manager does not ask the server again."""
    async with manager(server, journal_path, clock) as tm:
        await tm.sign_in(**USER)
        await server.advance(31 * 86400)  # the refresh token's 30-day lifetime is over
        clock.advance(31 * 86400)
        with pytest.raises(tj.SessionEnded) as raised:
            await tm.access_token()
        assert raised.value.code == "invalid_grant"
        assert tm.state is tj.SessionState.ENDED and tm.tokens is None
    requests = server.stats()["refresh_requests"]
    async with manager(server, journal_path, clock) as again:
        assert again.state is tj.SessionState.ENDED and again.ended_code == "invalid_grant"
        with pytest.raises(tj.SessionEnded):
            await again.access_token()
    assert server.stats()["refresh_requests"] == requests


# ----------------------------------------------------------------------------- client auth


@pytest.mark.parametrize("client_auth", ["basic", "body"])
@pytest.mark.parametrize("secret", ["s3cret", "s3:c r+t/%é~"])
async def test_confidential_client_basic_and_body(
    client_auth: str, secret: str, clock: FakeClock
) -> None:
    """RFC 6749 2.3.1: the secret survives form-encoding in Basic, and plain in the body."""
    async with serving(clients=(("app", secret),)) as server:
        protocol = oauth(server, client_id="app", client_secret=secret, client_auth=client_auth)
        async with manager(server, tj.MemoryJournal(), clock, protocol=protocol) as tm:
            await tm.sign_in(**USER)
            await tm.refresh()
            assert server.stats()["rotations"] == 1
            wrong = oauth(server, client_id="app", client_secret="wrong", client_auth=client_auth)
            tm.protocol = wrong
            with pytest.raises(tj.ProtocolError):  # invalid_client on refresh: a bug, tokens kept
                await tm.refresh()
            assert tm.tokens is not None and tm.state is tj.SessionState.VALID
        async with manager(server, tj.MemoryJournal(), clock, protocol=wrong) as other:
            with pytest.raises(tj.SignInFailed) as raised:
                await other.sign_in(**USER)
            assert raised.value.code == "invalid_client"


# ----------------------------------------------------------------------------- mocked statuses


def _stale_pair(clock: FakeClock) -> tj.TokenSet:
    now = datetime.fromtimestamp(clock.time(), UTC)
    return tj.TokenSet("old-access", "old-refresh", now - timedelta(seconds=1), now, "Bearer", "s")


async def _mocked_manager(clock: FakeClock) -> tj.TokenManager:
    protocol = tj.OAuth2Protocol(MOCK_TOKEN_URL, client_id="app", client_auth="none")
    tm = tj.TokenManager(MOCK_URL, tj.MemoryJournal(), protocol=protocol, clock=clock)
    await tm.open()
    await tm.set_tokens(_stale_pair(clock))
    return tm


@pytest.mark.parametrize("status", [400, 401, 403])
async def test_invalid_grant_as_400_401_403_ends_the_session(status: int, clock: FakeClock) -> None:
    tm = await _mocked_manager(clock)
    try:
        with aioresponses() as mock:
            mock.post(MOCK_TOKEN_URL, status=status, payload={"error": "invalid_grant"})
            with pytest.raises(tj.SessionEnded) as raised:
                await tm.access_token()
            assert raised.value.code == "invalid_grant"
            assert tm.state is tj.SessionState.ENDED
            record = await tm.journal.load(tm.account)
            assert (record.tokens, record.ended_code) == (None, "invalid_grant")
            with pytest.raises(tj.SessionEnded):  # ended once: never asks again
                await tm.access_token()
            assert sum(len(calls) for calls in mock.requests.values()) == 1
    finally:
        await tm.close()


@pytest.mark.parametrize(
    ("status", "body"),
    [(503, {"error": "invalid_grant"}), (502, None), (429, {"error": "slow_down"})],
)
async def test_5xx_and_429_never_end_the_session(
    status: int, body: dict[str, str] | None, clock: FakeClock
) -> None:
    """Invariant 5, even when a broken proxy puts invalid_grant in a 503."""
    tm = await _mocked_manager(clock)
    try:
        with aioresponses() as mock:
            mock.post(MOCK_TOKEN_URL, status=status, payload=body, repeat=True)
            with pytest.raises(tj.TransientError):
                await tm.refresh()
            assert tm.tokens is not None and tm.tokens.refresh_token == "old-refresh"
            assert tm.state is tj.SessionState.OFFLINE  # expired and cannot refresh: offline
            record = await tm.journal.load(tm.account)
            assert record.tokens is not None and record.ended_code is None
            assert record.intent is not None and record.intent.kind == "refresh"
    finally:
        await tm.close()


async def test_answer_without_refresh_token_keeps_the_old_one_through_the_journal(
    clock: FakeClock,
) -> None:
    """RFC 6749 6: a missing refresh_token means the old one stays valid. Also: expires_in as a
    string and a lower-case token_type, as some servers send them."""
    tm = await _mocked_manager(clock)
    try:
        with aioresponses() as mock:
            mock.post(
                MOCK_TOKEN_URL,
                payload={"access_token": "new-access", "token_type": "bearer", "expires_in": "600"},
            )
            tokens = await tm.refresh()
        assert (tokens.access_token, tokens.refresh_token) == ("new-access", "old-refresh")
        assert tokens.token_type == "Bearer" and tokens.scope == "s"
        assert tokens.expires_at_epoch == pytest.approx(clock.time() + 600)
        record = await tm.journal.load(tm.account)
        assert record.tokens == tokens and record.intent is None
    finally:
        await tm.close()


# ----------------------------------------------------------------------------- crash recovery

CRASHER = textwrap.dedent(
    """
    import asyncio, sys
    import tokenjournal as tj

    async def main(url: str, path: str) -> None:
        protocol = tj.OAuth2Protocol(url + "/oauth/token", client_id="tokenjournal-demo",
                                     client_auth="none")
        async with tj.TokenManager(url, path, protocol=protocol) as tm:
            print("refreshing", flush=True)
            await tm.refresh()
            print("refreshed", flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.parametrize("style", ["same", "new"])
async def test_crash_after_the_server_rotated_recovers_through_the_grace_window(
    style: str, journal_path: Path, tmp_path: Path
) -> None:
    """Invariants 1 and 6. A process sends the refresh; the server rotates and holds the answer;
    the process is SIGKILLed. A new TokenManager on the same journal finds the intent, replays
    the old refresh token inside the grace window and is signed in again: no new sign-in."""
    async with serving(oauth_replay=style) as server:
        async with manager(server, journal_path) as tm:
            before = await tm.sign_in(**USER)
        # The server holds the token's lock (and the answer) this long: long enough to kill
        # the client inside it, short because the recovery's replay queues behind it.
        server.set_faults([{"kind": "delay_after", "seconds": 2}])
        script = tmp_path / "crasher.py"
        script.write_text(CRASHER)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            server.url,
            str(journal_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            async with asyncio.timeout(60):  # a bound on a hang, not a timing assertion
                while server.stats()["rotations"] < 1:
                    if proc.returncode is not None:
                        raise AssertionError((await proc.communicate())[1].decode())
                    await asyncio.sleep(0.02)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
            out, _ = await proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        assert b"refreshed" not in out  # it died with the rotation unseen

        journal = tj.SQLiteJournal(journal_path)
        await journal.open()
        left = await journal.load("default")
        await journal.close()
        assert left.intent is not None and left.intent.kind == "refresh"
        assert left.tokens == before  # the journal still holds the spent token, as it must

        async with manager(server, journal_path) as tm:
            # No await between open() and here: this joins the recovery open() started.
            recovered = await tm.refresh()
            assert recovered.refresh_token != before.refresh_token
            assert (await me(tm, server))[0] == 200
            assert tm.refresh_requests == 1
        stats = server.stats()
        assert (stats["signins"], stats["rotations"], stats["grace_replays"]) == (1, 1, 1)
        assert stats["reuse_detections"] == 0
        async with manager(server, journal_path) as tm:
            assert (await tm.journal.load(tm.account)).intent is None
            await tm.refresh()  # and the chain goes on
        assert server.stats()["rotations"] == 2
