"""The journal under cancellation, concurrency, odd values and forensic reading.

Each test here is a regression test for a finding of issue 11 that the journal owned:
a cancelled caller left the connection inside a transaction; finishing a sign-out wiped a
sign-in made meanwhile; replaced tokens stayed readable in the ``-wal`` file; a stored
"never expires" (or a row edited by hand) made every later load raise a raw exception;
two concurrent ``open()`` calls leaked a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from aioresponses import CallbackResult, aioresponses
from yarl import URL

import tokenjournal as tj
from tokenjournal._journal import Holder, Started
from tokenjournal.cli.status import read_journal
from tokenjournal.testing import FakeClock

NOW = 1_800_000_000.0
ME = Holder("host:1:me", os.getpid(), "host")
AUTH = "http://127.0.0.1:9"  # aioresponses answers; nothing listens there


def pair(name: str) -> tj.TokenSet:
    """A pair whose tokens are unique, long enough to find in a file, and named ``name``."""
    when = datetime.fromtimestamp(NOW, tz=UTC)
    tag = f"{name}-{uuid.uuid4().hex}"
    return tj.TokenSet(f"ACCESS-{tag}", f"REFRESH-{tag}", when + timedelta(seconds=900), when)


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to the journal (another process, as SQLite sees it)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0.5)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[tj.SQLiteJournal]:
    j = tj.SQLiteJournal(tmp_path / "j" / "tokens.db", busy_timeout=2.0)
    await j.open()
    yield j
    await j.close()


async def assert_no_transaction_is_left(journal: tj.SQLiteJournal) -> None:
    """Whatever a cancelled call left running has finished, and nothing holds the file."""
    await journal.load("a")  # queued behind whatever the cancelled call left running
    assert journal._db is not None and not journal._db.in_transaction
    with raw(journal.path) as other:  # another process can write: no lock is held
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE meta SET value = value WHERE key = 'device_id'")
        other.execute("COMMIT")
    generation = (await journal.load("a")).generation
    assert await journal.store_tokens("a", pair("after"), NOW) == generation + 1


# --------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("nth", range(1, 9))
@pytest.mark.parametrize("call", ["store_tokens", "begin_sign_out", "commit_refresh"])
async def test_a_call_cancelled_at_any_await_leaves_no_transaction(
    journal: tj.SQLiteJournal, monkeypatch: pytest.MonkeyPatch, call: str, nth: int
) -> None:
    """Regression (issue 11 §3): the caller is cancelled at its ``nth`` hand-over to the
    connection's worker thread (BEGIN, each statement, COMMIT: wherever the journal awaits).
    The worker thread carries on with what it was given; it must never be left inside the
    transaction."""
    await journal.store_tokens("a", pair("one"), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    calls = {"n": 0}
    real = aiosqlite.Connection._execute

    async def cancelled_at_nth(self: aiosqlite.Connection, fn: Any, *a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == nth:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # delivered at the await below: the job is already queued
        return await real(self, fn, *a, **kw)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", cancelled_at_nth)
    operations = {
        "store_tokens": lambda: journal.store_tokens("a", pair("two"), NOW),
        "begin_sign_out": lambda: journal.begin_sign_out("a", NOW),
        "commit_refresh": lambda: journal.commit_refresh("a", ME, 1, pair("two"), NOW),
    }
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.ensure_future(operations[call]())
    monkeypatch.undo()
    await assert_no_transaction_is_left(journal)


@pytest.mark.parametrize("call", ["store_tokens", "begin_sign_out", "begin_refresh"])
async def test_a_write_timed_out_on_a_locked_file_leaves_no_transaction(
    journal: tj.SQLiteJournal, call: str
) -> None:
    """Regression (issue 11 §3): another process holds the write lock; ``wait_for(..., 0.3)``
    gives up while our BEGIN IMMEDIATE waits in the busy timeout. Before, the worker thread
    got the lock later and the connection stayed inside the transaction ("cannot start a
    transaction within a transaction" for every later write, "database is locked" for every
    other process). Now the abandoned call stops waiting and changes nothing."""
    first = pair("one")
    await journal.store_tokens("a", first, NOW)
    operations = {
        "store_tokens": lambda: journal.store_tokens("a", pair("two"), NOW),
        "begin_sign_out": lambda: journal.begin_sign_out("a", NOW),
        "begin_refresh": lambda: journal.begin_refresh("a", ME, 1, NOW, 30.0),
    }
    with raw(journal.path) as holder:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(operations[call](), 0.3)
        assert time.monotonic() - started < 1.5  # the caller's timeout, not the busy timeout
        await asyncio.sleep(0.2)  # the worker notices the abandonment at its next slice
        holder.execute("ROLLBACK")
    record = await journal.load("a")
    assert (record.tokens, record.generation, record.intent) == (first, 1, None)
    await assert_no_transaction_is_left(journal)


@pytest.mark.parametrize("call", ["set_tokens", "sign_out"])
async def test_manager_calls_timed_out_on_a_locked_journal_recover(
    tmp_path: Path, call: str
) -> None:
    """The issue's own reproduction, through the TokenManager."""
    path = tmp_path / "tokens.db"
    with aioresponses() as mock:
        mock.post(f"{AUTH}/auth/logout", status=204)
        async with tj.TokenManager(AUTH, journal=tj.SQLiteJournal(path)) as tm:
            await tm.set_tokens(pair("one"))
            with raw(path) as other:
                other.execute("BEGIN IMMEDIATE")
                coro = tm.set_tokens(pair("two")) if call == "set_tokens" else tm.sign_out()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(coro, 0.3)
                other.execute("ROLLBACK")
            later = pair("three")
            await tm.set_tokens(later)
            assert (await tm.journal.load("default")).tokens == later
            with raw(path) as other:
                other.execute("BEGIN IMMEDIATE")
                other.execute("COMMIT")


