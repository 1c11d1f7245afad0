"""A sealed journal's account rows, field by field (invariant 15, docs/architecture.md
section 7), and a read that meets a locked file.

What ``status`` shows of a sealed row without its key comes from :class:`SealInfo`: the key
id from ``sealed_by``, whether a pair is held, the keyed fingerprints kept at write time and
the expiry; each is asserted exactly, and a hand-edited row that breaks one of those
columns is a ``JournalError`` naming that column. The ID token is sealed like the pair:
bound to its table, column, account and generation, so it opens where it was written and
nowhere else. A read that finds the file locked waits in slices, gives up with a clear
error at the busy timeout, and stops waiting as soon as its caller is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import tokenjournal as tj
from tokenjournal._journal import AccountRecord, SealInfo
from tokenjournal._seal import is_sealed, key_id_of
from tokenjournal.cli.status import read_journal

KEY = bytes(range(32))
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
PAIR = tj.TokenSet(
    "sealed-access-token-0123456789",
    "sealed-refresh-token-0123456789",
    NOW + timedelta(seconds=900),
    NOW,
    id_token="header.id-token-payload-0123456789.signature",
)
EXPIRES = (NOW + timedelta(seconds=900)).timestamp()


def bad_row(account: str, column: str, why: str) -> str:
    """The exact message of a JournalError for a hand-edited column."""
    return (
        f"journal account {account!r}: column {column} {why}; "
        "fix or delete the row (the file was left untouched)"
    )


async def write(path: Path, seal: tj.Seal, pairs: dict[str, tj.TokenSet]) -> None:
    """Store each account's pair in a journal sealed with ``seal``."""
    journal = tj.SQLiteJournal(path, seal=seal)
    await journal.open()
    try:
        for account, tokens in pairs.items():
            await journal.store_tokens(account, tokens, NOW.timestamp())
    finally:
        await journal.close()


async def read(path: Path, seal: tj.Seal | None, account: str = "default") -> AccountRecord:
    """The account's record; without a seal the journal is opened read-only (as ``status``)."""
    journal = tj.SQLiteJournal(path, seal=seal, read_only=seal is None)
    await journal.open()
    try:
        return await journal.load(account)
    finally:
        await journal.close()


async def refused(path: Path, column: str, why: str) -> None:
    """Reading the row without the key is a JournalError naming ``column`` and ``why``."""
    with pytest.raises(tj.JournalError) as caught:
        await read(path, None)
    assert str(caught.value) == bad_row("default", column, why)


def edit(path: Path, sql: str, params: tuple[object, ...] = ()) -> None:
    """Change the file as a person (or a buggy tool) with the sqlite3 shell would."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(sql, params)
    finally:
        conn.close()


def column(path: Path, name: str, account: str = "default") -> object:
    """One column of an account's row, as stored."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            f"SELECT {name} FROM accounts WHERE account = ?",
            (account,),
        ).fetchone()[0]
    finally:
        conn.close()


# ----------------------------------------------------------------------------- SealInfo


async def test_a_sealed_row_read_without_the_key_shows_key_id_fingerprints_and_expiry(
    journal_path: Path,
) -> None:
    seal = tj.Seal(KEY)
    await write(journal_path, seal, {"default": PAIR})
    expected = SealInfo(
        seal.key_id,
        True,
        seal.fingerprint(PAIR.access_token),
        seal.fingerprint(PAIR.refresh_token),
        EXPIRES,
    )
    # The keyed fingerprints differ from the plain ones: status says nothing a guess confirms.
    assert expected.access_fingerprint != tj.fingerprint(PAIR.access_token)
    assert expected.access_fingerprint != expected.refresh_fingerprint

    without_key = await read(journal_path, None)
    assert without_key.tokens is None
    assert without_key.sealed == expected

    with_key = await read(journal_path, seal)
    assert with_key.tokens == PAIR
    assert with_key.sealed == expected

    status = await read_journal(journal_path)
    (account,) = status.accounts
    assert (account.state, account.sealed_by) == ("signed_in", seal.key_id)
    assert account.access_fingerprint == expected.access_fingerprint
    assert account.refresh_fingerprint == expected.refresh_fingerprint
    assert account.access_expires_at == EXPIRES
    assert status.sealed_by == seal.key_id


async def test_a_sealed_pair_without_refresh_token_or_expiry_shows_dashes_and_none(
    journal_path: Path,
) -> None:
    seal = tj.Seal(KEY)
    await write(journal_path, seal, {"default": tj.TokenSet("only-an-access-token-01234", None)})
    assert (await read(journal_path, None)).sealed == SealInfo(
        seal.key_id, True, seal.fingerprint("only-an-access-token-01234"), "-", None
    )


