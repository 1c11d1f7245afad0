"""The Journal contract, method by method, on SQLite and in memory alike.

Each test pins one rule of :class:`tokenjournal.Journal` as a caller sees it (what a call
returns, what the next ``load`` shows), so that both implementations keep the same rules:
the device code, the journaled sign-out, the end of a session, the lease (renew, release,
the expiry boundary) and what a stored pair reads back as.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import tokenjournal as tj
from tokenjournal._journal import (
    _EPOCH_MAX,
    _EPOCH_MIN,
    _MAX_GENERATION,
    BUSY_TIMEOUT_MS,
    MAX_LIFETIME,
    SCHEMA_VERSION,
    SQLITE_PATH_BYTES,
    Busy,
    Holder,
    Intent,
    Lease,
    Stale,
    Started,
    _describe,
    _is_busy,
    _Row,
    lease_is_live,
    pid_alive,
)
from tokenjournal._outbox import OutboxItem, OutboxLimits

NOW = 1_800_000_000.0
WHEN = datetime.fromtimestamp(NOW, tz=UTC)
ME = Holder("host:1:me", os.getpid(), "host")
OTHER = Holder("host:2:other", os.getpid(), "host")  # a live pid: our own
DEAD_PID = 2**22 + 12345  # no such process


def pair(n: int, *, token_type: str = "Bearer", scope: str | None = None) -> tj.TokenSet:
    return tj.TokenSet(
        f"access-{n}", f"refresh-{n}", WHEN + timedelta(seconds=900), WHEN, token_type, scope
    )


@pytest.fixture(params=["sqlite", "memory"])
async def journal(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tj.Journal]:
    j: tj.Journal = (
        tj.SQLiteJournal(tmp_path / "tokens.db")
        if request.param == "sqlite"
        else tj.MemoryJournal()
    )
    await j.open()
    yield j
    await j.close()


# --------------------------------------------------------------------------- device code


async def test_a_saved_device_code_is_the_pending_intent(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.save_device_code("a", '{"device_code": "dc-1"}', NOW + 5)
    record = await journal.load("a")
    assert record.intent == Intent("device_code", "-", NOW + 5, 1, '{"device_code": "dc-1"}')
    assert record.tokens == pair(1) and record.generation == 1  # the pair is not touched


async def test_a_device_code_is_saved_for_an_account_never_signed_in(journal: tj.Journal) -> None:
    await journal.save_device_code("new", "payload-1", NOW)
    record = await journal.load("new")
    assert record.intent == Intent("device_code", "-", NOW, 0, "payload-1")
    assert record.tokens is None


async def test_a_new_device_code_replaces_the_pending_one(journal: tj.Journal) -> None:
    await journal.save_device_code("a", "payload-1", NOW)
    await journal.save_device_code("a", "payload-2", NOW + 1)
    record = await journal.load("a")
    assert record.intent is not None
    assert (record.intent.payload, record.intent.started_at) == ("payload-2", NOW + 1)


async def test_clearing_the_device_code_forgets_it(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.save_device_code("a", "payload-1", NOW)
    await journal.clear_device_code("a")
    record = await journal.load("a")
    assert record.intent is None and record.tokens == pair(1)


async def test_clearing_the_device_code_keeps_a_refresh_intent(journal: tj.Journal) -> None:
    """Only a device code is cleared: a refresh intent guards a token that may be in flight."""
    await journal.store_tokens("a", pair(1), NOW)
    began = await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    assert isinstance(began, Started)
    await journal.clear_device_code("a")
    assert (await journal.load("a")).intent == began.intent


async def test_clearing_with_nothing_pending_changes_nothing(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    before = await journal.load("a")
    await journal.clear_device_code("a")
    await journal.clear_device_code("nobody")
    assert await journal.load("a") == before
    assert (await journal.load("nobody")).intent is None


async def test_a_refresh_replaces_a_pending_device_code(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.save_device_code("a", "payload-1", NOW)
    began = await journal.begin_refresh("a", ME, 1, NOW + 1, 30.0)
    assert isinstance(began, Started)
    assert began.intent == Intent("refresh", tj.fingerprint("refresh-1"), NOW + 1, 1)
    assert (await journal.load("a")).intent == began.intent


# --------------------------------------------------------------------------- sign-out


async def test_begin_sign_out_journals_the_intent_and_moves_the_generation(
    journal: tj.Journal,
) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    leaving = await journal.begin_sign_out("a", NOW + 2)
    expected = Intent("sign_out", tj.fingerprint("refresh-1"), NOW + 2, 2)
    assert (leaving.generation, leaving.intent, leaving.tokens) == (2, expected, pair(1))
    # The journal holds what begin_sign_out returned: a crash now finishes it next start.
    record = await journal.load("a")
    assert (record.generation, record.intent, record.tokens) == (2, expected, pair(1))


async def test_begin_sign_out_without_a_pair_writes_nothing(journal: tj.Journal) -> None:
    record = await journal.begin_sign_out("nobody", NOW)
    assert (record.tokens, record.generation, record.intent) == (None, 0, None)
    assert await journal.load("nobody") == record
    assert await journal.accounts() == []


async def test_begin_sign_out_after_an_end_writes_nothing(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.end_session("a", "invalid_grant", NOW + 1)
    ended = await journal.load("a")
    assert await journal.begin_sign_out("a", NOW + 2) == ended
    assert await journal.load("a") == ended


async def test_begin_sign_out_replaces_a_pending_refresh_intent(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    await journal.release("a", ME)
    leaving = await journal.begin_sign_out("a", NOW + 3)
    record = await journal.load("a")
    assert record.intent == leaving.intent
    assert record.intent is not None and record.intent.kind == "sign_out"


async def test_a_refresh_cannot_start_while_a_sign_out_is_journaled(journal: tj.Journal) -> None:
    """Even with the sign-out's own generation: a refresh would replace its intent and undo it."""
    await journal.store_tokens("a", pair(1), NOW)
    leaving = await journal.begin_sign_out("a", NOW)
    began = await journal.begin_refresh("a", ME, leaving.generation, NOW + 1, 30.0)
    assert isinstance(began, Stale) and began.record == leaving
    assert await journal.load("a") == leaving  # no lease taken, the sign-out intent kept


