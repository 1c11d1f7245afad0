"""TokenManager against the reference server on loopback: the refresh rules of
docs/architecture.md (the data path in section 1, the invariants in section 2)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest
from aioresponses import aioresponses

import tokenjournal as tj
from tokenjournal.server import ReferenceServer
from tokenjournal.testing import FakeClock

from .conftest import DEMO

FAST = tj.RetryPolicy(max_attempts=6, max_elapsed=600.0, base_delay=0.5, max_delay=5.0)


def manager(
    server: ReferenceServer, journal: Path | tj.Journal, clock: FakeClock, **kw: object
) -> tj.TokenManager:
    kw.setdefault("retry", FAST)
    return tj.TokenManager(server.url, journal, clock=clock, **kw)  # type: ignore[arg-type]


async def test_fresh_token_comes_from_memory_with_no_io(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    async with manager(server, journal_path, clock) as tm:
        await tm.sign_in(**DEMO)
        commits = tm.journal.durable_commits
        tokens = [await tm.access_token() for _ in range(100)]
        assert len(set(tokens)) == 1
        assert tm.journal.durable_commits == commits
        assert server.stats()["refresh_requests"] == 0


async def test_a_closed_manager_gives_no_token_even_a_fresh_one(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    """It used to answer from memory after close(): an httpx client built on it kept sending
    a token nothing would refresh, and only its first 401 said the manager was closed. The
    blocking twin and fresh_token() already refused."""
    tm = manager(server, journal_path, clock)
    async with tm:
        await tm.sign_in(**DEMO)
        assert await tm.access_token() == tm.fresh_token()
    assert tm.fresh_token() is None
    with pytest.raises(RuntimeError, match="not open"):
        await tm.access_token()
    with pytest.raises(RuntimeError, match="not open"):  # inside the margin too
        clock.advance(850)
        await tm.access_token()


async def test_1000_concurrent_callers_on_a_stale_token_make_one_refresh(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    """Invariant 4: one refresh at a time; every caller gets the new token."""
    async with manager(server, journal_path, clock) as tm:
        old = (await tm.sign_in(**DEMO)).access_token
        clock.advance(901)
        tokens = await asyncio.gather(*(tm.access_token() for _ in range(1000)))
        assert len(set(tokens)) == 1 and tokens[0] != old
        stats = server.stats()
        assert (stats["refresh_requests"], stats["rotations"], stats["grace_replays"]) == (1, 1, 0)


async def test_a_refresh_costs_at_most_two_durable_commits(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    async with manager(server, journal_path, clock) as tm:
        await tm.sign_in(**DEMO)
        before = tm.journal.durable_commits
        await tm.refresh()
        assert tm.journal.durable_commits - before == 2


class _CountingJournal(tj.MemoryJournal):
    """Records the manager's journal calls in order (not the journal's own inner ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._depth = 0

    def __getattribute__(self, name: str) -> object:
        attr = super().__getattribute__(name)
        if name not in {"load", "begin_refresh", "renew_lease", "commit_refresh", "release"}:
            return attr

        async def counted(*args: object, **kwargs: object) -> object:
            if self._depth == 0:
                self.calls.append(name)
            self._depth += 1
            try:
                return await attr(*args, **kwargs)  # type: ignore[operator]
            finally:
                self._depth -= 1

        return counted


async def test_a_refresh_makes_one_journal_round_trip_before_its_request(
    server: ReferenceServer, clock: FakeClock
) -> None:
    """The lease proof comes back from ``begin_refresh``: no read before it (memory is
    trusted while its generation is the journal's), no re-read after it, no renewal before a
    first send that the fresh lease covers; one commit after."""
    journal = _CountingJournal()
    async with manager(server, journal, clock) as tm:
        await tm.sign_in(**DEMO)
        journal.calls.clear()
        await tm.refresh()
        assert journal.calls == ["begin_refresh", "commit_refresh"]
        assert server.stats()["refresh_requests"] == 1