async def test_a_sealed_row_with_its_fingerprints_emptied_shows_dashes(
    journal_path: Path,
) -> None:
    """A row from a tool that cleared the fingerprint columns still reads; status shows '-'."""
    seal = tj.Seal(KEY)
    await write(journal_path, seal, {"default": PAIR})
    edit(journal_path, "UPDATE accounts SET access_fp = NULL, refresh_fp = ''")
    record = await read(journal_path, None)
    assert record.sealed == SealInfo(seal.key_id, True, "-", "-", EXPIRES)
    assert (await read(journal_path, seal)).tokens == PAIR


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        # (a number would be stored as text: the columns have TEXT affinity)
        ("access_fp", b"\x00\x01", "holds a bytes, not text"),
        ("refresh_fp", b"\x02", "holds a bytes, not text"),
        ("sealed_by", "", "is empty"),
        ("sealed_by", b"\x03", "holds a bytes, not text"),
    ],
)
async def test_a_hand_edited_seal_column_is_an_error_naming_it(
    journal_path: Path, name: str, value: object, why: str
) -> None:
    seal = tj.Seal(KEY)
    await write(journal_path, seal, {"default": PAIR})
    edit(journal_path, f"UPDATE accounts SET {name} = ?", (value,))
    await refused(journal_path, name, why)
    # status (which reads without the key) says the same, in one line
    with pytest.raises(tj.JournalError) as caught:
        await read_journal(journal_path)
    assert str(caught.value) == bad_row("default", name, why)


# ----------------------------------------------------------------------------- the ID token


async def test_the_id_token_is_sealed_and_opens_again_with_the_key(journal_path: Path) -> None:
    seal = tj.Seal(KEY)
    await write(journal_path, seal, {"default": PAIR})
    stored = column(journal_path, "id_token")
    assert isinstance(stored, str) and is_sealed(stored)
    assert key_id_of(stored) == seal.key_id
    assert PAIR.id_token is not None and PAIR.id_token not in stored
    record = await read(journal_path, seal)
    assert record.tokens is not None and record.tokens.id_token == PAIR.id_token
    # Opened with a new key (previous=[the old one]), it is sealed anew under the new key.
    new = tj.Seal(bytes(range(100, 132)), previous=[seal])
    record = await read(journal_path, new)
    assert record.tokens is not None and record.tokens.id_token == PAIR.id_token
    assert key_id_of(str(column(journal_path, "id_token"))) == new.key_id


def unopenable(account: str, name: str, kid: str) -> str:
    return bad_row(
        account,
        f"accounts.{name}",
        f"does not open with key id {kid} for this account, column and generation "
        "(copied from another row, or altered)",
    )


async def test_an_id_token_copied_to_another_account_does_not_open(journal_path: Path) -> None:
    seal = tj.Seal(KEY)
    other = tj.TokenSet("bob-access-token-0123456789", "bob-refresh-0123456789", id_token="b.b.b")
    await write(journal_path, seal, {"alice": PAIR, "bob": other})
    assert (await read(journal_path, seal, "bob")).tokens == other
    # Both rows are at generation 1: only the account tells them apart.
    assert column(journal_path, "generation", "alice") == column(journal_path, "generation", "bob")
    edit(
        journal_path,
        "UPDATE accounts SET id_token = (SELECT id_token FROM accounts WHERE account = 'alice') "
        "WHERE account = 'bob'",
    )
    with pytest.raises(tj.JournalError) as caught:
        await read(journal_path, seal, "bob")
    assert str(caught.value) == unopenable("bob", "id_token", seal.key_id)
    assert (await read(journal_path, seal, "alice")).tokens == PAIR


async def test_an_id_token_from_an_earlier_generation_does_not_open(journal_path: Path) -> None:
    seal = tj.Seal(KEY)
    await write(journal_path, seal, {"default": PAIR})
    earlier = column(journal_path, "id_token")
    newer = tj.TokenSet("second-access-token-0123456", "second-refresh-01234567", id_token="n.n.n")
    await write(journal_path, seal, {"default": newer})
    assert column(journal_path, "generation") == 2
    edit(journal_path, "UPDATE accounts SET id_token = ?", (earlier,))
    with pytest.raises(tj.JournalError) as caught:
        await read(journal_path, seal)
    assert str(caught.value) == unopenable("default", "id_token", seal.key_id)


async def test_an_id_token_moved_to_another_column_does_not_open(journal_path: Path) -> None:
    seal = tj.Seal(KEY)
    await write(journal_path, seal, {"default": PAIR})
    edit(journal_path, "UPDATE accounts SET refresh_token = id_token")
    with pytest.raises(tj.JournalError) as caught:
        await read(journal_path, seal)
    assert str(caught.value) == unopenable("default", "refresh_token", seal.key_id)


# ----------------------------------------------------------------------------- a locked file


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Another connection holds the file's exclusive lock (a writer in the middle of its
    commit), which keeps readers of a rollback-journal file out."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("UPDATE accounts SET updated_at = updated_at")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


