"""The journal: durable, private, one transaction per change; SQLite and memory alike."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import tokenjournal as tj
from tokenjournal._journal import Busy, Holder, Stale, Started, _Tx

NOW = 1_800_000_000.0
ME = Holder("host:1:me", os.getpid(), "host")
OTHER = Holder("host:2:other", os.getpid(), "host")  # a live pid: our own


def pair(n: int) -> tj.TokenSet:
    when = datetime.fromtimestamp(NOW, tz=UTC)
    return tj.TokenSet(f"access-{n}", f"refresh-{n}", when + timedelta(seconds=900), when)


@pytest.fixture(params=["sqlite", "memory"])
async def journal(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tj.Journal]:
    j: tj.Journal = (
        tj.SQLiteJournal(tmp_path / "j" / "tokens.db")
        if request.param == "sqlite"
        else tj.MemoryJournal()
    )
    await j.open()
    yield j
    await j.close()


async def test_blank_account_loads_as_generation_zero(journal: tj.Journal) -> None:
    record = await journal.load("nobody")
    assert (record.tokens, record.generation, record.intent) == (None, 0, None)


async def test_store_then_load_round_trips_the_pair(journal: tj.Journal) -> None:
    generation = await journal.store_tokens("a", pair(1), NOW)
    record = await journal.load("a")
    assert record.tokens == pair(1) and record.generation == generation == 1
    assert await journal.accounts() == ["a"]


async def test_intent_is_written_before_and_cleared_by_the_commit(journal: tj.Journal) -> None:
    """Invariants 1, 2, 6: intent durable before sending; replaced only with its successor."""
    await journal.store_tokens("a", pair(1), NOW)
    began = await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    assert isinstance(began, Started)
    record = await journal.load("a")
    assert record.intent is not None and record.intent.started_at == NOW
    assert record.intent.refresh_fingerprint == tj.fingerprint("refresh-1")
    assert record.tokens == pair(1)  # the old token stays current until the successor lands
    assert await journal.commit_refresh("a", ME, 1, pair(2), NOW + 1) == 2
    record = await journal.load("a")
    assert record.tokens == pair(2) and record.intent is None and record.lease is None


async def test_a_pending_intent_keeps_its_start_time(journal: tj.Journal) -> None:
    """The grace deadline is measured from the first send, not from each retry."""
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    await journal.release("a", ME)
    began = await journal.begin_refresh("a", ME, 1, NOW + 100, 30.0)
    assert isinstance(began, Started) and began.intent.started_at == NOW


async def test_commit_is_a_compare_and_swap_on_the_generation(journal: tj.Journal) -> None:
    """A holder paused past its lease never commits over a newer pair."""
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 1.0)
    began = await journal.begin_refresh("a", OTHER, 1, NOW + 5, 30.0)  # ME's lease lapsed
    assert isinstance(began, Started)
    assert await journal.commit_refresh("a", OTHER, 1, pair(2), NOW + 6) == 2
    assert await journal.commit_refresh("a", ME, 1, pair(3), NOW + 7) is None
    assert (await journal.load("a")).tokens == pair(2)


async def test_a_live_lease_makes_others_wait(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.store_tokens("b", pair(1), NOW)
    assert isinstance(await journal.begin_refresh("a", ME, 1, NOW, 30.0), Started)
    busy = await journal.begin_refresh("a", OTHER, 1, NOW + 1, 30.0)
    assert isinstance(busy, Busy) and busy.lease.holder == ME.id
    # A lease on one account never blocks another.
    assert isinstance(await journal.begin_refresh("b", OTHER, 1, NOW + 1, 30.0), Started)


async def test_a_dead_holder_on_this_host_is_skipped(journal: tj.Journal) -> None:
    dead = Holder("host:dead", 2**22 + 12345, "host")  # no such pid
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", dead, 1, NOW, 300.0)
    assert isinstance(await journal.begin_refresh("a", OTHER, 1, NOW + 1, 30.0), Started)


async def test_a_stale_generation_is_reported(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    assert isinstance(await journal.begin_refresh("a", ME, 0, NOW, 30.0), Stale)


async def test_end_session_records_why_and_when(journal: tj.Journal) -> None:
    """Invariant 2: dropped without successor only on a permanent code, with the reason."""
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    await journal.end_session("a", "token_expired", NOW + 3)
    record = await journal.load("a")
    assert record.tokens is None and record.intent is None and record.lease is None
    assert (record.ended_code, record.ended_at) == ("token_expired", NOW + 3)


async def test_device_id_is_made_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    first = tj.SQLiteJournal(path)
    await first.open()
    device = await first.device_id()
    await first.close()
    second = tj.SQLiteJournal(path)
    await second.open()
    assert await second.device_id() == device
    await second.close()
    assert len(device) == 36 and device[14] == "4"  # a UUID4


async def test_file_is_0600_and_a_created_folder_0700(tmp_path: Path) -> None:
    """Invariant 8."""
    path = tmp_path / "new" / "deeper" / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.store_tokens("a", pair(1), NOW)
    await journal.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700


async def test_an_existing_folder_is_never_changed(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    journal = tj.SQLiteJournal(folder / "tokens.db")
    await journal.open()
    await journal.close()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


async def test_pragmas_wal_full_secure_delete(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    rows = {}
    for pragma in ("journal_mode", "synchronous", "secure_delete"):
        rows[pragma] = (await journal._read(f"PRAGMA {pragma}"))[0][0]
    await journal.close()
    assert rows == {"journal_mode": "wal", "synchronous": 2, "secure_delete": 1}


async def test_a_refresh_costs_two_durable_commits(tmp_path: Path) -> None:
    journal = tj.SQLiteJournal(tmp_path / "tokens.db")
    await journal.open()
    await journal.store_tokens("a", pair(1), NOW)
    before = journal.durable_commits
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    await journal.commit_refresh("a", ME, 1, pair(2), NOW)
    assert journal.durable_commits - before == 2
    await journal.close()


async def test_rotated_tokens_do_not_linger_in_the_file(tmp_path: Path) -> None:
    """secure_delete: the replaced refresh token is overwritten, not left in free pages."""
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.store_tokens("a", tj.TokenSet("A" * 40, "OLDREFRESH" * 8), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    await journal.commit_refresh("a", ME, 1, tj.TokenSet("B" * 40, "NEWREFRESH" * 8), NOW)
    await journal.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert b"OLDREFRESH" not in path.read_bytes()


async def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")
    before = path.read_bytes()
    with pytest.raises(tj.JournalError, match="newer"):
        await tj.SQLiteJournal(path).open()
    assert path.read_bytes() == before


async def test_garbage_file_is_a_journal_error_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    path.write_bytes(b"this is not a database at all" * 100)
    before = path.read_bytes()
    with pytest.raises(tj.JournalError, match="corrupt"):
        await tj.SQLiteJournal(path).open()
    assert path.read_bytes() == before


async def test_read_only_open_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.store_tokens("a", pair(1), NOW)
    await journal.close()
    reader = tj.SQLiteJournal(path, read_only=True)
    await reader.open()
    assert (await reader.load("a")).tokens == pair(1)
    with pytest.raises(tj.JournalError, match="read-only"):
        await reader.store_tokens("a", pair(2), NOW)
    await reader.close()


async def test_using_a_closed_journal_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        await tj.SQLiteJournal(tmp_path / "x.db").load("a")


async def test_a_taken_lease_or_a_newer_pair_is_seen_without_waiting_for_the_write_lock(
    tmp_path: Path,
) -> None:
    """An expiry sends every process of a host to ``begin_refresh`` at once. Those that find
    the lease taken, or the pair refreshed already, learn it from a read (WAL: no lock) and
    go to the holder's bell; they used to queue for the write lock, where SQLite's busy wait
    sleeps in steps of up to 10 ms, and the last in the queue heard of the commit tens of
    milliseconds late. Here another connection holds the write lock throughout: the answers
    come anyway (before, the calls failed with "locked" after the busy timeout)."""
    journal = tj.SQLiteJournal(tmp_path / "t.db", busy_timeout=0.2)
    await journal.open()
    try:
        generation = await journal.store_tokens("acct", pair(1), 0.0)
        other, me = Holder("other", 1, "elsewhere"), Holder("me", 2, "here")
        assert isinstance(await journal.begin_refresh("acct", other, generation, 0.0, 30), Started)
        with contextlib.closing(sqlite3.connect(journal.path, isolation_level=None)) as lock:
            lock.execute("BEGIN IMMEDIATE")
            busy = await journal.begin_refresh("acct", me, generation, 1.0, 30)
            stale = await journal.begin_refresh("acct", me, generation - 1, 1.0, 30)
            lock.execute("ROLLBACK")
        assert isinstance(busy, Busy) and busy.lease.holder == "other"
        assert isinstance(stale, Stale) and stale.record.generation == generation
        # With the lease free, the read says nothing and the transaction decides: it waits
        # for the lock like any write, and takes the lease once it can.
        assert isinstance(await journal.begin_refresh("acct", me, generation, 31.0, 30), Started)
    finally:
        await journal.close()


async def test_while_the_write_lock_is_busy_the_read_is_asked_again_each_millisecond(
    tmp_path: Path,
) -> None:
    """The holder may be committing the very change a waiter's read looks for: while the
    write lock stays busy, the read is asked again (every millisecond), and its answer ends
    the wait. Without an answer the wait ends at ``busy_timeout``, as any write's does; a
    free lock is taken at once. Either way SQLite's own busy wait is set back after."""
    path = tmp_path / "t.db"
    journal = tj.SQLiteJournal(path, busy_timeout=0.2)
    await journal.open()  # creates the file and its tables
    await journal.close()
    with (
        contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=0)) as holder,
        contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=0)) as conn,
    ):
        conn.execute("PRAGMA busy_timeout = 25")
        holder.execute("BEGIN IMMEDIATE")
        answers = iter([None, None, "adopt"])
        asked: list[bool] = []

        def unless(tx: _Tx) -> str | None:
            asked.append(tx.conn.in_transaction)
            return next(answers)

        assert journal._begin_unless(conn, unless, threading.Event()) == "adopt"
        assert asked == [False, False, False]  # three reads, none inside a transaction
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            journal._begin_unless(conn, lambda tx: None, threading.Event())
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 25
        holder.execute("ROLLBACK")
        assert journal._begin_unless(conn, lambda tx: None, threading.Event()) is None
        assert conn.in_transaction  # the lock is ours: the transaction goes on
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 25
        conn.execute("ROLLBACK")


