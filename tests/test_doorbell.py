"""The holder's doorbell: a process waiting on another's refresh wakes when the holder
commits, not at its next poll of the journal (docs/architecture.md 1.3)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aioresponses import CallbackResult, aioresponses

import tokenjournal as tj
from tokenjournal import _doorbell as doorbell
from tokenjournal._clock import SystemClock
from tokenjournal._journal import AccountRecord, Lease, this_host

from .conftest import DEMO

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="abstract Unix sockets are Linux's"
)
URL = "https://auth.example.com"


class NeverSleeps(SystemClock):
    """A clock whose pauses never end: only a doorbell can wake a waiter that uses it."""

    __slots__ = ()

    async def sleep(self, seconds: float) -> None:
        await asyncio.Event().wait()


def lease(holder: str, host: str | None = None) -> Lease:
    return Lease(holder, 1, host or this_host(), 0.0)


@linux_only
async def test_ringing_wakes_every_waiter_and_an_absent_bell_answers_at_once() -> None:
    bell = doorbell.Doorbell()
    bell.open("holder-1", "acct")
    waiters = [asyncio.ensure_future(doorbell.rung(lease("holder-1"), "acct")) for _ in range(5)]
    for _ in range(20):  # let each connect; none may return before the ring
        await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    bell.ring()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [True] * 5
    # Rung (or never opened): nobody listens, so a waiter learns it at once and polls.
    assert await doorbell.rung(lease("holder-1"), "acct") is False
    assert await doorbell.rung(lease("holder-2"), "acct") is False


async def test_a_holder_on_another_host_is_not_called() -> None:
    bell = doorbell.Doorbell()
    bell.open("holder-3", "acct")
    try:
        assert await doorbell.rung(lease("holder-3", host="elsewhere.invalid"), "acct") is False
    finally:
        bell.ring()


@linux_only
def test_the_bell_is_named_for_holder_and_account_and_leaves_no_file(tmp_path: Path) -> None:
    names = {
        doorbell.address("h1", "a"),
        doorbell.address("h1", "b"),
        doorbell.address("h2", "a"),
    }
    assert len(names) == 3 and all(n is not None and n.startswith("\0") for n in names)


@asynccontextmanager
async def _mid_refresh(
    path: Path, journal: tj.SQLiteJournal | None = None, clock: SystemClock | None = None
) -> AsyncIterator[tuple[tj.TokenManager, asyncio.Event, asyncio.Future[tj.TokenSet]]]:
    """Two managers on one journal: the first holds the refresh lease, its request parked
    until the event is set; yields the waiter (on ``journal`` if given, with ``clock``,
    by default one whose pauses never end), the event and the holder's refresh."""
    gate = asyncio.Event()

    async def slow(url: object, **kwargs: object) -> CallbackResult:
        await gate.wait()
        return CallbackResult(payload={"appToken": "a2", "refreshToken": "r2"})

    with aioresponses() as mock:
        mock.post(URL + "/auth/signin", payload={"appToken": "a1", "refreshToken": "r1"})
        mock.post(URL + "/auth/refresh", callback=slow)
        holder = tj.TokenManager(URL, path)
        waiter = tj.TokenManager(URL, journal or path, clock=clock or NeverSleeps())
        async with holder:
            await holder.sign_in(**DEMO)
            async with waiter:
                rotating = asyncio.ensure_future(holder.refresh())
                while holder.state is not tj.SessionState.REFRESHING:
                    await asyncio.sleep(0)
                yield waiter, gate, rotating


@linux_only
async def test_a_waiter_wakes_on_the_holders_commit_without_polling(tmp_path: Path) -> None:
    """The waiter's clock never finishes a pause: it returns only because the holder rang.
    It adopts the holder's pair; the server sees one refresh."""
    async with _mid_refresh(tmp_path / "t.db") as (waiter, gate, rotating):
        waiting = asyncio.ensure_future(waiter.refresh())
        for _ in range(50):
            await asyncio.sleep(0)
        assert not waiting.done()
        gate.set()
        assert (await asyncio.wait_for(waiting, 5)).access_token == "a2"
        assert (await rotating).access_token == "a2"
        assert waiter.refresh_requests == 0


@linux_only
async def test_a_cancelled_caller_leaves_the_shared_wait_on_the_bell(tmp_path: Path) -> None:
    """Cancelling a caller never cancels the shared refresh (invariant 7), and that refresh,
    parked on the bell, still wakes on the holder's commit and adopts its pair."""
    async with _mid_refresh(tmp_path / "t.db") as (waiter, gate, rotating):
        waiting = asyncio.ensure_future(waiter.refresh())
        for _ in range(50):
            await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.set()
        assert (await rotating).access_token == "a2"
        for _ in range(500):  # until the waiter's own refresh task has adopted
            if waiter.tokens is not None and waiter.tokens.access_token == "a2":
                break
            await asyncio.sleep(0.01)
        assert waiter.tokens is not None and waiter.tokens.access_token == "a2"
        assert waiter.refresh_requests == 0


class SleepsOnce(SystemClock):
    """A clock whose first pause ends at once (a timed read of the journal) and whose later
    pauses never end: after that read, only the doorbell can wake a waiter."""

    __slots__ = ("slept",)

    def __init__(self) -> None:
        self.slept = 0

    async def sleep(self, seconds: float) -> None:
        self.slept += 1
        if self.slept > 1:
            await asyncio.Event().wait()


class RingsDuringRead(tj.SQLiteJournal):
    """A journal whose armed read takes its rows, then lets the holder commit and ring, and
    only then answers: with the rows from before the commit, as a slow read would."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.during: Callable[[], Awaitable[None]] | None = None

    async def load(self, account: str) -> AccountRecord:
        record = await super().load(account)
        if self.during is not None:
            during, self.during = self.during, None
            await during()
        return record


@linux_only
async def test_a_ring_during_a_timed_read_is_not_taken_for_an_absent_bell(tmp_path: Path) -> None:
    """The waiter's timed read is on its way when the holder commits and rings, and answers
    with the rows from before: the ring is newer than the read, so the waiter reads again at
    once. It used to conclude that the bell was unreachable and fall back to polling (tens of
    milliseconds later; here, never, as its pauses do not end)."""
    path = tmp_path / "t.db"
    journal = RingsDuringRead(path)
    async with _mid_refresh(path, journal, SleepsOnce()) as (waiter, gate, rotating):

        async def commit_and_ring() -> None:
            gate.set()
            await rotating  # committed, and the bell rung ...
            bells = [t for t in asyncio.all_tasks() if "rung" in repr(t.get_coro())]
            await asyncio.wait_for(asyncio.gather(*bells), 5)  # ... and heard

        journal.during = commit_and_ring
        waiting = asyncio.ensure_future(waiter.refresh())
        assert (await asyncio.wait_for(waiting, 5)).access_token == "a2"
        assert journal.during is None  # the ring did come during the read
        assert waiter.refresh_requests == 0