async def test_concurrent_opens_make_one_connection(tmp_path: Path) -> None:
    """Regression (issue 11 §3): two concurrent ``open()`` calls made two connections (one
    leaked, its worker thread keeping the interpreter alive) or failed with "Safety level
    may not be changed inside a transaction"."""
    before = set(threading.enumerate())
    journal = tj.SQLiteJournal(tmp_path / "tokens.db")
    await asyncio.gather(*(journal.open() for _ in range(4)))
    await journal.store_tokens("a", pair("one"), NOW)
    assert len(set(threading.enumerate()) - before) == 1  # one aiosqlite worker
    await asyncio.gather(journal.close(), journal.close())
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not set(threading.enumerate()) - before


# --------------------------------------------------------------------------- sign-out CAS


@pytest.fixture(params=["sqlite", "memory"])
async def any_journal(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tj.Journal]:
    j: tj.Journal = (
        tj.SQLiteJournal(tmp_path / "tokens.db")
        if request.param == "sqlite"
        else tj.MemoryJournal()
    )
    await j.open()
    yield j
    await j.close()


async def test_finishing_a_sign_out_never_wipes_a_sign_in_made_meanwhile(
    any_journal: tj.Journal,
) -> None:
    """Regression (issue 11 §4): finish_sign_out is a compare-and-swap on the generation."""
    await any_journal.store_tokens("a", pair("old"), NOW)
    leaving = await any_journal.begin_sign_out("a", NOW + 1)
    assert leaving.intent is not None and leaving.intent.kind == "sign_out"
    newer = pair("new")
    await any_journal.store_tokens("a", newer, NOW + 2)  # a sign-in, here or elsewhere
    assert await any_journal.finish_sign_out("a", NOW + 3, leaving.generation) is None
    record = await any_journal.load("a")
    assert record.tokens == newer and record.ended_code is None and record.intent is None


async def test_a_refresh_in_flight_cannot_commit_over_a_sign_out(any_journal: tj.Journal) -> None:
    """begin_sign_out moves the generation: a refresh that began before it (another
    process's) finds its commit refused, and the sign-out finishes."""
    await any_journal.store_tokens("a", pair("old"), NOW)
    assert isinstance(await any_journal.begin_refresh("a", ME, 1, NOW, 30.0), Started)
    leaving = await any_journal.begin_sign_out("a", NOW + 1)
    assert await any_journal.commit_refresh("a", ME, 1, pair("rotated"), NOW + 2) is None
    assert await any_journal.finish_sign_out("a", NOW + 3, leaving.generation) is not None
    record = await any_journal.load("a")
    assert record.tokens is None and record.ended_code == "signed_out"