class Tries:
    """Counts the journal's tries of the load statement (its connection's trace callback,
    called on the worker thread); ``retried`` is set at the second, which is made only
    after the first met the lock."""

    def __init__(self) -> None:
        self.count = 0
        self.retried = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def __call__(self, statement: str) -> None:
        if "SELECT a.access_token" in statement:
            self.count += 1
            if self.count == 2:
                self._loop.call_soon_threadsafe(self.retried.set)

    async def until_retried(self, reading: asyncio.Future[AccountRecord]) -> None:
        """Wait for the retry, or for ``reading`` to end first (which fails the test)."""
        retried = asyncio.ensure_future(self.retried.wait())
        try:
            # The bound only stops a hang; it is not what the test waits for.
            await asyncio.wait({retried, reading}, timeout=20, return_when="FIRST_COMPLETED")
        finally:
            retried.cancel()
        assert not reading.done(), "the read did not wait for the lock"
        assert self.retried.is_set()


async def open_for_status(path: Path, busy_timeout: float) -> tj.SQLiteJournal:
    """A journal opened read-only, as ``status`` does, on a file someone switched to
    SQLite's rollback journal (``PRAGMA journal_mode = DELETE``, say to copy it as one
    file): a read-only open leaves the mode as it finds it, and there, unlike in WAL mode,
    a writer's exclusive lock keeps readers waiting."""
    await write_plain(path)
    edit(path, "PRAGMA journal_mode = DELETE")
    journal = tj.SQLiteJournal(path, read_only=True, busy_timeout=busy_timeout)
    await journal.open()
    assert (await journal.load("default")).tokens == PAIR  # open, idle, holding no lock
    return journal


async def write_plain(path: Path) -> None:
    journal = tj.SQLiteJournal(path)
    await journal.open()
    try:
        await journal.store_tokens("default", PAIR, NOW.timestamp())
    finally:
        await journal.close()


async def test_a_read_locked_out_past_the_busy_timeout_says_so(journal_path: Path) -> None:
    journal = await open_for_status(journal_path, busy_timeout=0.1)
    try:
        with write_locked(journal_path), pytest.raises(tj.JournalError) as caught:
            await journal.load("default")
        assert str(caught.value) == (
            f"journal {journal_path} is locked by another process beyond the busy timeout"
        )
        assert (await journal.load("default")).tokens == PAIR  # the lock gone, it reads
    finally:
        await journal.close()


async def test_a_read_waits_for_a_lock_released_within_the_busy_timeout(
    journal_path: Path,
) -> None:
    journal = await open_for_status(journal_path, busy_timeout=60.0)
    tries = Tries()
    await journal._conn().set_trace_callback(tries)
    try:
        with write_locked(journal_path):
            reading = asyncio.ensure_future(journal.load("default"))
            await tries.until_retried(reading)
        assert (await reading).tokens == PAIR
    finally:
        await journal.close()


async def test_a_cancelled_read_stops_waiting_for_the_lock(journal_path: Path) -> None:
    """The worker thread is the journal's only one: a read nobody awaits any more must not
    keep it (and every later call, close included) waiting out a long busy timeout."""
    journal = await open_for_status(journal_path, busy_timeout=120.0)
    tries = Tries()
    await journal._conn().set_trace_callback(tries)
    try:
        with write_locked(journal_path):
            reading = asyncio.ensure_future(journal.load("default"))
            await tries.until_retried(reading)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            # Still locked: close() gets the worker as soon as the read gives up (within
            # one BUSY_SLICE_MS). The bound only stops a hang (and is not a cancel, which
            # would wait for the worker too); it is not what is measured.
            closing = asyncio.ensure_future(journal.close())
            await asyncio.wait({closing}, timeout=20)
            assert closing.done(), "close() waited for a read nobody awaits any more"
            assert not journal.is_open
    finally:
        await journal.close()  # (the lock released, a stuck read would end at its next try)
    assert (await read(journal_path, None)).tokens == PAIR


# ----------------------------------------------------------------------------- more rows


@pytest.mark.parametrize("sealed", ["access_token", "refresh_token", "id_token"])
async def test_a_sealed_value_in_a_row_marked_plain_is_an_error_naming_its_key(
    journal_path: Path, sealed: str
) -> None:
    """A row whose ``sealed_by`` was cleared while one of its values is still sealed (the
    others replaced by plain text) is refused, naming the key that value needs; it was
    ``?`` when the access token was the plain one."""
    seal = tj.Seal(KEY)
    await write(journal_path, seal, {"default": PAIR})
    plain = {"access_token": "plain-access-0123456789", "refresh_token": "plain-refresh-01234"}
    plain["id_token"] = "plain.id.token"
    sets = ", ".join(f"{c} = ?" for c in plain if c != sealed)
    values = tuple(v for c, v in plain.items() if c != sealed)
    edit(journal_path, f"UPDATE accounts SET sealed_by = NULL, {sets}", values)
    edit(journal_path, "DELETE FROM meta WHERE key = 'sealed_by'")  # a plain journal, then
    why = f"is empty beside a value sealed by {seal.key_id}"
    await refused(journal_path, "sealed_by", why)