async def test_a_send_after_a_long_pause_proves_the_lease_first(
    server: ReferenceServer, clock: FakeClock
) -> None:
    """A retry whose backoff outlasted what the lease covers renews it before sending: a
    lease lost meanwhile would mean another process may have spent the token."""
    journal = _CountingJournal()
    async with manager(server, journal, clock, lease_ttl=3.0) as tm:
        await tm.sign_in(**DEMO)
        journal.calls.clear()
        await tm.refresh()
        # A 3 s lease cannot cover a 10 s try: every send proves the lease first.
        assert journal.calls == ["begin_refresh", "renew_lease", "commit_refresh"]


async def test_a_cancelled_caller_does_not_cancel_the_shared_refresh(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    """Invariant 7."""
    async with manager(server, journal_path, clock) as tm:
        old = (await tm.sign_in(**DEMO)).access_token
        server.set_faults([{"kind": "delay_before", "seconds": 0.2}])
        clock.advance(901)
        victim = asyncio.ensure_future(tm.access_token())
        others = [asyncio.ensure_future(tm.access_token()) for _ in range(5)]
        await asyncio.sleep(0.05)
        victim.cancel()
        results = await asyncio.gather(*others)
        assert victim.cancelled()
        assert len(set(results)) == 1 and results[0] != old
        assert server.stats()["rotations"] == 1


async def test_a_caller_timeout_does_not_cancel_the_refresh(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    async with manager(server, journal_path, clock) as tm:
        await tm.sign_in(**DEMO)
        server.set_faults([{"kind": "delay_before", "seconds": 0.2}])
        clock.advance(901)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(tm.access_token(), 0.01)
        token = await tm.access_token()
        assert server.stats()["rotations"] == 1 and tm.tokens is not None
        assert token == tm.tokens.access_token


@pytest.mark.parametrize(
    "faults",
    [
        [{"kind": "status", "status": 503, "count": 2}],
        [{"kind": "rotation_in_progress", "count": 2}],
        [{"kind": "status", "status": 429, "retry_after": 2}],
    ],
    ids=["503-twice", "409-rotation-in-progress-twice", "429-retry-after"],
)
async def test_transient_failures_then_success_keep_the_session(
    server: ReferenceServer, journal_path: Path, clock: FakeClock, faults: list[dict[str, object]]
) -> None:
    """Invariant 5: transient never logs out."""
    async with manager(server, journal_path, clock) as tm:
        old = await tm.sign_in(**DEMO)
        server.set_faults(faults)
        fresh = await tm.refresh()
        assert fresh.refresh_token != old.refresh_token
        assert tm.state is tj.SessionState.VALID
        assert server.stats()["rotations"] == 1
        if faults[0]["kind"] == "rotation_in_progress":
            assert clock.sleeps == [1.0, 1.0]  # the server's Retry-After: 1, same token
        if faults[0]["kind"] == "status" and faults[0]["status"] == 429:
            assert clock.sleeps == [2.0]


@pytest.mark.parametrize("kind", ["drop_after_commit", "truncated", "invalid_json"])
async def test_a_lost_answer_after_the_server_rotated_is_recovered_by_grace_replay(
    server: ReferenceServer, journal_path: Path, clock: FakeClock, kind: str
) -> None:
    async with manager(server, journal_path, clock) as tm:
        await tm.sign_in(**DEMO)
        server.set_faults([{"kind": kind}])
        fresh = await tm.refresh()
        stats = server.stats()
        assert (stats["rotations"], stats["grace_replays"], stats["family_revocations"]) == (
            1,
            1,
            0,
        )
        async with tm.client_session() as http, http.get(server.url + "/api/me") as response:
            assert response.status == 200
        assert tm.tokens == fresh


async def test_concurrent_refresh_409_from_the_server_is_waited_out(
    server409: ReferenceServer, journal_path: Path, tmp_path: Path
) -> None:
    """Two copies of one journal (same device, no shared lease) race; the loser gets
    rotation_in_progress, waits the server's Retry-After (real time: ~1 s) and replays."""
    async with tj.TokenManager(server409.url, journal_path) as tm:
        await tm.sign_in(**DEMO)
    twin_path = tmp_path / "twin.db"
    shutil.copy(journal_path, twin_path)
    server409.set_faults([{"kind": "delay_after", "seconds": 0.3}])
    async with (
        tj.TokenManager(server409.url, journal_path) as tm,
        tj.TokenManager(server409.url, twin_path) as twin,
    ):
        a, b = await asyncio.gather(tm.refresh(), twin.refresh())
        assert a.refresh_token == b.refresh_token
    stats = server409.stats()
    assert stats["rotations"] == 1 and stats["family_revocations"] == 0
    assert stats["refresh_requests"] >= 3  # the loser was told to wait at least once


@pytest.mark.parametrize(
    "code", ["invalid_token", "token_expired", "invalid_token_state", "token_collision", "device"]
)
async def test_each_permanent_code_ends_the_session_once(
    journal_path: Path, clock: FakeClock, code: str
) -> None:
    url = "https://auth.example.com"
    payload = {"statusCode": 401, "error": "Unauthorized", "message": code}
    if code == "device":
        payload["message"] = "Device ID has changed"
    events: list[tj.TokenEvent] = []
    with aioresponses() as mock:
        mock.post(url + "/auth/signin", payload={"appToken": "a1", "refreshToken": "r1"})
        mock.post(url + "/auth/refresh", status=401, body=json.dumps(payload))
        async with tj.TokenManager(url, journal_path, clock=clock, retry=FAST) as tm:
            tm.subscribe(events.append)
            await tm.sign_in(**DEMO)
            with pytest.raises(tj.SessionEnded) as ended:
                await tm.refresh()
            expected = "device_id_changed" if code == "device" else code
            assert ended.value.code == expected
            assert tm.state is tj.SessionState.ENDED and tm.tokens is None
            for call in (tm.access_token, tm.refresh):
                with pytest.raises(tj.SessionEnded):
                    await call()
            refresh_calls = [k for k in mock.requests if str(k[1]).endswith("/auth/refresh")]
            assert len(mock.requests[refresh_calls[0]]) == 1  # no further requests
        assert [e.code for e in events if e.kind is tj.EventKind.ENDED] == [expected]
    # The journal says why, for the next process.
    async with tj.TokenManager(url, journal_path, clock=clock) as again:
        assert again.state is tj.SessionState.ENDED and again.ended_code == expected
        with pytest.raises(tj.SessionEnded):
            await again.access_token()


async def test_unreachable_server_goes_offline_keeps_tokens_and_resumes(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    async with manager(server, journal_path, clock, retry=tj.RetryPolicy(max_attempts=3)) as tm:
        signed = await tm.sign_in(**DEMO)
        clock.advance(901)
        server.set_faults([{"kind": "status", "status": 503, "count": 3}])
        with pytest.raises(tj.ServerError):
            await tm.access_token()
        assert tm.state is tj.SessionState.OFFLINE and tm.tokens == signed
        assert (await tm.journal.load("default")).intent is not None  # kept for the next try
        # Past the offline pause (test_offline_pacing.py pins the pause itself; here the
        # grace rescue may also heal the session in the background meanwhile).
        clock.advance(10 * tm.retry.max_delay)
        token = await tm.access_token()  # the next call resumes
        assert tm.state is tj.SessionState.VALID and token != signed.access_token


async def test_network_errors_raise_network_error_and_keep_tokens(
    journal_path: Path, clock: FakeClock
) -> None:
    async with ReferenceServer() as srv:
        url = srv.url
        tm = tj.TokenManager(url, journal_path, clock=clock, retry=tj.RetryPolicy(max_attempts=2))
        await tm.open()
        signed = await tm.sign_in(**DEMO)
    clock.advance(901)
    with pytest.raises(tj.NetworkError):
        await tm.access_token()
    assert tm.state is tj.SessionState.OFFLINE and tm.tokens == signed
    await tm.close()


async def test_a_valid_token_stays_usable_while_proactive_refresh_fails(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    """Invariant 5, second half."""
    async with manager(server, journal_path, clock, retry=tj.RetryPolicy(max_attempts=2)) as tm:
        signed = await tm.sign_in(**DEMO)
        server.set_faults([{"kind": "status", "status": 503, "count": 10}])
        clock.advance(900 - 30)  # inside the 60 s margin, not expired
        assert await tm.access_token() == signed.access_token
        for _ in range(20):
            await asyncio.sleep(0)
            assert await tm.access_token() == signed.access_token
        assert tm.state is tj.SessionState.VALID


async def test_a_4xx_for_the_refresh_is_a_protocol_error_and_keeps_tokens(
    journal_path: Path, clock: FakeClock
) -> None:
    url = "https://auth.example.com"
    with aioresponses() as mock:
        mock.post(url + "/auth/signin", payload={"appToken": "a1", "refreshToken": "r1"})
        mock.post(
            url + "/auth/refresh",
            status=400,
            payload={"message": ["refreshToken must be a string"]},
        )
        async with tj.TokenManager(url, journal_path, clock=clock) as tm:
            signed = await tm.sign_in(**DEMO)
            with pytest.raises(tj.ProtocolError):
                await tm.refresh()
            assert tm.tokens == signed


async def test_wrong_password_is_sign_in_failed(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    async with manager(server, journal_path, clock) as tm:
        with pytest.raises(tj.SignInFailed) as failed:
            await tm.sign_in(email="demo@example.com", password="wrong")
        assert failed.value.code == "invalid_credentials"
        assert tm.state is tj.SessionState.SIGNED_OUT
        with pytest.raises(tj.NotSignedIn):
            await tm.access_token()


async def test_sign_out_tells_the_server_then_clears(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    async with manager(server, journal_path, clock) as tm:
        await tm.sign_in(**DEMO)
        await tm.sign_out()
        assert tm.state is tj.SessionState.SIGNED_OUT and tm.tokens is None
        assert server.stats()["logouts"] == 1
        with pytest.raises(tj.NotSignedIn):
            await tm.access_token()


async def test_events_follow_every_state_change(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    seen: list[tuple[tj.EventKind, tj.SessionState]] = []
    async with manager(server, journal_path, clock) as tm:
        unsubscribe = tm.subscribe(lambda e: seen.append((e.kind, e.state)))
        stream = tm.events()
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        await tm.sign_in(**DEMO)
        await tm.refresh()
        unsubscribe()
        await tm.refresh()
        assert (await first).kind is tj.EventKind.STATE
        await stream.aclose()  # type: ignore[attr-defined]
    kinds = [k for k, _ in seen]
    assert kinds == [
        tj.EventKind.STATE,
        tj.EventKind.SIGNED_IN,  # SIGNED_OUT -> VALID
        tj.EventKind.STATE,
        tj.EventKind.STATE,
        tj.EventKind.REFRESHED,  # REFRESHING -> VALID
    ]


async def test_a_failing_callback_never_breaks_the_refresh(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    async with manager(server, journal_path, clock) as tm:
        tm.subscribe(lambda e: 1 / 0)
        await tm.sign_in(**DEMO)
        await tm.refresh()
        assert tm.state is tj.SessionState.VALID


async def test_no_token_in_logs_reprs_or_errors(
    server: ReferenceServer, journal_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Invariant 8."""
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    async with manager(server, journal_path, clock, retry=tj.RetryPolicy(max_attempts=2)) as tm:
        tm.subscribe(lambda e: texts.append(repr(e)))
        first = await tm.sign_in(**DEMO)
        server.set_faults([{"kind": "drop_after_commit"}, {"kind": "status", "status": 503}])
        with pytest.raises(tj.TokenJournalError) as error:
            await tm.refresh()
        texts += [str(error.value), repr(error.value), repr(tm), repr(tm.tokens), repr(tm.journal)]
        await tm.refresh()
        second = tm.tokens
        server.set_faults([])
        await server.advance(10_000_000)  # past everything: the server ends the session
        clock.advance(10_000_000)
        with pytest.raises(tj.SessionEnded) as ended:
            await tm.refresh()
        texts += [str(ended.value), repr(ended.value)]
    assert second is not None
    texts += [r.getMessage() for r in caplog.records]
    secrets = {first.access_token, first.refresh_token, second.access_token, second.refresh_token}
    for text in texts:
        for secret in secrets:
            assert secret and secret not in text


async def test_bad_arguments_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="auth_url"):
        tj.TokenManager("ftp://x", tmp_path / "j.db")
    with pytest.raises(ValueError, match="refresh_margin"):
        tj.TokenManager("https://x", tmp_path / "j.db", refresh_margin=-1)
    with pytest.raises(TypeError):
        tj.TokenManager("https://x", 42)  # type: ignore[arg-type]
    tm = tj.TokenManager("https://x", tmp_path / "j.db")
    with pytest.raises(RuntimeError, match="not open"):
        await tm.sign_in(**DEMO)


class FailingCommitJournal(tj.MemoryJournal):
    """A journal whose next commit fails, as on a full disk."""

    fail_next_commit = True

    async def commit_refresh(self, *args: object, **kwargs: object) -> int | None:
        if self.fail_next_commit:
            self.fail_next_commit = False
            raise tj.JournalError("journal: the disk is full")
        return await super().commit_refresh(*args, **kwargs)  # type: ignore[arg-type]


async def test_a_failed_commit_releases_the_lease_and_keeps_the_intent(
    server: ReferenceServer, clock: FakeClock
) -> None:
    journal = FailingCommitJournal()
    async with manager(server, journal, clock) as tm:
        await tm.sign_in(**DEMO)
        with pytest.raises(tj.JournalError):
            await tm.refresh()
        record = await journal.load("default")
        assert record.lease is None  # another process need not wait out its lifetime
        assert record.intent is not None  # the server rotated: the next try replays
        fresh = await tm.refresh()
        assert fresh.refresh_token != record.tokens.refresh_token  # type: ignore[union-attr]
    stats = server.stats()
    assert (stats["rotations"], stats["grace_replays"], stats["family_revocations"]) == (1, 1, 0)


async def test_sign_out_retries_a_transient_failure_through_the_retry_loop(
    journal_path: Path, clock: FakeClock
) -> None:
    """The logout is an auth call like the others: a 503 is tried again, so the server
    hears of it (and revokes the token) instead of the device giving up at once."""
    url = "https://auth.example.com"
    with aioresponses() as mock:
        mock.post(url + "/auth/signin", payload={"appToken": "a1", "refreshToken": "r1"})
        mock.post(url + "/auth/logout", status=503)
        mock.post(url + "/auth/logout", status=204)
        async with tj.TokenManager(url, journal_path, clock=clock, retry=FAST) as tm:
            await tm.sign_in(**DEMO)
            await tm.sign_out()
            assert tm.state is tj.SessionState.SIGNED_OUT
        logouts = [k for k in mock.requests if str(k[1]).endswith("/auth/logout")]
        assert len(mock.requests[logouts[0]]) == 2


async def test_sign_out_with_the_server_away_finishes_locally_within_its_budget(
    journal_path: Path, clock: FakeClock
) -> None:
    """The user waits for a sign-out: tries go on for at most SIGN_OUT_BUDGET seconds (on
    the manager's clock), then the account is signed out locally all the same."""
    from tokenjournal._manager import SIGN_OUT_BUDGET

    url = "https://auth.example.com"
    patient = tj.RetryPolicy(max_attempts=50, max_elapsed=600.0, base_delay=1.0, max_delay=4.0)
    with aioresponses() as mock:
        mock.post(url + "/auth/signin", payload={"appToken": "a1", "refreshToken": "r1"})
        mock.post(url + "/auth/logout", status=503, repeat=True)
        async with tj.TokenManager(url, journal_path, clock=clock, retry=patient) as tm:
            await tm.sign_in(**DEMO)
            started = clock.monotonic()
            await tm.sign_out()
            assert clock.monotonic() - started <= SIGN_OUT_BUDGET
            assert tm.state is tj.SessionState.SIGNED_OUT
        logouts = [k for k in mock.requests if str(k[1]).endswith("/auth/logout")]
        assert len(mock.requests[logouts[0]]) >= 2