async def test_a_second_sign_out_joins_the_journaled_one(any_journal: tj.Journal) -> None:
    """Signing out while a sign-out is pending (a crash's, being finished by open()) keeps
    that one: both finishers expect the same generation, one wins, the other sees None."""
    await any_journal.store_tokens("a", pair("old"), NOW)
    first = await any_journal.begin_sign_out("a", NOW)
    again = await any_journal.begin_sign_out("a", NOW + 5)
    assert again == first
    assert await any_journal.finish_sign_out("a", NOW + 6, first.generation) is not None
    assert await any_journal.finish_sign_out("a", NOW + 7, again.generation) is None


async def test_open_finishing_a_crashed_sign_out_keeps_a_sign_in_made_meanwhile(
    tmp_path: Path,
) -> None:
    """Regression (issue 11 §4): a crash left a journaled sign-out; the next open() finishes
    it in the background (the logout is slow); the app signs in meanwhile. Before, the
    background finish wiped the new sign-in from memory and journal."""
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.store_tokens("default", pair("old"), NOW)
    await journal.begin_sign_out("default", NOW)
    await journal.close()
    logout_sent, logout_may_answer = asyncio.Event(), asyncio.Event()

    async def slow_logout(url: URL, **_: Any) -> CallbackResult:
        logout_sent.set()
        await logout_may_answer.wait()
        return CallbackResult(status=204)

    newer = pair("new")
    with aioresponses() as mock:
        mock.post(f"{AUTH}/auth/logout", callback=slow_logout)
        async with tj.TokenManager(AUTH, journal=path, clock=FakeClock()) as tm:
            await logout_sent.wait()  # the background finish is telling the server
            await tm.set_tokens(newer)
            logout_may_answer.set()
        # close() let the background finish run to its end
    assert tm.state is tj.SessionState.VALID and tm.tokens == newer
    journal = tj.SQLiteJournal(path, read_only=True)
    await journal.open()
    record = await journal.load("default")
    await journal.close()
    assert record.tokens == newer and record.intent is None


async def test_a_sign_out_racing_another_process_sign_in_adopts_it(tmp_path: Path) -> None:
    """Regression (issue 11 §4): process A signs out (its logout is slow) while process B
    signs in on the shared journal: B's sign-in stays, and A adopts it."""
    path = tmp_path / "tokens.db"
    logout_sent, logout_may_answer = asyncio.Event(), asyncio.Event()

    async def slow_logout(url: URL, **_: Any) -> CallbackResult:
        logout_sent.set()
        await logout_may_answer.wait()
        return CallbackResult(status=204)

    newer = pair("b")
    with aioresponses() as mock:
        mock.post(f"{AUTH}/auth/logout", callback=slow_logout)
        a = tj.TokenManager(AUTH, journal=tj.SQLiteJournal(path))
        b = tj.TokenManager(AUTH, journal=tj.SQLiteJournal(path))
        async with a, b:
            await a.set_tokens(pair("a"))
            signing_out = asyncio.ensure_future(a.sign_out())
            await logout_sent.wait()  # A's sign-out is journaled, its logout in flight
            await b.set_tokens(newer)
            logout_may_answer.set()
            await signing_out
            assert a.state is tj.SessionState.VALID and a.tokens == newer
            assert (await a.journal.load("default")).tokens == newer


# --------------------------------------------------------------------------- no old secret left


def leaked(folder: Path, *secrets: str) -> list[str]:
    """Which of ``secrets`` any file in ``folder`` still holds (tokens.db, -wal, -shm, ...)."""
    found = []
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        found += [f"{s[:14]}... in {file.name}" for s in secrets if s.encode() in data]
    return found


def secrets_of(tokens: tj.TokenSet) -> tuple[str, ...]:
    assert tokens.refresh_token is not None
    return tokens.access_token, tokens.refresh_token