async def test_a_sealed_row_with_a_hand_edited_expiry_is_an_error_naming_it(
    journal_path: Path,
) -> None:
    seal = tj.Seal(KEY)
    await write(journal_path, seal, {"default": PAIR})
    edit(journal_path, "UPDATE accounts SET expires_at = 'soon'")
    with pytest.raises(tj.JournalError) as caught:
        await read(journal_path, None)  # without the key: only the SealInfo reads it
    assert str(caught.value) == bad_row("default", "expires_at", "holds a str, not a number")


async def test_an_ended_session_in_a_sealed_journal_leaves_no_seal_info(
    journal_path: Path,
) -> None:
    """An ended row holds no secret: it is not marked sealed, so ``status`` shows it ended,
    without a key id or fingerprints."""
    seal = tj.Seal(KEY)
    await write(journal_path, seal, {"default": PAIR})
    journal = tj.SQLiteJournal(journal_path, seal=seal)
    await journal.open()
    try:
        assert await journal.end_session("default", "invalid_grant", NOW.timestamp()) == 2
    finally:
        await journal.close()
    assert column(journal_path, "sealed_by") is None
    assert column(journal_path, "access_fp") is None
    record = await read(journal_path, None)
    assert (record.tokens, record.sealed, record.ended_code) == (None, None, "invalid_grant")
    (account,) = (await read_journal(journal_path)).accounts
    assert (account.state, account.sealed_by, account.access_fingerprint) == ("ended", None, "-")


async def test_a_group_commit_cancelled_while_queued_fails_its_writes(journal_path: Path) -> None:
    """The journal's thread is busy (a long call ahead), so the group's flush is still
    queued when it is cancelled: its writers get "journal closed" instead of waiting for
    ever, and the next write starts a group of its own."""
    journal = tj.SQLiteJournal(journal_path)
    await journal.open()
    gate = threading.Event()
    try:
        ahead = asyncio.ensure_future(journal._run(lambda conn, abandoned: gate.wait(30)))
        write = asyncio.ensure_future(journal._batched(lambda tx: 1))
        for _ in range(3):  # the write queues; its flush queues its job behind ``ahead``
            await asyncio.sleep(0)
        (flush,) = journal._flushes
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        with pytest.raises(tj.JournalError, match=r"^journal closed$"):
            await write
        gate.set()
        assert await ahead is True
        assert await journal._batched(lambda tx: 2) == 2
    finally:
        gate.set()
        await journal.close()


# ------------------------------------------------------------------ a sealed device-code intent


async def sealed_device_code(path: Path) -> None:
    """A sealed journal holding a device-code intent (its payload is a secret: sealed)."""
    journal = tj.SQLiteJournal(path, seal=tj.Seal(KEY))
    await journal.open()
    try:
        await journal.save_device_code("default", '{"device_code": "dc-secret"}', 1.0)
    finally:
        await journal.close()


async def test_a_sealed_device_code_shows_its_kind_but_no_payload_without_the_key(
    journal_path: Path,
) -> None:
    await sealed_device_code(journal_path)
    assert b"dc-secret" not in journal_path.read_bytes()
    without = await read(journal_path, None)
    assert without.intent is not None and without.intent.kind == "device_code"
    assert without.intent.payload is None  # the key is not here: nothing to show
    with_key = await read(journal_path, tj.Seal(KEY))
    assert with_key.intent is not None
    assert with_key.intent.payload == '{"device_code": "dc-secret"}'


@pytest.mark.parametrize(("value", "why"), [("", "is empty"), (b"\x04", "holds a bytes, not text")])
async def test_a_hand_edited_intent_seal_column_is_an_error_naming_it(
    journal_path: Path, value: object, why: str
) -> None:
    await sealed_device_code(journal_path)
    edit(journal_path, "UPDATE intents SET sealed_by = ?", (value,))
    await refused(journal_path, "intents.sealed_by", why)


async def test_a_plain_row_with_a_bytes_id_token_is_an_error_naming_it(
    journal_path: Path,
) -> None:
    journal = tj.SQLiteJournal(journal_path)
    await journal.open()
    try:
        await journal.store_tokens("default", PAIR, NOW.timestamp())
    finally:
        await journal.close()
    edit(journal_path, "UPDATE accounts SET id_token = ?", (b"\x05",))
    await refused(journal_path, "id_token", "holds a bytes, not text")