async def test_a_lease_taken_between_the_read_and_the_lock_is_seen_by_the_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read without the lock is a hint: another process may take the lease between it
    and our transaction, and the transaction, which reads again under the lock, decides."""
    journal = tj.SQLiteJournal(tmp_path / "t.db")
    await journal.open()
    try:
        generation = await journal.store_tokens("acct", pair(1), 0.0)
        begin = journal._begin_unless

        def raced(conn: sqlite3.Connection, unless: Any, abandoned: threading.Event) -> Any:
            def read_then_lose_the_race(tx: _Tx) -> Any:
                answer = unless(tx)  # the lease is free...
                with contextlib.closing(sqlite3.connect(journal.path)) as other, other:
                    other.execute(  # ...and another process takes it right after
                        "INSERT INTO leases (account, holder, pid, host, expires_at) "
                        "VALUES ('acct', 'other', 1, 'elsewhere', 100)"
                    )
                return answer

            return begin(conn, read_then_lose_the_race, abandoned)

        monkeypatch.setattr(journal, "_begin_unless", raced)
        busy = await journal.begin_refresh("acct", ME, generation, 1.0, 30)
        assert isinstance(busy, Busy) and busy.lease.holder == "other"
    finally:
        await journal.close()


async def test_the_wait_for_the_lock_ends_at_once_when_abandoned_or_on_another_error(
    tmp_path: Path,
) -> None:
    """A cancelled caller (``abandoned``) stops waiting at the first busy slice, and an error
    other than "busy" is raised at once: neither reads again until ``busy_timeout``. A read
    that finds the file busy itself (a checkpoint) is read again, like any read."""
    path = tmp_path / "t.db"
    journal = tj.SQLiteJournal(path, busy_timeout=0.5)
    await journal.open()
    await journal.close()
    asked: list[int] = []

    def unless(tx: _Tx) -> None:
        asked.append(1)

    with (
        contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=0)) as holder,
        contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=0)) as conn,
    ):
        holder.execute("BEGIN IMMEDIATE")
        abandoned = threading.Event()
        abandoned.set()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            journal._begin_unless(conn, unless, abandoned)
        assert len(asked) == 1
        holder.execute("ROLLBACK")
        conn.execute("BEGIN")  # BEGIN IMMEDIATE inside a transaction: not a "busy" error
        with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
            journal._begin_unless(conn, unless, threading.Event())
        assert len(asked) == 2
        conn.execute("ROLLBACK")
        locked = sqlite3.OperationalError("database is locked")
        locked.sqlite_errorcode = sqlite3.SQLITE_BUSY
        reads = iter([locked, "adopt"])

        def busy_once(tx: _Tx) -> str:
            answer = next(reads)
            if isinstance(answer, Exception):
                raise answer
            assert isinstance(answer, str)
            return answer

        assert journal._begin_unless(conn, busy_once, threading.Event()) == "adopt"


def test_a_rollback_that_fails_does_not_hide_the_error_that_caused_it(tmp_path: Path) -> None:
    """The body failed, and the rollback after it failed too (the disk went away): the
    caller hears of the body's error, not of the rollback's."""

    class RollbackFails:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        @property
        def in_transaction(self) -> bool:
            return self.conn.in_transaction

        def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
            if sql == "ROLLBACK":
                raise sqlite3.OperationalError("disk I/O error")
            return self.conn.execute(sql, params)

    def body(tx: _Tx) -> None:
        raise ValueError("the body's own error")

    journal = tj.SQLiteJournal(tmp_path / "t.db")
    with contextlib.closing(sqlite3.connect(tmp_path / "t.db", isolation_level=None)) as conn:
        wrapped: Any = RollbackFails(conn)
        with pytest.raises(ValueError, match="the body's own error"):
            journal._in_transaction(wrapped, body, threading.Event())
        conn.execute("ROLLBACK")