async def test_a_refresh_leaves_the_replaced_pair_in_no_file(journal: tj.SQLiteJournal) -> None:
    """Regression (issue 11 §4): rotated tokens stayed readable in the ``-wal`` file for as
    long as the process ran. Now none is left once the commit returns, journal still open."""
    old = pair("old")
    await journal.store_tokens("a", old, NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    await journal.commit_refresh("a", ME, 1, pair("new"), NOW + 1)
    assert leaked(journal.path.parent, *secrets_of(old)) == []


@pytest.mark.parametrize("how", ["store_tokens", "end_session", "sign_out"])
async def test_a_replaced_or_dropped_pair_is_in_no_file(
    journal: tj.SQLiteJournal, how: str
) -> None:
    old = pair("old")
    await journal.store_tokens("a", old, NOW)
    await journal.load("a")
    if how == "store_tokens":
        await journal.store_tokens("a", pair("new"), NOW + 1)
    elif how == "end_session":
        await journal.end_session("a", "invalid_token", NOW + 1, expected_generation=1)
    else:
        leaving = await journal.begin_sign_out("a", NOW + 1)
        await journal.finish_sign_out("a", NOW + 2, leaving.generation)
    assert leaked(journal.path.parent, *secrets_of(old)) == []


async def test_a_cleared_device_code_is_in_no_file(journal: tj.SQLiteJournal) -> None:
    code = f"DEVICECODE-{uuid.uuid4().hex}"
    await journal.save_device_code("a", f'{{"device_code": "{code}"}}', NOW)
    await journal.clear_device_code("a")
    assert leaked(journal.path.parent, code) == []


async def test_a_manager_refresh_leaves_the_old_pair_in_no_file(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    old = pair("old")
    with aioresponses() as mock:
        mock.post(
            f"{AUTH}/auth/refresh",
            payload={"appToken": f"new-{uuid.uuid4().hex}", "refreshToken": "new-refresh"},
        )
        async with tj.TokenManager(AUTH, journal=folder / "tokens.db") as tm:
            await tm.set_tokens(old)
            await tm.refresh()
            assert leaked(folder, *secrets_of(old)) == []


_KILLED_WRITER = """
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA wal_autocheckpoint = 0")  # as if killed before the checkpoint ran
conn.execute("UPDATE accounts SET access_token = 'x', refresh_token = 'y'")
os.kill(os.getpid(), signal.SIGKILL)
"""

_KILLED_JOURNAL = """
import asyncio, os, signal, sys
from datetime import UTC, datetime
import tokenjournal as tj

async def main() -> None:
    journal = tj.SQLiteJournal(sys.argv[1])
    await journal.open()
    await journal.store_tokens("a", tj.TokenSet(sys.argv[2], sys.argv[3]), 0.0)
    await journal.store_tokens("a", tj.TokenSet("new-access", "new-refresh"), 1.0)
    os.kill(os.getpid(), signal.SIGKILL)  # no close: the WAL stays behind

asyncio.run(main())
"""


async def test_after_a_sigkill_no_replaced_pair_is_in_any_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    old = pair("old")
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_JOURNAL, str(path), *secrets_of(old)], check=False
    )
    assert child.returncode == -signal.SIGKILL
    assert leaked(tmp_path, *secrets_of(old)) == []


async def test_open_scrubs_what_a_process_killed_before_its_checkpoint_left(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tokens.db"
    old = pair("old")
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.store_tokens("a", old, NOW)
    await journal.close()
    child = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], check=False)
    assert child.returncode == -signal.SIGKILL
    assert leaked(tmp_path, *secrets_of(old))  # the crash left them in the WAL or the file
    journal = tj.SQLiteJournal(path)
    await journal.open()
    try:
        assert leaked(tmp_path, *secrets_of(old)) == []
    finally:
        await journal.close()


# --------------------------------------------------------------------------- odd values


async def test_a_never_expiring_pair_does_not_brick_the_account(tmp_path: Path) -> None:
    """Regression (issue 11 §5): ``expires_at=datetime.max`` was stored as is and every
    later load, open and ``tokenjournal status`` raised ValueError. It is now kept as the
    longest lifetime the protocols accept, and reads back as a datetime."""
    path = tmp_path / "tokens.db"
    forever = tj.TokenSet("a" * 20, "r" * 20, datetime.max.replace(tzinfo=UTC))
    async with tj.TokenManager(AUTH, journal=path) as tm:
        await tm.set_tokens(forever)
        assert await tm.access_token() == forever.access_token
    async with tj.TokenManager(AUTH, journal=path) as tm:
        assert tm.tokens is not None and tm.tokens.expires_at is not None
        assert tm.tokens.expires_at.year > datetime.now(UTC).year + 5
        assert await tm.access_token() == forever.access_token
    status = await read_journal(path)
    assert [a.account for a in status.accounts] == ["default"]