async def test_finish_sign_out_ends_the_session_as_signed_out(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    leaving = await journal.begin_sign_out("a", NOW)
    assert await journal.finish_sign_out("a", NOW + 4, leaving.generation) == 3
    record = await journal.load("a")
    assert (record.tokens, record.intent, record.generation) == (None, None, 3)
    assert (record.ended_code, record.ended_at) == ("signed_out", NOW + 4)


# --------------------------------------------------------------------------- end of a session


async def test_end_session_returns_the_new_generation(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.store_tokens("a", pair(2), NOW)
    assert await journal.end_session("a", "invalid_grant", NOW + 1) == 3
    record = await journal.load("a")
    assert (record.generation, record.tokens, record.ended_code) == (3, None, "invalid_grant")


async def test_end_session_with_the_expected_generation_ends_it(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    assert await journal.end_session("a", "invalid_grant", NOW + 1, expected_generation=1) == 2
    record = await journal.load("a")
    assert (record.tokens, record.intent, record.lease) == (None, None, None)
    assert (record.ended_code, record.ended_at) == ("invalid_grant", NOW + 1)


async def test_end_session_of_an_old_generation_keeps_the_newer_pair(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.store_tokens("a", pair(2), NOW + 1)  # a sign-in meanwhile
    before = await journal.load("a")
    assert await journal.end_session("a", "invalid_grant", NOW + 2, expected_generation=1) is None
    assert await journal.load("a") == before


async def test_a_sign_in_clears_the_recorded_end(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.end_session("a", "invalid_grant", NOW + 1)
    assert await journal.store_tokens("a", pair(2), NOW + 2) == 3
    record = await journal.load("a")
    assert (record.tokens, record.ended_code, record.ended_at) == (pair(2), None, None)


# --------------------------------------------------------------------------- the lease


async def test_renewing_our_lease_moves_its_expiry(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    assert await journal.renew_lease("a", ME, NOW + 20, 30.0) is True
    lease = (await journal.load("a")).lease
    assert lease == Lease(ME.id, ME.pid, ME.host, NOW + 50)
    # Past the first expiry the renewed lease still keeps others waiting.
    assert isinstance(await journal.begin_refresh("a", OTHER, 1, NOW + 40, 30.0), Busy)


async def test_a_lease_taken_over_cannot_be_renewed(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 10.0)
    assert isinstance(await journal.begin_refresh("a", OTHER, 1, NOW + 11, 30.0), Started)
    assert await journal.renew_lease("a", ME, NOW + 12, 30.0) is False
    assert (await journal.load("a")).lease == Lease(OTHER.id, OTHER.pid, OTHER.host, NOW + 41)


async def test_no_lease_no_renewal(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    assert await journal.renew_lease("a", ME, NOW, 30.0) is False
    assert await journal.renew_lease("nobody", ME, NOW, 30.0) is False
    assert (await journal.load("a")).lease is None


async def test_release_gives_up_the_lease_and_keeps_the_intent(journal: tj.Journal) -> None:
    """The token may have reached the server: the intent stays for the grace replay."""
    await journal.store_tokens("a", pair(1), NOW)
    began = await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    assert isinstance(began, Started)
    await journal.release("a", ME)
    record = await journal.load("a")
    assert record.lease is None and record.intent == began.intent
    assert isinstance(await journal.begin_refresh("a", OTHER, 1, NOW + 1, 30.0), Started)


async def test_release_by_another_holder_keeps_the_lease(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    await journal.release("a", OTHER)
    assert (await journal.load("a")).lease == Lease(ME.id, ME.pid, ME.host, NOW + 30)
    assert isinstance(await journal.begin_refresh("a", OTHER, 1, NOW + 1, 30.0), Busy)


async def test_a_lease_lapses_at_its_expiry_not_after(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    assert isinstance(await journal.begin_refresh("a", OTHER, 1, NOW + 29.5, 30.0), Busy)
    assert isinstance(await journal.begin_refresh("a", OTHER, 1, NOW + 30, 30.0), Started)


async def test_our_own_lease_never_makes_us_wait(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    again = await journal.begin_refresh("a", ME, 1, NOW + 1, 30.0)
    assert isinstance(again, Started)
    assert (await journal.load("a")).lease == Lease(ME.id, ME.pid, ME.host, NOW + 31)


async def test_a_sign_in_keeps_the_refreshers_lease(journal: tj.Journal) -> None:
    """The refresher (maybe another process) still owns the lease: others keep waiting for
    it, and its commit is refused by the moved generation, not by a lost lease."""
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    await journal.store_tokens("a", pair(2), NOW + 1)
    assert (await journal.load("a")).lease == Lease(ME.id, ME.pid, ME.host, NOW + 30)
    assert isinstance(await journal.begin_refresh("a", OTHER, 2, NOW + 2, 30.0), Busy)


async def test_durable_commits_count_each_change(journal: tj.Journal) -> None:
    """The benchmarks' cost figure: one per sign-in, two per refresh, on either journal."""
    start = journal.durable_commits
    await journal.store_tokens("a", pair(1), NOW)
    assert journal.durable_commits - start == 1
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    await journal.commit_refresh("a", ME, 1, pair(2), NOW + 1)
    assert journal.durable_commits - start == 3


def test_a_memory_journal_starts_with_no_commits_and_its_own_device_id() -> None:
    first, second = tj.MemoryJournal(), tj.MemoryJournal()
    assert first.durable_commits == 0
    assert uuid.UUID(first._device_id).version == 4
    assert first._device_id != second._device_id


async def test_a_memory_journal_device_id_is_kept() -> None:
    journal = tj.MemoryJournal()
    assert await journal.device_id() == await journal.device_id()
    assert uuid.UUID(await journal.device_id()).version == 4


def test_lease_liveness() -> None:
    """Whose lease makes us wait: someone else's, unexpired, not held by a dead local pid."""
    live = Lease(OTHER.id, OTHER.pid, OTHER.host, NOW + 10)
    assert lease_is_live(live, ME, NOW) is True
    assert lease_is_live(None, ME, NOW) is False
    assert lease_is_live(live, OTHER, NOW) is False  # our own
    assert lease_is_live(live, ME, NOW + 10) is False  # lapsed at its expiry
    dead_here = Lease("host:x", DEAD_PID, ME.host, NOW + 10)
    assert lease_is_live(dead_here, ME, NOW) is False
    # A pid on another host says nothing about this host's processes: the lease counts.
    elsewhere = Lease("other-host:x", DEAD_PID, "other-host", NOW + 10)
    assert lease_is_live(elsewhere, ME, NOW) is True


def test_checking_a_holder_sends_it_no_signal() -> None:
    """pid_alive only asks whether the pid exists: the holder must not be disturbed."""
    # Default dispositions (a test run under nohup would otherwise ignore SIGHUP).
    program = (
        "import signal, sys\n"
        "for s in signal.valid_signals():\n"
        "    try:\n"
        "        signal.signal(s, signal.SIG_DFL)\n"
        "    except (OSError, ValueError):\n"
        "        pass\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        assert pid_alive(child.pid) is True
    finally:
        child.communicate(b"")
    assert child.returncode == 0  # it ran to its end: not hung up, not terminated
    assert pid_alive(DEAD_PID) is False


@pytest.mark.parametrize("pid", [0, -1, 2**31, 2**63])
def test_what_names_no_one_process_is_no_holder(pid: int) -> None:
    """kill(0, 0) asks about our own process group, kill(-1, 0) about every process: an
    edited lease's pid 0 passed for alive; a pid past pid_t raised OverflowError."""
    assert pid_alive(pid) is False
    assert pid_alive(1) is True  # the lowest pid that names a process: init, always there


def test_a_holder_we_may_not_signal_is_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's process (EPERM) exists: its lease is respected."""

    def refuse(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refuse)
    assert pid_alive(4242) is True


# --------------------------------------------------------------------------- what reads back


@pytest.mark.parametrize(
    "tokens",
    [
        pair(1, token_type="DPoP", scope="read write"),
        tj.TokenSet("access-2", None),
        tj.TokenSet("access-3", "refresh-3", WHEN + timedelta(seconds=60)),
        tj.TokenSet("access-4", "refresh-4", None, WHEN),
    ],
    ids=["type-and-scope", "no-refresh-no-times", "expiry-only", "received-only"],
)
async def test_a_stored_pair_reads_back_equal(journal: tj.Journal, tokens: tj.TokenSet) -> None:
    await journal.store_tokens("a", tokens, NOW)
    assert (await journal.load("a")).tokens == tokens


async def test_a_committed_pair_keeps_its_scope(journal: tj.Journal) -> None:
    await journal.store_tokens("a", pair(1, scope="read"), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    await journal.commit_refresh("a", ME, 1, pair(2, scope="read write"), NOW + 1)
    assert (await journal.load("a")).tokens == pair(2, scope="read write")


async def test_a_reopened_journal_keeps_scope_and_type(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    first = tj.SQLiteJournal(path)
    await first.open()
    await first.store_tokens("a", pair(1, token_type="DPoP", scope="read"), NOW)
    await first.close()
    second = tj.SQLiteJournal(path, read_only=True)
    await second.open()
    assert (await second.load("a")).tokens == pair(1, token_type="DPoP", scope="read")
    await second.close()


async def test_a_commit_of_an_old_generation_releases_our_lease(tmp_path: Path) -> None:
    """The compare-and-swap failed: the newer pair stays and the refresher lets go."""
    journal = tj.SQLiteJournal(tmp_path / "tokens.db")
    await journal.open()
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)
    await journal.store_tokens("a", pair(2), NOW + 1)
    assert await journal.commit_refresh("a", ME, 1, pair(3), NOW + 2) is None
    record = await journal.load("a")
    await journal.close()
    assert record.tokens == pair(2) and record.lease is None


# --------------------------------------------------------------------------- SQLite details


def test_the_default_busy_timeout_is_five_seconds(tmp_path: Path) -> None:
    """docs/architecture.md: a locked journal is waited for up to 5 s before failing."""
    assert BUSY_TIMEOUT_MS == 5000
    assert tj.SQLiteJournal(tmp_path / "tokens.db").busy_timeout == 5.0


async def test_aiosqlite_debug_log_hides_the_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Invariant 8: aiosqlite logs each call with its arguments; ours are tokens."""
    journal = tj.SQLiteJournal(tmp_path / "tokens.db")
    with caplog.at_level(logging.DEBUG, logger="aiosqlite"):
        await journal.open()
        await journal.store_tokens("a", pair(7), NOW)
        await journal.load("a")
        await journal.close()
    records = [r for r in caplog.records if r.name == "aiosqlite"]
    assert records  # the log was kept, not dropped
    text = "\n".join(r.getMessage() for r in records)
    assert "access-7" not in text and "refresh-7" not in text
    assert "call(<parameters hidden>)" in text  # each call named, its arguments hidden


def test_the_log_filter_keeps_other_arguments() -> None:
    """Only the call objects are replaced; a record without them passes unchanged."""
    aiosqlite_log = logging.getLogger("aiosqlite")
    plain = logging.LogRecord("aiosqlite", logging.DEBUG, __file__, 1, "%s %d", ("x", 3), None)
    assert all(f.filter(plain) for f in aiosqlite_log.filters)
    assert plain.getMessage() == "x 3"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("database is locked", "is locked by another process beyond the busy timeout"),
        ("Database Busy", "is locked by another process beyond the busy timeout"),
        ("database or disk is full", "is full; nothing was lost"),
        ("attempt to write a readonly database", "is read-only; tokens cannot be saved"),
        ("Read-only file system", "is read-only; tokens cannot be saved"),
        ("file is not a database", "is corrupt or not a tokenjournal file"),
        ("database disk image is malformed", "is corrupt or not a tokenjournal file"),
        ("Corrupt page", "is corrupt or not a tokenjournal file"),
        ("unable to open database file", "cannot be opened (missing folder or no permission)"),
        ("disk I/O error", "journal /j/tokens.db: disk I/O error"),
    ],
)
def test_sqlite_errors_read_as_what_happened(message: str, expected: str) -> None:
    text = _describe(sqlite3.OperationalError(message), "/j/tokens.db")
    assert text.startswith("journal /j/tokens.db") and expected in text


def path_of(base: Path, size: int) -> Path:
    """A path under ``base`` exactly ``size`` bytes long, of names the system takes."""
    path = base
    while len(os.fsencode(path)) < size - 101:
        path = path / ("f" * 100)
    return path / ("t" * (size - len(os.fsencode(path)) - 1))


async def test_a_path_too_long_for_sqlite_is_named_as_such(tmp_path: Path) -> None:
    """Linux takes 4,096 bytes, SQLite 504: the error says the length, not "missing folder
    or no permission" (the folders were there, and writable)."""
    over = path_of(tmp_path, SQLITE_PATH_BYTES + 1)
    with pytest.raises(tj.JournalError) as err:
        await tj.SQLiteJournal(over).open()
    assert str(err.value) == (
        f"journal {over} cannot be opened: its full path is {SQLITE_PATH_BYTES + 1} bytes "
        f"long, and SQLite takes at most {SQLITE_PATH_BYTES}; choose a shorter one"
    )
    fits = path_of(tmp_path, SQLITE_PATH_BYTES)
    assert len(os.fsencode(fits)) == SQLITE_PATH_BYTES
    journal = tj.SQLiteJournal(fits)
    await journal.open()  # the longest path SQLite takes still opens
    await journal.close()


@pytest.mark.parametrize("read_only", [False, True])
async def test_a_name_the_system_refuses_is_a_journal_error(
    tmp_path: Path, read_only: bool
) -> None:
    """A file name over 255 bytes: the error says what the system said, as a JournalError
    (it escaped as an OSError from a stat)."""
    too_long = tmp_path / ("n" * 300)
    with pytest.raises(tj.JournalError) as err:
        await tj.SQLiteJournal(too_long, read_only=read_only).open()
    assert str(err.value) == f"cannot open journal {too_long}: File name too long"


async def test_a_folder_opened_read_only_is_said_to_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(tj.JournalError) as err:
        await tj.SQLiteJournal(tmp_path, read_only=True).open()
    assert str(err.value) == f"journal {tmp_path} is a folder, not a journal file"


def test_a_seal_that_is_not_a_seal_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(TypeError) as err:
        tj.SQLiteJournal(tmp_path / "t.db", seal=b"0" * 32)  # type: ignore[arg-type]
    assert str(err.value) == "seal must be a tokenjournal.Seal or None"


async def test_close_survives_a_write_group_cancelled_under_it(tmp_path: Path) -> None:
    """A group commit cancelled before it ran (the loop shutting down): its writer hears
    "journal closed", and close() still closes instead of raising the cancellation."""
    journal = tj.SQLiteJournal(tmp_path / "t.db")
    await journal.open()
    item = OutboxItem("id-1", "POST", "https://api.example.com/r", (), b"{}", NOW)
    writing = asyncio.ensure_future(journal.outbox_add("a", "box", item, OutboxLimits()))
    await asyncio.sleep(0)  # the write joined a group; the group's flush is queued
    assert journal._batch_flush is not None
    journal._batch_flush.cancel()
    await journal.close()
    with pytest.raises(tj.JournalError, match="journal closed"):
        await writing
    with pytest.raises(RuntimeError, match="the journal is not open"):
        await journal.load("default")


async def test_a_cancelled_writer_whose_group_never_ran_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same with the writer cancelled too: nobody is left to hear "journal closed", so
    the log says it (the write was not made)."""
    caplog.set_level(logging.INFO, logger="tokenjournal")
    journal = tj.SQLiteJournal(tmp_path / "t.db")
    await journal.open()
    item = OutboxItem("id-1", "POST", "https://api.example.com/r", (), b"{}", NOW)
    writing = asyncio.ensure_future(journal.outbox_add("a", "box", item, OutboxLimits()))
    await asyncio.sleep(0)
    assert journal._batch_flush is not None
    journal._batch_flush.cancel()
    writing.cancel()
    await journal.close()
    assert writing.cancelled()
    assert [r.getMessage() for r in caplog.records] == [
        f"journal {journal.path}: a write whose caller was cancelled failed: journal closed"
    ]


def test_only_a_path_over_the_limit_is_blamed_on_its_length() -> None:
    at_limit = "/" + "x" * (SQLITE_PATH_BYTES - 1)
    text = _describe(sqlite3.OperationalError("unable to open database file"), at_limit)
    assert text == f"journal {at_limit} cannot be opened (missing folder or no permission)"
    over = at_limit + "x"
    text = _describe(sqlite3.OperationalError("unable to open database file"), over)
    assert f"its full path is {SQLITE_PATH_BYTES + 1} bytes long" in text


@pytest.mark.parametrize(
    "error", [sqlite3.OperationalError("disk I/O error"), ValueError("Connection closed")]
)
async def test_a_connection_that_fails_to_close_is_closed_quietly(error: Exception) -> None:
    """What SQLite or aiosqlite raise while closing a connection being given up (an open
    that failed, a close) is swallowed: the error that led there is the one to report.
    Anything else is a bug and goes through."""

    class Dying:
        def __init__(self, error: Exception) -> None:
            self.error = error

        async def close(self) -> None:
            raise self.error

    await tj.SQLiteJournal._close_quietly(Dying(error))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        await tj.SQLiteJournal._close_quietly(Dying(RuntimeError("a bug")))  # type: ignore[arg-type]


async def test_a_journal_locked_at_open_waits_and_its_wait_can_be_cancelled(
    tmp_path: Path,
) -> None:
    """Another program holds a write lock on the file while it is still in rollback mode:
    switching it to WAL waits for the lock, up to the busy timeout, then says so; an open
    cancelled during that wait ends at once, and its thread stops waiting."""
    path = tmp_path / "t.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(tj.JournalError) as err:
            await tj.SQLiteJournal(path, busy_timeout=0.05).open()
        assert (
            str(err.value) == f"journal {path} is locked by another process beyond the busy timeout"
        )
        journal = tj.SQLiteJournal(path, busy_timeout=60)
        opening = asyncio.ensure_future(journal.open())
        await asyncio.sleep(0.05)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        other.execute("ROLLBACK")
    await journal.open()  # the abandoned wait left nothing behind
    await journal.store_tokens("default", pair(1), NOW)
    await journal.close()


async def test_a_busy_read_of_the_sealing_at_open_is_read_again(tmp_path: Path) -> None:
    journal = tj.SQLiteJournal(tmp_path / "t.db")
    reads = []

    def needed_keys(conn: sqlite3.Connection) -> set[str]:
        reads.append(conn)
        if len(reads) == 1:
            busy = sqlite3.OperationalError("database is locked")
            busy.sqlite_errorcode = sqlite3.SQLITE_BUSY  # what SQLite sets on a real one
            raise busy
        return set()

    journal._needed_keys = needed_keys  # type: ignore[method-assign]
    await journal.open()
    assert len(reads) == 2
    await journal.close()


def test_the_journal_is_created_private_not_made_private_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is created 0600 and each folder 0700 by the call that creates them: a file
    created readable and chmod-ed after could be opened by another user in between, and
    an open file stays readable to them whatever its mode becomes."""
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    monkeypatch.setattr(os, "fchmod", lambda *args, **kwargs: None)
    old = os.umask(0)
    try:
        path = tmp_path / "made" / "tokens.db"
        tj.SQLiteJournal(path)._prepare_file()
    finally:
        os.umask(old)
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600


async def test_close_commits_the_writes_it_accepted_before(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    items = [
        OutboxItem(f"id-{n}", "POST", "https://api.example.com/r", (), b"{}", NOW) for n in range(5)
    ]
    adds = [
        asyncio.ensure_future(journal.outbox_add("a", "box", item, OutboxLimits()))
        for item in items
    ]
    await asyncio.sleep(0)  # every write joined a group; none is committed yet
    await journal.close()
    assert await asyncio.gather(*adds) == [0] * 5
    await journal.open()
    assert (await journal.outbox_stats("a", "box", NOW)).pending == 5
    await journal.close()


def test_sqlite_journal_repr_names_its_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    assert repr(tj.SQLiteJournal(path)) == f"SQLiteJournal({str(path)!r})"


def test_the_log_filter_names_each_call_and_keeps_the_rest() -> None:
    def execute(sql: str, params: tuple[str, ...]) -> None:
        """Stands in for the connection method aiosqlite logs."""

    class Nameless:
        def __call__(self, secret: str) -> None:
            """A callable without a __name__."""

    record = logging.LogRecord(
        "aiosqlite",
        logging.DEBUG,
        __file__,
        1,
        "%s %s %s",
        (
            "executing",
            functools.partial(execute, "SELECT", ("secret-1",)),
            functools.partial(Nameless(), "secret-2"),
        ),
        None,
    )
    assert all(f.filter(record) for f in logging.getLogger("aiosqlite").filters)
    assert record.getMessage() == (
        "executing execute(<parameters hidden>) call(<parameters hidden>)"
    )


def _operational_error(code: int | None) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database is locked")
    if code is not None:
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize(
    ("code", "busy"),
    [(sqlite3.SQLITE_BUSY, True), (517, True), (sqlite3.SQLITE_LOCKED, False), (None, False)],
    ids=["busy", "busy-snapshot", "locked-table", "no-code"],
)
def test_only_sqlite_busy_is_waited_for(code: int | None, busy: bool) -> None:
    """SQLITE_BUSY and its extended codes (517 = BUSY_SNAPSHOT) are retried; others are not."""
    assert _is_busy(_operational_error(code)) is busy


def leaked(folder: Path, *secrets: str) -> list[str]:
    return [
        f.name for f in sorted(folder.iterdir()) for s in secrets if s.encode() in f.read_bytes()
    ]


@pytest.mark.parametrize("how", ["new_device_code", "sign_out", "refresh"])
async def test_a_replaced_device_code_is_in_no_file(tmp_path: Path, how: str) -> None:
    """Invariant 8: a device code can be polled for tokens; once replaced it is scrubbed."""
    journal = tj.SQLiteJournal(tmp_path / "j" / "tokens.db")
    await journal.open()
    await journal.store_tokens("a", pair(1), NOW)
    code = f"DEVICECODE-{uuid.uuid4().hex}"
    await journal.save_device_code("a", f'{{"device_code": "{code}"}}', NOW)
    if how == "new_device_code":
        await journal.save_device_code("a", '{"device_code": "another"}', NOW + 1)
    elif how == "sign_out":
        await journal.begin_sign_out("a", NOW + 1)
    else:
        await journal.begin_refresh("a", ME, 1, NOW + 1, 30.0)
    try:
        assert leaked(journal.path.parent, code) == []
    finally:
        await journal.close()


async def test_a_call_that_drops_no_secret_pays_for_no_checkpoint(tmp_path: Path) -> None:
    """A scrub is a full checkpoint: only calls that replaced or dropped a secret pay it."""
    journal = tj.SQLiteJournal(tmp_path / "tokens.db")
    await journal.open()
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", ME, 1, NOW, 30.0)  # writes an intent, replaces nothing
    wal = Path(f"{journal.path}-wal")
    written = wal.stat().st_size
    await journal.clear_device_code("a")  # nothing to clear
    assert written > 0 and wal.stat().st_size == written
    await journal.close()


async def test_an_edited_row_error_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.store_tokens("a", pair(1), NOW)
    await journal.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE accounts SET generation = 'many' WHERE account = 'a'")
        db.commit()
    journal = tj.SQLiteJournal(path)
    await journal.open()
    with pytest.raises(tj.JournalError) as caught:
        await journal.load("a")
    await journal.close()
    assert str(caught.value) == (
        "journal account 'a': column generation holds a str, not an integer; "
        "fix or delete the row (the file was left untouched)"
    )


async def edited(tmp_path: Path, sql: str) -> str:
    """The JournalError a load gives once ``sql`` edited the journal behind its back."""
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", Holder("h:1:x", 1, "elsewhere"), 1, NOW, 30.0)
    await journal.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(sql)
        db.commit()
    journal = tj.SQLiteJournal(path)
    await journal.open()
    try:
        with pytest.raises(tj.JournalError) as caught:
            await journal.load("a")
    finally:
        await journal.close()
    return str(caught.value)


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        (
            "UPDATE accounts SET generation = 'many'",
            "column generation holds a str, not an integer",
        ),
        ("UPDATE intents SET refresh_fp = ''", "column intents.refresh_fp is empty"),
        (
            "UPDATE intents SET refresh_fp = x'0102'",
            "column intents.refresh_fp holds a bytes, not text",
        ),
        ("UPDATE leases SET holder = ''", "column leases.holder is empty"),
        ("UPDATE leases SET host = x'00'", "column leases.host holds a bytes, not text"),
    ],
    ids=["generation", "empty-fingerprint", "blob-fingerprint", "empty-holder", "blob-host"],
)
async def test_an_edited_row_error_names_the_column_and_says_what_to_do(
    tmp_path: Path, sql: str, problem: str
) -> None:
    assert await edited(tmp_path, sql) == (
        f"journal account 'a': {problem}; fix or delete the row (the file was left untouched)"
    )


def test_a_required_number_that_is_missing_is_named() -> None:
    """The schema says NOT NULL; a table made by another tool may not: the same clear error."""
    with pytest.raises(tj.JournalError) as caught:
        _Row("a").required_number("leases.expires_at", None)
    assert str(caught.value) == (
        "journal account 'a': column leases.expires_at is empty; "
        "fix or delete the row (the file was left untouched)"
    )


async def test_a_journal_without_a_device_id_says_so(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DELETE FROM meta")
        db.commit()
    journal = tj.SQLiteJournal(path)
    await journal.open()
    with pytest.raises(tj.JournalError) as caught:
        await journal.device_id()
    await journal.close()
    assert str(caught.value) == (f"journal {path} has no device id; it is not a tokenjournal file")


def test_a_holder_is_named_after_host_pid_and_a_random_tag() -> None:
    first, second = Holder.for_this_process(), Holder.for_this_process()
    host, pid, tag = first.id.rsplit(":", 2)
    namespace = os.stat("/proc/self/ns/pid").st_ino
    assert (host, int(pid), first.pid, first.host) == (
        socket.gethostname(),
        os.getpid(),
        os.getpid(),
        f"{socket.gethostname()} pid:{namespace}",
    )
    assert len(tag) == 8 and int(tag, 16) >= 0
    assert first.id != second.id


def test_a_lease_from_another_pid_namespace_of_the_same_host_name_waits_for_its_expiry() -> None:
    """Two containers sharing a host name and a journal (a pod's volume, --network host):
    the holder's pid named nobody in the waiter's PID namespace, so its live lease was
    taken and the same refresh token sent twice at once (reuse detection ends the session).
    The host of a lease now names the PID namespace: across namespaces, only the expiry
    counts."""
    me = Holder.for_this_process()
    elsewhere = Lease("pod-peer", DEAD_PID, f"{socket.gethostname()} pid:1", NOW + 10)
    assert elsewhere.host != me.host
    assert lease_is_live(elsewhere, me, NOW) is True
    assert lease_is_live(replace(elsewhere, expires_at=NOW), me, NOW) is False
    here = replace(elsewhere, host=me.host)
    assert lease_is_live(here, me, NOW) is False  # same namespace: a dead pid is no holder


# --------------------------------------------------------------------------- reading rows


class Refused(str):
    """A column reader refuses the value, for this reason."""


@pytest.mark.parametrize(
    ("read", "value", "expected"),
    [
        ("text", None, None),
        ("text", "x", "x"),
        ("text", b"x", Refused("holds a bytes, not text")),
        ("required_text", "", Refused("is empty")),
        ("number", None, None),
        ("number", 5, 5.0),
        ("number", 1e300, _EPOCH_MAX),
        ("number", -1e300, _EPOCH_MIN),
        ("number", float("nan"), Refused("is NaN")),
        ("number", 10**400, Refused("is out of range")),  # no float holds it
        ("number", True, Refused("holds a bool, not a number")),
        ("number", "soon", Refused("holds a str, not a number")),
        ("required_number", None, Refused("is empty")),
        ("integer", 7, 7),
        ("integer", 7.0, 7),
        ("integer", 7.5, Refused("holds a float, not an integer")),
        ("integer", True, Refused("holds a bool, not an integer")),
        ("integer", 0, 0),
        ("integer", -1, Refused("is out of range (-1)")),
        ("integer", _MAX_GENERATION, _MAX_GENERATION),
        ("integer", _MAX_GENERATION + 1, Refused(f"is out of range ({_MAX_GENERATION + 1})")),
    ],
)
def test_each_column_reader(read: str, value: object, expected: object) -> None:
    """What the journal accepts from a row, and how it names what it refuses."""
    row = _Row("a")
    args = (value, _MAX_GENERATION) if read == "integer" else (value,)
    if isinstance(expected, Refused):
        with pytest.raises(tj.JournalError) as caught:
            getattr(row, read)("c", *args)
        assert str(caught.value) == (
            f"journal account 'a': column c {expected}; "
            "fix or delete the row (the file was left untouched)"
        )
    else:
        assert getattr(row, read)("c", *args) == expected


async def loaded_after(
    tmp_path: Path, sql: str, params: tuple[object, ...] = ()
) -> tj.AccountRecord:
    path = tmp_path / "tokens.db"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.store_tokens("a", pair(1), NOW)
    await journal.begin_refresh("a", Holder("h:1:x", 1, "elsewhere"), 1, NOW, 30.0)
    await journal.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(sql, params)
        db.commit()
    journal = tj.SQLiteJournal(path, read_only=True)
    await journal.open()
    try:
        return await journal.load("a")
    finally:
        await journal.close()


async def test_an_expiry_beyond_the_lifetime_cap_is_capped_on_read(tmp_path: Path) -> None:
    """A row from before the cap (or edited): the same ten-year cap as on write."""
    record = await loaded_after(
        tmp_path, "UPDATE accounts SET expires_at = ?", (NOW + 2 * MAX_LIFETIME,)
    )
    assert record.tokens is not None and record.tokens.expires_at is not None
    assert record.tokens.expires_at.timestamp() == NOW + MAX_LIFETIME


async def test_an_empty_refresh_token_or_type_reads_as_none_and_bearer(tmp_path: Path) -> None:
    record = await loaded_after(
        tmp_path, "UPDATE accounts SET refresh_token = '', token_type = NULL"
    )
    assert record.tokens is not None
    assert (record.tokens.refresh_token, record.tokens.token_type) == (None, "Bearer")


async def test_an_account_row_without_an_access_token_has_no_pair(tmp_path: Path) -> None:
    record = await loaded_after(tmp_path, "UPDATE accounts SET access_token = ''")
    assert record.tokens is None and record.generation == 1


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        (
            "UPDATE accounts SET token_type = '  '",
            "column access_token does not make a token pair "
            "(TokenSet.token_type must be a non-empty string)",
        ),
        (
            "UPDATE intents SET kind = 'teleport'",
            "column intents.kind is not a known kind ('teleport')",
        ),
        (
            "UPDATE intents SET started_at = 'now'",
            "column intents.started_at holds a str, not a number",
        ),
        (
            "UPDATE leases SET expires_at = 'later'",
            "column leases.expires_at holds a str, not a number",
        ),
        ("UPDATE leases SET pid = 2147483648", "column leases.pid is out of range (2147483648)"),
        (
            f"UPDATE intents SET generation = {_MAX_GENERATION + 1}",
            f"column intents.generation is out of range ({_MAX_GENERATION + 1})",
        ),
    ],
    ids=["blank-type", "unknown-kind", "intent-start", "lease-expiry", "pid", "intent-generation"],
)
async def test_more_edited_rows_name_the_column(tmp_path: Path, sql: str, problem: str) -> None:
    assert await edited(tmp_path, sql) == (
        f"journal account 'a': {problem}; fix or delete the row (the file was left untouched)"
    )


async def test_the_largest_pid_is_read(tmp_path: Path) -> None:
    """pid_t's largest; one more used to be read too, and then os.kill raised OverflowError
    out of status and out of a refresh."""
    record = await loaded_after(tmp_path, "UPDATE leases SET pid = 2147483647")
    assert record.lease is not None and record.lease.pid == 2**31 - 1


# --------------------------------------------------------------------------- opening


async def test_opening_read_only_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    with pytest.raises(tj.JournalError) as caught:
        await tj.SQLiteJournal(path, read_only=True).open()
    assert str(caught.value) == f"journal {path} does not exist"
    assert list(tmp_path.iterdir()) == []


async def test_a_folder_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file" / "sub"
    with pytest.raises(tj.JournalError, match=f"^cannot create the journal folder {folder}: "):
        await tj.SQLiteJournal(folder / "tokens.db").open()


async def test_a_journal_path_that_is_a_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(tj.JournalError) as caught:
        await tj.SQLiteJournal(tmp_path).open()
    assert str(caught.value) == f"cannot open journal {tmp_path}: Is a directory"


async def test_refusals_at_open_say_why(tmp_path: Path) -> None:
    empty, other, newer = tmp_path / "empty.db", tmp_path / "other.db", tmp_path / "newer.db"
    with contextlib.closing(sqlite3.connect(empty)) as db:
        db.execute("PRAGMA user_version = 0")
    with contextlib.closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE photos (id INTEGER)")
    with contextlib.closing(sqlite3.connect(newer)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    messages = []
    for path, read_only in ((empty, True), (other, False), (newer, False)):
        with pytest.raises(tj.JournalError) as caught:
            await tj.SQLiteJournal(path, read_only=read_only).open()
        messages.append(str(caught.value))
    assert messages == [
        f"journal {empty} is not a tokenjournal journal (schema 0)",
        f"journal {other} is an SQLite database with other tables, not a tokenjournal "
        "journal; it was left untouched",
        f"journal {newer} has schema {SCHEMA_VERSION + 1}, newer than this tokenjournal "
        f"understands ({SCHEMA_VERSION}); "
        "upgrade tokenjournal, the file was left untouched",
    ]


async def test_misuse_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    with pytest.raises(RuntimeError) as not_open:
        await tj.SQLiteJournal(path).load("a")
    assert str(not_open.value) == "the journal is not open: use `async with TokenManager(...)`"
    journal = tj.SQLiteJournal(path)
    await journal.open()
    await journal.close()
    reader = tj.SQLiteJournal(path, read_only=True)
    await reader.open()
    with pytest.raises(tj.JournalError) as read_only:
        await reader.store_tokens("a", pair(1), NOW)
    # The outbox's writes go through the group commit: the same refusal, in the same words.
    item = OutboxItem("id-1", "POST", "https://api.example.com/r", (), b"{}", NOW)
    with pytest.raises(tj.JournalError) as grouped:
        await reader.outbox_add("a", "box", item, OutboxLimits())
    await reader.close()
    assert str(read_only.value) == f"journal {path} was opened read-only"
    assert str(grouped.value) == f"journal {path} was opened read-only"


async def test_a_checkpoint_kept_busy_by_a_reader_is_left_for_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process reading: the write stands, a warning says the scrub waits for later,
    and the next scrub, with the reader gone, removes the old pair."""
    path = tmp_path / "j" / "tokens.db"
    journal = tj.SQLiteJournal(path, busy_timeout=0.1)
    await journal.open()
    await journal.store_tokens("a", pair(1), NOW)
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM accounts").fetchall()
    try:
        with caplog.at_level(logging.WARNING, logger="tokenjournal"):
            await journal.store_tokens("a", pair(2), NOW + 1)
    finally:
        reader.execute("COMMIT")
        reader.close()
    assert [r.getMessage() for r in caplog.records if r.name == "tokenjournal"] == [
        f"journal {path}: checkpoint kept busy by other readers"
    ]
    assert (await journal.load("a")).tokens == pair(2)
    await journal.store_tokens("a", pair(3), NOW + 2)
    await journal.close()
    assert leaked(path.parent, "access-1", "refresh-1", "access-2", "refresh-2") == []


def test_a_program_that_forgets_to_close_its_journal_still_exits(tmp_path: Path) -> None:
    """The connection's worker thread never keeps the interpreter alive (an exception
    between open and close must not hang an app at exit)."""
    program = (
        "import asyncio, sys\n"
        "import tokenjournal as tj\n"
        "async def main():\n"
        "    journal = tj.SQLiteJournal(sys.argv[1])\n"
        "    await journal.open()\n"
        "    await journal.load('a')\n"
        "asyncio.run(main())\n"
        "print('done', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path / "tokens.db")],
        capture_output=True,
        text=True,
        timeout=60,  # a guard: a hung exit fails the test instead of the run
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "done\n")


def test_a_checkpoint_that_fails_is_logged_and_left_for_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not busy but broken (an I/O error): the commit stands, the warning says why."""

    class FailingCheckpoint:
        def execute(self, sql: str) -> sqlite3.Cursor:
            exc = sqlite3.OperationalError("disk I/O error")
            exc.sqlite_errorcode = 10  # type: ignore[attr-defined]  # SQLITE_IOERR
            raise exc

    journal = tj.SQLiteJournal(tmp_path / "tokens.db")
    with caplog.at_level(logging.WARNING, logger="tokenjournal"):
        journal._scrub(FailingCheckpoint())  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == [
        f"journal {journal.path}: checkpoint failed: disk I/O error"
    ]


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        ("UPDATE accounts SET access_token = x'ff'", "column access_token holds a bytes, not text"),
        ("UPDATE accounts SET received_at = 'x'", "column received_at holds a str, not a number"),
        ("UPDATE accounts SET expires_at = 'soon'", "column expires_at holds a str, not a number"),
        (
            "UPDATE accounts SET refresh_token = x'00'",
            "column refresh_token holds a bytes, not text",
        ),
        ("UPDATE accounts SET token_type = x'00'", "column token_type holds a bytes, not text"),
        ("UPDATE accounts SET scope = x'00'", "column scope holds a bytes, not text"),
        ("UPDATE accounts SET ended_code = x'00'", "column ended_code holds a bytes, not text"),
        ("UPDATE accounts SET ended_at = 'y'", "column ended_at holds a str, not a number"),
        ("UPDATE intents SET payload = x'00'", "column intents.payload holds a bytes, not text"),
        (
            "UPDATE intents SET generation = 'g'",
            "column intents.generation holds a str, not an integer",
        ),
        ("UPDATE leases SET pid = 'p'", "column leases.pid holds a str, not an integer"),
    ],
)
async def test_every_column_is_named_in_its_error(tmp_path: Path, sql: str, problem: str) -> None:
    assert await edited(tmp_path, sql) == (
        f"journal account 'a': {problem}; fix or delete the row (the file was left untouched)"
    )
