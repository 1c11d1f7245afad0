"""Storage faults: the journal fails, the session does not.

Each fault gives a ``JournalError`` with a message that says what is wrong, and none of them
signs the account out, ends the session or deletes (or rewrites) the journal file. Where a
refresh is refused by the journal, nothing was sent to the server either: a refresh token
is sent only while the journal durably holds it with an intent (invariant 1).

How the faults are made:

* locked: another *process* holds ``BEGIN EXCLUSIVE`` (and, to block readers of a WAL
  journal too, ``locking_mode=EXCLUSIVE``) past a 0.2 s busy timeout;
* disk full: SQLite's own ``PRAGMA max_page_count`` on the journal's connection, capped at
  the current size (as root, ``chmod`` does not stop writes, and filling a real disk is not
  something a test should do);
* read-only: ``SQLiteJournal(read_only=True)``; and, for what a read-only mount gives
  (``SQLITE_READONLY`` from SQLite itself), ``PRAGMA query_only=ON`` on the journal's
  connection, since mounting a read-only file system needs privileges a test cannot assume;
* corrupt: the file truncated, or replaced by random bytes, text, or someone else's SQLite
  database;
* newer schema: ``user_version`` 99.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from aioresponses import aioresponses

import tokenjournal as tj
from tokenjournal.server import ReferenceServer
from tokenjournal.testing import FakeClock

DEMO = {"email": "demo@example.com", "password": "demo"}
AUTH = "http://127.0.0.1:9"  # aioresponses answers; nothing listens there


def digest(path: Path) -> str:
    """The file's bytes, as a hash: "left untouched" is checked to the byte."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


NOW = datetime.now(UTC).replace(microsecond=0)


def pair(tag: str = "a", size: int = 40) -> tj.TokenSet:
    """A pair with tokens of ``size`` characters (equal arguments, equal pairs)."""
    return tj.TokenSet(tag * size, tag.upper() * size, NOW + timedelta(seconds=900), NOW)


async def stored(path: Path) -> tj.TokenSet | None:
    """What the journal file holds, read through a fresh read-only connection."""
    journal = tj.SQLiteJournal(path, read_only=True)
    await journal.open()
    try:
        return (await journal.load("default")).tokens
    finally:
        await journal.close()