ODD_VALUES = [
    # (table, column, value, the column a JournalError names; None: clamped, loads fine)
    ("accounts", "expires_at", 1e300, None),
    ("accounts", "expires_at", -1e300, None),
    ("accounts", "expires_at", float("inf"), None),
    ("accounts", "expires_at", float("nan"), None),  # SQLite stores NaN as NULL
    ("accounts", "received_at", 2**62, None),
    ("accounts", "expires_at", "soon", "expires_at"),
    ("accounts", "received_at", b"\x00\x01", "received_at"),
    ("accounts", "access_token", b"\xff\xfe", "access_token"),
    ("accounts", "token_type", b"Bearer", "token_type"),
    ("accounts", "generation", 2**63 - 1, "generation"),
    ("accounts", "generation", -4, "generation"),
    ("accounts", "generation", "many", "generation"),
    ("accounts", "ended_at", "yesterday", "ended_at"),
    ("intents", "started_at", "now", "intents.started_at"),
    ("intents", "generation", 1e30, "intents.generation"),
    ("intents", "kind", "teleport", "intents.kind"),
    ("leases", "pid", 1e30, "leases.pid"),
    ("leases", "expires_at", b"\x00", "leases.expires_at"),
]


@pytest.mark.parametrize(("table", "column", "value", "named"), ODD_VALUES)
async def test_a_row_edited_into_odd_values_gives_a_clear_error_or_a_clamp(
    tmp_path: Path, table: str, column: str, value: object, named: str | None
) -> None:
    """Regression (issue 11 §5): rows edited by hand gave raw TypeError, ValueError or
    OverflowError from load (or from the next write). Now: a JournalError naming the
    account and the column, or a clamped value; never a raw exception, never a lost file."""
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.store_tokens("a", pair("one"), NOW)
    await journal.begin_refresh("a", Holder("h:1:x", 1, "elsewhere"), 1, NOW, 30.0)
    await journal.close()
    with raw(path) as conn:
        conn.execute(f"UPDATE {table} SET {column} = ? WHERE account = 'a'", (value,))
    journal = tj.SQLiteJournal(path)
    await journal.open()
    try:
        if named is None:
            record = await journal.load("a")
            assert record.tokens is not None
            for when in (record.tokens.expires_at, record.tokens.received_at):
                assert when is None or 1 <= when.year <= 9999
            assert await journal.store_tokens("a", pair("two"), NOW) == record.generation + 1
        else:
            with pytest.raises(tj.JournalError) as caught:
                await journal.load("a")
            assert "'a'" in str(caught.value) and named in str(caught.value)
            with pytest.raises(tj.JournalError):
                await journal.store_tokens("a", pair("two"), NOW)
            assert await journal.load("b") is not None  # other accounts still work
    finally:
        await journal.close()
    assert path.exists()


# --------------------------------------------------------------------------- group commits


async def test_a_group_whose_write_raises_fails_every_write_of_it_and_nothing_else(
    journal: tj.SQLiteJournal,
) -> None:
    """A group commit is one transaction: a body that raises rolls back the group, every
    writer of the group gets that error, and the flush itself ends cleanly (its task holds
    no exception nobody retrieves)."""

    def boom(tx: Any) -> None:
        raise ValueError("boom")

    first = asyncio.ensure_future(journal._batched(lambda tx: 1))
    second = asyncio.ensure_future(journal._batched(boom))
    await asyncio.sleep(0)
    (flush,) = journal._flushes
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert [type(r) for r in results] == [ValueError, ValueError]
    await flush
    assert flush.exception() is None
    assert await journal._batched(lambda tx: 2) == 2  # the next group is not affected


