"""Invariant 4 across processes: one refresh per account among processes sharing a journal.

Workers are real processes (tests/harness/mp_worker.py, driven by JSON lines over pipes) on one
SQLite journal file; the reference server runs in the test process. Expiry is made
simultaneous without sleeping: the test moves the server clock and every worker's clock by
the same offset. Waits are bounded and poll a condition (server counters, a process state),
never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness.mpbench import (
    WorkerHandle,
    format_table,
    run_mp_latency,
    start_workers,
    worker_args,
)
from tests.harness.mpbench import (
    main as mpbench_main,
)
from tokenjournal import SessionState, TokenManager, fingerprint
from tokenjournal._journal import AccountRecord, Holder, SQLiteJournal, Started, this_host
from tokenjournal.server import ReferenceServer
from tokenjournal.testing import FakeClock, reference_server

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and pids")

DEMO = {"email": "demo@example.com", "password": "demo"}
WORKER = [sys.executable, "-m", "tests.harness.mp_worker"]
TTL = 900.0  # the reference server's default access-token lifetime


# --------------------------------------------------------------------------- helpers


@asynccontextmanager
async def workers(
    server: ReferenceServer, journal: Path, count: int, *extra: str, **options: Any
) -> AsyncIterator[list[WorkerHandle]]:
    """``count`` worker processes on ``journal``, all ready; reaped on exit."""
    log = journal.parent / "workers.log"
    with log.open("ab") as stderr:
        args = [*extra, *worker_args(server.url, journal, **options)]
        handles: list[WorkerHandle] = []
        try:
            handles = await start_workers(WORKER, args, count, stderr)
            yield handles
        except BaseException:
            print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        finally:
            await asyncio.gather(*(h.close() for h in handles))


async def sign_in(server: ReferenceServer, journal: Path, account: str = "default") -> str:
    """Sign the demo user in on ``journal``; the access token's fingerprint."""
    async with TokenManager(server.url, journal, account=account) as tm:
        tokens = await tm.sign_in(**DEMO)
    return fingerprint(tokens.access_token)


async def load(journal: Path, account: str = "default") -> AccountRecord:
    """The account's record as the journal file holds it now."""
    j = SQLiteJournal(journal)
    await j.open()
    try:
        return await j.load(account)
    finally:
        await j.close()


def fp_of(record: AccountRecord) -> str:
    assert record.tokens is not None
    return fingerprint(record.tokens.access_token)