@contextmanager
def locked(path: Path, *, exclusive_mode: bool = False) -> Iterator[None]:
    """Another process holds the journal's write lock (and its read lock with
    ``exclusive_mode``) until the block ends."""
    pragma = "c.execute('PRAGMA locking_mode = EXCLUSIVE')\n" if exclusive_mode else ""
    script = (
        "import sqlite3, sys\n"
        f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        f"{pragma}"
        "c.execute('BEGIN EXCLUSIVE')\n"
        "c.execute('SELECT count(*) FROM sqlite_master').fetchall()\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
        "c.execute('ROLLBACK')\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"locked"
        yield
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()


async def signed_in_journal(path: Path, tokens: tj.TokenSet | None = None) -> None:
    """A journal on disk holding a pair for the default account."""
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.store_tokens("default", tokens or pair(), 0.0)
    await journal.close()


# ----------------------------------------------------------------------------- locked


async def test_locked_beyond_busy_timeout_refresh_fails_clearly_and_sends_nothing(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    """Invariant 1 under a lock: the intent cannot be written, so the token is not sent."""
    journal = tj.SQLiteJournal(journal_path, busy_timeout=0.2)
    async with tj.TokenManager(server.url, journal=journal, clock=clock) as tm:
        old = await tm.sign_in(**DEMO)
        with locked(journal_path):
            with pytest.raises(tj.JournalError, match="locked by another process"):
                await tm.refresh()
            assert tm.tokens == old
            assert tm.state is tj.SessionState.VALID
            assert await tm.access_token() == old.access_token  # still usable
        assert server.stats()["refresh_requests"] == 0
        assert await stored(journal_path) == old
        new = await tm.refresh()  # lock gone: the same session goes on
        assert new != old and await stored(journal_path) == new
    assert server.stats()["signins"] == 1


async def test_locked_sign_out_keeps_the_session(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    journal = tj.SQLiteJournal(journal_path, busy_timeout=0.2)
    async with tj.TokenManager(server.url, journal=journal, clock=clock) as tm:
        old = await tm.sign_in(**DEMO)
        with locked(journal_path), pytest.raises(tj.JournalError, match="locked"):
            await tm.sign_out()
        assert tm.state is tj.SessionState.VALID and tm.tokens == old
        assert server.stats()["logouts"] == 0  # the server is told only after the journal
        assert await stored(journal_path) == old


async def test_journal_locked_for_reading_fails_open_and_is_left_untouched(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tokens.db"
    await signed_in_journal(path)
    before = digest(path)
    with locked(path, exclusive_mode=True):
        tm = tj.TokenManager(AUTH, journal=tj.SQLiteJournal(path, busy_timeout=0.2))
        with pytest.raises(tj.JournalError, match="locked by another process"):
            await tm.open()
        assert digest(path) == before
    assert await stored(path) == pair()


# ----------------------------------------------------------------------------- disk full


async def cap_size(journal: tj.SQLiteJournal) -> None:
    """No page beyond the current ones: any write that needs room fails with SQLITE_FULL."""
    db = journal._conn()
    cursor = await db.execute("PRAGMA page_count")
    row = await cursor.fetchone()
    assert row is not None
    await db.execute(f"PRAGMA max_page_count = {int(row[0])}")


def big_pair_body(tag: str) -> dict[str, str]:
    """A Mana refresh answer with JWTs of ~12 KiB (a token with many claims)."""
    now = int(datetime.now(UTC).timestamp())
    claims = {"iat": now, "exp": now + 900, "pad": tag * 12_000}
    token = jwt.encode(claims, "k" * 32, algorithm="HS256")
    return {"appToken": token, "refreshToken": tag.upper() * 12_000, "deviceId": "d"}


async def test_disk_full_on_commit_keeps_the_old_pair_and_the_intent(
    journal_path: Path, clock: FakeClock
) -> None:
    """The server rotated, the journal cannot store the successor: the old pair and the
    intent stay, so the next try (or the next start) replays into the grace window."""
    journal = tj.SQLiteJournal(journal_path)
    with aioresponses() as mock:
        async with tj.TokenManager(AUTH, journal=journal, clock=clock) as tm:
            old = pair()
            await tm.set_tokens(old)
            await cap_size(journal)
            # The server answers every try alike (a grace replay repeats the pair): the grace
            # rescue, which starts in the background after the failed commit, may make some.
            mock.post(f"{AUTH}/auth/refresh", payload=big_pair_body("n"), repeat=True)
            with pytest.raises(tj.JournalError, match="full"):
                await tm.refresh()
            assert tm.tokens == old and tm.state is tj.SessionState.VALID
            record = await journal.load("default")
            assert record.tokens == old
            assert record.intent is not None and record.intent.kind == "refresh"
            assert record.intent.refresh_fingerprint == tj.fingerprint(old.refresh_token)
            # Room again: the replay of the same token lands (the server repeats its pair).
            await journal._conn().execute("PRAGMA max_page_count = 1073741823")
            new = await tm.refresh()
            assert new.refresh_token == "N" * 12_000
            assert (await journal.load("default")).intent is None
    assert await stored(journal_path) == new


async def test_disk_full_on_sign_in_keeps_the_old_pair(
    journal_path: Path, clock: FakeClock
) -> None:
    journal = tj.SQLiteJournal(journal_path)
    async with tj.TokenManager(AUTH, journal=journal, clock=clock) as tm:
        await tm.set_tokens(pair("a"))
        await cap_size(journal)
        with pytest.raises(tj.JournalError, match="full"):
            await tm.set_tokens(pair("b", size=20_000))
        assert tm.tokens == pair("a")
    assert await stored(journal_path) == pair("a")


# ----------------------------------------------------------------------------- read-only


async def test_read_only_journal_refuses_writes_and_sends_nothing(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    async with tj.TokenManager(server.url, journal=journal_path, clock=clock) as tm:
        old = await tm.sign_in(**DEMO)
    before = digest(journal_path)
    journal = tj.SQLiteJournal(journal_path, read_only=True)
    async with tj.TokenManager(server.url, journal=journal, clock=clock) as tm:
        assert tm.tokens == old  # reading works
        assert await tm.access_token() == old.access_token
        with pytest.raises(tj.JournalError, match="read-only"):
            await tm.refresh()
        with pytest.raises(tj.JournalError, match="read-only"):
            await tm.sign_out()
        assert tm.state is tj.SessionState.VALID and tm.tokens == old
    stats = server.stats()
    assert stats["refresh_requests"] == 0 and stats["logouts"] == 0
    assert digest(journal_path) == before


async def test_read_only_at_the_sqlite_level_gives_a_clear_journal_error(
    server: ReferenceServer, journal_path: Path, clock: FakeClock
) -> None:
    """SQLITE_READONLY, what a read-only mount gives, made with ``query_only``."""
    journal = tj.SQLiteJournal(journal_path)
    async with tj.TokenManager(server.url, journal=journal, clock=clock) as tm:
        old = await tm.sign_in(**DEMO)
        await journal._conn().execute("PRAGMA query_only = ON")
        with pytest.raises(tj.JournalError, match="is read-only; tokens cannot be saved"):
            await tm.refresh()
        assert tm.tokens == old and tm.state is tj.SessionState.VALID
        assert server.stats()["refresh_requests"] == 0
        await journal._conn().execute("PRAGMA query_only = OFF")
    assert await stored(journal_path) == old


# ----------------------------------------------------------------------------- corrupt


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) // 2])


@pytest.mark.parametrize("keep", [50, 100, 1000, 4096, 8192, -1], ids=lambda k: f"keep{k}")
async def test_truncated_journal_is_refused_and_left_untouched(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "tokens.db"
    await signed_in_journal(path)
    _truncate(path, keep)
    before = digest(path)
    tm = tj.TokenManager(AUTH, journal=path)
    with pytest.raises(tj.JournalError, match="corrupt or not a tokenjournal file") as err:
        await tm.open()
    assert str(path) in str(err.value)
    assert path.exists() and digest(path) == before


@pytest.mark.parametrize(
    "content",
    [os.urandom(5000), b"hello world\n" * 100, b"SQLite format 3\x00" + os.urandom(2000)],
    ids=["random", "text", "bad-sqlite-header"],
)
async def test_garbage_journal_is_refused_and_left_untouched(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "tokens.db"
    path.write_bytes(content)
    tm = tj.TokenManager(AUTH, journal=path)
    with pytest.raises(tj.JournalError, match="corrupt or not a tokenjournal file"):
        await tm.open()
    assert path.read_bytes() == content


@pytest.mark.parametrize("table", ["accounts (x)", "notes (body TEXT)"])
async def test_someone_elses_sqlite_database_is_refused_and_left_untouched(
    tmp_path: Path, table: str
) -> None:
    """Regression: a wrong path to another program's database used to be migrated into
    (our tables added to it), or to fail later with "no such column"."""
    import sqlite3

    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE {table}")
    conn.commit()
    conn.close()
    before = digest(path)
    tm = tj.TokenManager(AUTH, journal=path)
    with pytest.raises(tj.JournalError, match="not a tokenjournal journal; it was left untouched"):
        await tm.open()
    assert digest(path) == before
    with pytest.raises(tj.JournalError, match="not a tokenjournal journal"):
        await tj.SQLiteJournal(path, read_only=True).open()


async def test_an_empty_file_is_a_new_journal(tmp_path: Path) -> None:
    """Zero bytes is what a crash between creating the file and its first transaction leaves
    (SQLite treats it as a new database too): it opens as a fresh, signed-out journal."""
    path = tmp_path / "tokens.db"
    path.write_bytes(b"")
    async with tj.TokenManager(AUTH, journal=path) as tm:
        assert tm.state is tj.SessionState.SIGNED_OUT
    assert path.stat().st_size > 0


# ----------------------------------------------------------------------------- newer schema


@pytest.mark.parametrize("read_only", [False, True])
async def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path, read_only: bool) -> None:
    import sqlite3

    path = tmp_path / "tokens.db"
    await signed_in_journal(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    before = digest(path)
    tm = tj.TokenManager(AUTH, journal=tj.SQLiteJournal(path, read_only=read_only))
    with pytest.raises(tj.JournalError, match=r"schema 99, newer than this tokenjournal") as err:
        await tm.open()
    assert err.value.code == "journal_error"
    assert "upgrade tokenjournal" in str(err.value)
    assert digest(path) == before