@contextlib.asynccontextmanager
async def thread_held(journal: tj.SQLiteJournal) -> AsyncIterator[None]:
    """The journal's worker thread busy with a job of ours until the block ends: whatever is
    queued meanwhile waits behind it, so the order of events is fixed, not left to timing."""
    started, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection, abandoned: threading.Event) -> None:
        started.set()
        release.wait(10)

    held = asyncio.ensure_future(journal._run(hold))
    await asyncio.to_thread(started.wait, 10)
    try:
        yield
    finally:
        release.set()
        await held


@pytest.mark.parametrize("when", ["before-its-first-step", "queued-behind-another-job"])
async def test_a_group_commit_cut_short_fails_its_writes_instead_of_leaving_them_waiting(
    journal: tj.SQLiteJournal, when: str
) -> None:
    """A flush cancelled (an app cancelling every task at shutdown) before the journal's
    thread took its group used to leave the group's writers waiting for ever, and every
    later write too: the group stayed marked as queued. Cancelled before its first step (its
    coroutine never ran: no except clause of it could help), or while its job waited behind
    another one on the journal's thread."""
    async with contextlib.AsyncExitStack() as stack:
        if when == "queued-behind-another-job":
            await stack.enter_async_context(thread_held(journal))
        write = asyncio.ensure_future(journal._batched(lambda tx: 1))
        await asyncio.sleep(0)  # the write queues its body and starts its flush (not yet run)
        (flush,) = journal._flushes
        if when == "queued-behind-another-job":
            for _ in range(3):  # the flush runs up to its job, queued behind the held one
                await asyncio.sleep(0)
        flush.cancel()
        with pytest.raises(tj.JournalError, match=r"^journal closed$"):
            await asyncio.wait_for(write, 5)
        with pytest.raises(asyncio.CancelledError):
            await flush
    # ... and the next write starts a group of its own (none was left marked as queued).
    assert await asyncio.wait_for(journal._batched(lambda tx: 2), 5) == 2
    # A finished flush is not kept: its done-callback drops it, one loop turn after it ends
    # (3.12 may resume this test first).
    for _ in range(10):
        if not journal._flushes:
            break
        await asyncio.sleep(0)
    assert journal._flushes == set()


async def test_a_failed_group_leaves_the_group_queued_behind_it_alone(
    journal: tj.SQLiteJournal,
) -> None:
    """Writes that queue while a group is being committed form the next group: when the
    first group fails, they are still committed (they are not failed with its error)."""
    running, go = threading.Event(), threading.Event()

    def fails(tx: Any) -> None:
        running.set()
        go.wait(10)
        raise ValueError("boom")

    first = asyncio.ensure_future(journal._batched(fails))
    await asyncio.to_thread(running.wait, 10)  # the first group is inside its transaction
    async with thread_held(journal):  # queued next on the thread: ahead of the second group
        second = asyncio.ensure_future(journal._batched(lambda tx: 2))
        await asyncio.sleep(0)
        go.set()
        with pytest.raises(ValueError, match=r"^boom$"):
            await asyncio.wait_for(first, 5)
    assert await asyncio.wait_for(second, 5) == 2


async def test_a_group_commit_cancelled_inside_its_transaction_fails_its_writes_and_rolls_back(
    journal: tj.SQLiteJournal,
) -> None:
    """The journal's thread took the group and is inside its transaction when the flush is
    cancelled: each writer gets ``JournalError("journal closed")`` (not the flush's own
    cancellation), the transaction is rolled back, and the next write starts a new group."""
    running, go = threading.Event(), threading.Event()

    def slow(tx: Any) -> int:
        running.set()
        go.wait(10)
        tx.execute("INSERT INTO meta (key, value) VALUES ('mark', 'x')")
        return 1

    write = asyncio.ensure_future(journal._batched(slow))
    await asyncio.to_thread(running.wait, 10)
    (flush,) = journal._flushes
    flush.cancel()
    with pytest.raises(tj.JournalError, match=r"^journal closed$"):
        await asyncio.wait_for(write, 5)
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await flush
    assert await asyncio.wait_for(journal._batched(lambda tx: 2), 5) == 2
    assert await journal._read("SELECT value FROM meta WHERE key = 'mark'") == []