async def api_me(server: ReferenceServer, record: AccountRecord) -> int:
    """Status of ``GET /api/me`` with the record's access token."""
    assert record.tokens is not None
    headers = {"Authorization": f"Bearer {record.tokens.access_token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/api/me", headers=headers) as response,
    ):
        return response.status


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` (it reads server state, which runs in this loop) until it holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped by a signal (Linux /proc; elsewhere assume it is)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


async def expire_everywhere(
    server: ReferenceServer, handles: list[WorkerHandle], offset: float
) -> None:
    """Move the server clock to ``offset`` and every worker's clock with it."""
    await server.advance(offset - server.state.clock.offset)
    await asyncio.gather(*(h.call("clock", offset=offset) for h in handles))


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


# --------------------------------------------------------------------------- tests


async def test_one_refresh_request_per_expiry_across_8_processes_x_200_callers(
    journal_path: Path,
) -> None:
    """8 processes x 200 callers cross two expiries: one refresh request reaches the server
    per expiry (coordination by the lease: exactly one begin_refresh is Started), every
    caller gets the new token, and a fresh token costs no journal round trip at all.

    The server answers overlapping refreshes of one token with 409 rotation_in_progress, so
    a race that the grace window would otherwise hide shows up in the counters."""
    async with reference_server(conflict="409") as server:
        first = await sign_in(server, journal_path)
        async with workers(server, journal_path, 8) as handles:
            # Expiry by the clock: every access_token() call finds the token expired.
            await expire_everywhere(server, handles, TTL + 1)
            before = server.stats()
            for h in handles:
                h.send("tokens", callers=200)
            replies = await asyncio.gather(*(h.reply() for h in handles))
            record = await load(journal_path)
            new = fp_of(record)
            assert new != first
            assert [r["errors"] for r in replies] == [{}] * 8
            assert [r["fps"] for r in replies] == [{new: 200}] * 8
            assert sum(r["refresh_requests"] for r in replies) == 1
            starts = [e for h in handles for e in h.drain("begin") if e["result"] == "Started"]
            assert len(starts) == 1
            assert delta(before, server.stats()) == {"refresh_requests": 1, "rotations": 1}
            assert record.generation == 2 and record.intent is None and record.lease is None

            # Expiry seen only by the server: 401s, each answered with one shared refresh.
            await server.advance(TTL + 1)
            before = server.stats()
            for h in handles:
                h.send("api", callers=25)
            replies = await asyncio.gather(*(h.reply() for h in handles))
            record = await load(journal_path)
            assert [r["statuses"] for r in replies] == [{"200": 25}] * 8
            assert {r["fp"] for r in replies} == {fp_of(record)}
            assert sum(r["refresh_requests"] for r in replies) == 1
            changed = delta(before, server.stats())
            assert changed["refresh_requests"] == 1 and changed["rotations"] == 1
            for counter in ("grace_replays", "reuse_detections", "family_revocations"):
                assert counter not in changed
            assert record.generation == 3

            # The hot path: a fresh token comes from memory, with no journal I/O.
            replies = await asyncio.gather(*(h.call("tokens", callers=200) for h in handles))
            assert [(r["reads"], r["transactions"]) for r in replies] == [(0, 0)] * 8
            assert [r["fps"] for r in replies] == [{fp_of(record): 200}] * 8


async def test_holder_killed_after_rotation_another_finishes_in_grace(journal_path: Path) -> None:
    """The holder is SIGKILLed after the server rotated, while another process already
    waits on its lease: the dead pid is noticed (the lease has 10 minutes to run), and the
    waiter replays the same refresh token into the grace window. No sign-in, no revocation."""
    async with reference_server() as server:
        await sign_in(server, journal_path)
        async with workers(server, journal_path, 2, lease_ttl=600.0) as (holder, waiter):
            await expire_everywhere(server, [holder, waiter], TTL + 1)
            server.set_faults([{"kind": "delay_after", "seconds": 1.0}])
            holder.send("tokens", callers=50)
            await holder.event("begin", result="Started")
            await until(lambda: server.stats()["rotations"] == 1)
            waiter.send("tokens", callers=50)
            await waiter.event("begin", result="Busy")
            holder.signal(signal.SIGKILL)
            await holder.process.wait()

            async with asyncio.timeout(30):  # the lease has 600 s: only the dead pid frees it
                reply = await waiter.reply()
            record = await load(journal_path)
            assert reply["errors"] == {}
            assert reply["fps"] == {fp_of(record): 50}
            assert reply["refresh_requests"] == 1
            stats = server.stats()
            assert stats["refresh_requests"] == 2
            assert stats["rotations"] == 1
            assert stats["grace_replays"] == 1
            assert stats["family_revocations"] == 0 and stats["reuse_detections"] == 0
            assert stats["signins"] == 1
            assert record.generation == 2 and record.intent is None and record.lease is None
            assert await api_me(server, record) == 200


@pytest.mark.parametrize("point", ["after_send", "after_intent"])
async def test_frozen_holder_resumes_without_overwriting_or_spending_a_stale_token(
    journal_path: Path, point: str
) -> None:
    """The holder is SIGSTOPped (at ``after_send``: its request reached the server; at
    ``after_intent``: lease and intent written, nothing sent) longer than its 0.5 s lease.
    Another process takes over and then refreshes once more, so the journal is two
    generations past the frozen holder's token. Resumed, the holder neither commits its
    stale pair (compare-and-swap on the generation) nor sends its spent refresh token (it
    notices the lease is gone): it adopts the journal's pair, which works on /api/me."""
    async with reference_server() as server:
        await sign_in(server, journal_path)
        async with (
            workers(server, journal_path, 1, "--freeze-at", point, lease_ttl=0.5) as (holder,),
            workers(server, journal_path, 1) as (other,),
        ):
            holder.send("refresh")
            await holder.event("frozen", point=point)
            await until(lambda: stopped(holder.pid))
            if point == "after_send":
                await until(lambda: server.stats()["rotations"] == 1)

            took_over = await other.call("refresh")  # waits out the 0.5 s lease
            newer = await other.call("refresh")
            assert "error" not in took_over and "error" not in newer
            assert [e["result"] for e in other.drain("begin")][-2:] == ["Started", "Started"]

            holder.signal(signal.SIGCONT)
            resumed = await holder.reply()
            record = await load(journal_path)
            assert "error" not in resumed, resumed
            assert record.generation == 3
            assert resumed["fp"] == newer["fp"] == fp_of(record)
            assert resumed["refresh_requests"] == (1 if point == "after_send" else 0)
            state = await holder.call("state")
            assert state["state"] == SessionState.VALID.value
            stats = server.stats()
            assert stats["rotations"] == 2
            assert stats["grace_replays"] == (1 if point == "after_send" else 0)
            assert stats["reuse_detections"] == 0 and stats["family_revocations"] == 0
            assert await api_me(server, record) == 200


async def test_stale_in_memory_pair_is_adopted_before_a_401_or_a_refresh(
    journal_path: Path,
) -> None:
    """A process whose pair is older than the journal's never spends its own refresh token:
    on a 401 it replays with the journal's pair (no refresh at all); when the journal's pair
    is stale too, it refreshes with the journal's refresh token (no grace replay)."""
    async with reference_server() as server:
        await sign_in(server, journal_path)
        async with workers(server, journal_path, 2) as (a, b):
            await server.advance(TTL + 100)  # the sign-in pair is dead for the server only
            rotated = await a.call("refresh")
            assert "error" not in rotated

            reply = await b.call("api", callers=20)  # b still holds the sign-in pair
            assert reply["statuses"] == {"200": 20}
            assert reply["refresh_requests"] == 0
            assert reply["fp"] == rotated["fp"]
            assert server.stats()["refresh_requests"] == 1

            again = await a.call("refresh")  # b is one generation behind again
            await expire_everywhere(server, [b], 5 * TTL)
            reply = await b.call("tokens", callers=50)
            record = await load(journal_path)
            assert reply["refresh_requests"] == 1
            assert reply["fps"] == {fp_of(record): 50}
            assert fp_of(record) != again["fp"]
            stats = server.stats()
            assert stats["rotations"] == 3
            assert stats["grace_replays"] == 0 and stats["reuse_detections"] == 0
            assert record.generation == 4
        assert (a.process.returncode, b.process.returncode) == (0, 0)  # asked to quit, they did


async def test_a_lease_on_one_account_never_blocks_another(journal_path: Path) -> None:
    """Two accounts in one journal file: while a live holder keeps account a's lease, account
    b refreshes at once; a's refresh waits, and proceeds when the lease is released."""
    async with (
        reference_server() as server,
        TokenManager(server.url, journal_path, account="a") as ta,
        TokenManager(server.url, journal_path, account="b") as tb,
    ):
        await ta.sign_in(**DEMO)
        await tb.sign_in(**DEMO)
        other = Holder("another-process", os.getpid(), this_host())  # alive
        journal = SQLiteJournal(journal_path)
        await journal.open()
        try:
            record = await journal.load("a")
            began = await journal.begin_refresh("a", other, record.generation, time.time(), 600)
            assert isinstance(began, Started)

            a_refresh = asyncio.ensure_future(ta.refresh())
            b_tokens = await asyncio.wait_for(tb.refresh(), 10)
            assert not a_refresh.done()
            assert (await journal.load("b")).tokens == b_tokens
            assert (await journal.load("a")).generation == record.generation
            assert server.stats()["refresh_requests"] == 1

            await journal.release("a", other)
            a_tokens = await asyncio.wait_for(a_refresh, 10)
            assert (await journal.load("a")).tokens == a_tokens
            assert server.stats()["rotations"] == 2
        finally:
            await journal.close()


class HookClock(FakeClock):
    """A FakeClock whose next sleep first runs ``hook`` (once)."""

    hook: Callable[[], Awaitable[None]] | None = None

    async def sleep(self, seconds: float) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook()
        await super().sleep(seconds)


async def test_holder_that_lost_its_lease_during_backoff_does_not_retry_its_token(
    journal_path: Path,
) -> None:
    """Regression: the holder's first try got a 503; while it backed off past its lease,
    another manager took over and refreshed twice. Retrying the old refresh token now would
    be reuse two generations back (the server revokes the family); the holder must see that
    the lease is gone and adopt the journal's pair instead."""
    clock = HookClock()
    async with (
        reference_server() as server,
        TokenManager(server.url, journal_path, clock=clock, lease_ttl=5) as ta,
        TokenManager(server.url, journal_path, clock=clock) as tb,
    ):
        await ta.sign_in(**DEMO)
        results: list[str] = []

        async def take_over() -> None:
            clock.advance(10)  # the holder's lease lapses while it sleeps
            for _ in range(2):
                results.append(fingerprint((await tb.refresh()).access_token))

        clock.hook = take_over
        server.set_faults([{"kind": "status", "status": 503}])
        tokens = await ta.refresh()
        stats = server.stats()
        assert fingerprint(tokens.access_token) == results[-1]
        assert ta.state is SessionState.VALID
        assert ta.refresh_requests == 1  # the 503; no retry with the spent token
        assert stats["rotations"] == 2
        assert stats["reuse_detections"] == 0 and stats["family_revocations"] == 0
        assert (await load(journal_path)).tokens == tokens


def test_mp_latency_bench_runs_and_counts_what_it_claims() -> None:
    """The figure's own checks hold on a small run: one refresh request per round, no
    journal round trip on a fresh token, and a latency sample per waiting process."""
    result = run_mp_latency(processes=2, callers=5, rounds=2)
    assert result["refresh_requests_per_round"] == [1, 1]
    assert result["journal_ops_on_fresh_token"] == 0
    assert result["commit_to_each_waiting_process_ms"]["n"] == 2
    assert result["began_after_the_commit"] in (0, 1, 2)  # the waiter, in each round
    assert result["server"] == {"rotations": 2, "grace_replays": 0, "reuse_detections": 0}
    assert "commit -> last waiting process" in format_table(result)
    assert "began after the commit" in format_table(result)


@pytest.mark.parametrize("argv", [["--processes", "1"], ["--callers", "0"], ["--rounds", "-1"]])
def test_the_bench_refuses_sizes_it_cannot_measure(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        mpbench_main(argv)
    assert exit_.value.code == 2
    assert "need at least 2 processes, 1 caller and 1 round" in capsys.readouterr().err
